"""The `vision-sft` stage's model: an image (or video) bundle trained against the pretrained LM, with the
instruct LM hot-swapped in (`hot_swap`), an image-index embedding so questions about several images can tell
them apart, and the self-contained bundle that stage writes (`load_vision_sft_bundle`: every non-LM tensor, the
instruct LM's location and fingerprint, and how to rebuild the image and video paths).

The hot swap keeps everything but the LM: the adapters were trained against the pretrained LM (their bundle's
fingerprint is checked when it loads), the instruct LM must have the same shape and the same tokenizer (it is
that LM fine-tuned by `lm-sft`); the freeze proof of the stage then holds for the instruct LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mm.adapters.temporal_aggregator import AggregatorConfig
from mm.datasets.tiling import TileTransform
from mm.formats.bundle import (
    load_adapter_weights,
    load_lm_checked,
    load_tokenizer,
    read_config,
    resolve_image_bundle,
)
from mm.formats.hf_llama import load_hf
from mm.lm import Tokenizer
from mm.models.loading import read_stage_config
from mm.models.multimodal import MultimodalLM
from mm.stages.image_model import IMAGE_STAGES, image_model_from_meta, image_transform, load_image_bundle
from mm.stages.video_model import VIDEO_STAGES, attach_video, load_video_bundle

SFT_STAGES = ("vision-sft",)
# What an image bundle's config says about the image path (a chat bundle keeps it).
IMAGE_KEYS = ("image_encoder", "xattn", "caption_head", "tile_size", "max_tiles", "prompt")
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "rope_theta")


def source_config(path: Path) -> dict[str, Any]:
    """The config of an image or video stage's final folder; a video folder's gains the image path's keys
    from the image bundle it names."""
    stage = read_config(path).get("stage")
    if stage in VIDEO_STAGES:
        meta = read_stage_config(path, VIDEO_STAGES)
        image = read_stage_config(resolve_image_bundle(path, meta), IMAGE_STAGES)
        return {**{k: image[k] for k in IMAGE_KEYS if k in image}, **meta}
    if stage in IMAGE_STAGES:
        return read_stage_config(path, IMAGE_STAGES)
    raise ValueError(
        f"init_from={path} holds a {stage!r} stage; vision-sft starts from an image or video stage's final "
        f"folder ({', '.join(IMAGE_STAGES + VIDEO_STAGES)})"
    )


def load_source(path: Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """The image or video model of a final folder trained against the pretrained LM (fingerprints checked),
    with its `source_config`."""
    meta = source_config(path)
    if meta.get("video"):
        model, tok, transform, _ = load_video_bundle(path)
    else:
        model, tok, transform, _ = load_image_bundle(path)
    return model, tok, transform, meta


def shapes_model(init_from: Path, lm: str, image_slots: int) -> MultimodalLM:
    """The chat model's shapes on the meta device (`mm plan`): no weight file or tokenizer is read."""
    from types import SimpleNamespace

    from mm.lm import Transformer
    from mm.training.stage import lm_shape

    meta = source_config(init_from)
    with torch.device("meta"):
        lm_cfg = lm_shape(lm)
        ids = SimpleNamespace(image_id=lm_cfg.vocab_size, video_id=lm_cfg.vocab_size)
        model = image_model_from_meta(meta, Transformer(lm_cfg), ids)
        video = meta.get("video")
        if video:
            model = attach_video(model, ids, AggregatorConfig(**video["aggregator"]), video["xattn_layers"])
        model.add_image_index(image_slots)
    return model


def hot_swap(model: MultimodalLM, tok: Tokenizer, lm_path: Path) -> None:
    """Put the instruct LM at `lm_path` in place of the model's LM (same shape and tokenizer, else ValueError
    naming what differs)."""
    lm = load_hf(lm_path)
    old, new = model.lm.cfg, lm.cfg
    differ = [k for k in SHAPE_KEYS if getattr(old, k, None) != getattr(new, k, None)]
    if differ:
        raise ValueError(
            f"lm={lm_path} is not the adapters' LM fine-tuned: its {', '.join(differ)} differ "
            f"({', '.join(f'{k} {getattr(new, k)} vs {getattr(old, k)}' for k in differ)})"
        )
    other = Tokenizer.from_file(lm_path)
    probe = "what colour is the circle? a large red circle"
    if other.vocab_size != tok.vocab_size or other.encode(probe) != tok.encode(probe):
        raise ValueError(f"lm={lm_path} has another tokenizer than the LM the adapters were trained against")
    model.lm = lm.eval()
    model.set_trainable(model.trainable)


def load_vision_sft_bundle(path: Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """The chat model of a `vision-sft` final folder (its instruct LM's fingerprint checked)."""
    path = Path(path)
    meta = read_stage_config(path, SFT_STAGES)
    lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    model = image_model_from_meta(meta, lm, tok)
    video = meta.get("video")
    if video:
        model = attach_video(model, tok, AggregatorConfig(**video["aggregator"]), video["xattn_layers"])
    if meta.get("image_slots"):
        model.add_image_index(int(meta["image_slots"]))
    load_adapter_weights(model, path)
    return model.eval(), tok, image_transform(path, meta), meta


def tensors_of(model: MultimodalLM, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's non-LM tensors of the named parts."""
    return {k: v for k, v in model.adapter_state().items() if k.split(".")[0] in parts}
