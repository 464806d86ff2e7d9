"""The training stages, one small file each; importing this package registers them with the runner."""

from mm.stages import (  # noqa: F401
    bestrq_pretrain,
    clip_pretrain,
    image,
    lm_pretrain,
    lm_sft,
    speech,
    video,
    vision_sft,
)
