"""Reading a stage's final folder (a bundle, `mm.formats.bundle`) generically: its `mm_config.json`, refused
with a message naming the command that reads it when it holds another stage. How each stage's final folder
rebuilds its model is the stage's own (`Stage.load_final`: `mm.stages.image_model.load_image_bundle`,
`mm.stages.video_model.load_video_bundle`, `mm.stages.speech.load_speech_bundle`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm.formats.bundle import read_config
from mm.prompts import ASR_PROMPT, IMAGE_PROMPT, VIDEO_PROMPT

_DEFAULT_PROMPTS = {"image-pretrain": IMAGE_PROMPT, "image-anneal": IMAGE_PROMPT, "speech": ASR_PROMPT}


def read_stage_config(path: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """A bundle's `mm_config.json`, refused (naming the command that reads it) when it holds another stage."""
    meta = read_config(path)
    stage = meta.get("stage")
    if stage not in stages:
        from mm.training.stage import stage_readers

        command = stage_readers().get(str(stage))
        reader = f"mm {command}" if command else "mm generate" if stage is None else "mm train"
        raise ValueError(f"{path} holds a {stage!r} stage, not {' or '.join(stages)}; {reader} reads it")
    if stage in _DEFAULT_PROMPTS:  # a bundle that records no prompt: the stage's default
        meta.setdefault("prompt", _DEFAULT_PROMPTS[stage])
    elif isinstance(meta.get("video"), dict):
        meta["video"].setdefault("prompt", VIDEO_PROMPT)
    enc = meta.get("image_encoder")
    if isinstance(enc, dict) and enc.get("intermediate_layers") and "intermediate_from" not in enc:
        enc["intermediate_from"] = "block_output"  # bundles written before mm followed Meta's reference
    return meta
