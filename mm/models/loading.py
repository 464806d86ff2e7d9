"""Rebuilding trained models from stage bundles (`mm.training.bundle`): the image model (an image-stage
bundle), the video model (a video bundle and the image bundle it builds on, both fingerprints checked) and
the speech LM. Each loader refuses an LM (or image path) whose fingerprint differs from the recorded one, and
a bundle of another stage with a message naming the command that reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mm.adapters import TemporalAggregator
from mm.adapters.caption_head import CaptionHeadConfig, CaptionSlotHead
from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from mm.adapters.temporal_aggregator import AggregatorConfig
from mm.datasets.audio import AudioFeatures
from mm.datasets.tiling import TileTransform
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.encoders.speech import SpeechEncoder, SpeechEncoderConfig
from mm.lm import Tokenizer
from mm.models.multimodal import IMAGE_PATH_PARTS, VIDEO_PARTS, MultimodalLM
from mm.models.speech import SpeechLM
from mm.training.bundle import (
    load_adapter_weights,
    load_lm,
    load_lm_checked,
    load_tokenizer,
    read_config,
    resolve_image_bundle,
    resolve_lm_path,
)
from mm.training.freeze import fingerprint_tensors

IMAGE_STAGES = ("image-pretrain", "image-anneal")
VIDEO_STAGES = ("video",)
SPEECH_STAGES = ("speech",)


def read_stage_config(path: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """A bundle's `mm_config.json`, refused (naming the command that reads it) when it holds another stage."""
    meta = read_config(path)
    stage = meta.get("stage")
    if stage not in stages:
        from mm.training.stage import stage_readers

        command = stage_readers().get(str(stage))
        reader = f"mm {command}" if command else "mm generate" if stage is None else "mm train"
        raise ValueError(f"{path} holds a {stage!r} stage, not {' or '.join(stages)}; {reader} reads it")
    enc = meta.get("image_encoder")
    if isinstance(enc, dict) and enc.get("intermediate_layers") and "intermediate_from" not in enc:
        enc["intermediate_from"] = "block_output"  # bundles written before mm followed Meta's reference
    return meta


def caption_head_parts(head: CaptionHeadConfig | dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """MultimodalLM kwargs for the auxiliary caption head (none when its weight is 0)."""
    if isinstance(head, dict):
        head = CaptionHeadConfig(**head)
    if head is None or not head.weight:
        return {}
    return {
        "image_aux": CaptionSlotHead(dim, head.n_slots, head.depth, head.n_heads),
        "trainable": ("image_encoder", "image_xattn", "image_aux"),
    }


def load_image_bundle(
    path: Path, *, lazy_lm_dtype: torch.dtype | None = None
) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """Rebuild a trained image model from its bundle (refusing an LM whose fingerprint changed). With
    `lazy_lm_dtype` an HF Llama LM is not read: it stays on the meta device to be read after sharding
    (`load_hf(..., device="meta")`), and the caller checks its fingerprint once it has its values."""
    meta = read_stage_config(path, IMAGE_STAGES)
    if lazy_lm_dtype is not None and meta.get("lm_format", "hf_llama") == "hf_llama":
        lm = load_lm(resolve_lm_path(path, meta), meta, device="meta", dtype=lazy_lm_dtype)
    else:
        lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    enc_cfg = ImageEncoderConfig(**meta["image_encoder"])
    mllama = meta.get("lm_format") == "hf_mllama"
    if mllama:
        from mm.models.mllama import MLLAMA_EXTRA_TOKENS, load_hf_mllama_transform, mllama_image_encoder

        encoder = mllama_image_encoder(enc_cfg)
    else:
        encoder = ImageEncoder(enc_cfg)
    model = MultimodalLM(
        lm,
        encoder,
        xattn_every=meta["xattn"]["every"],
        xattn_layers=meta["xattn"].get("layers"),
        hf_row_compat=meta["xattn"]["hf_row_compat"],
        image_token_id=tok.image_id,
        extra_tokens=MLLAMA_EXTRA_TOKENS if mllama else 0,
        **caption_head_parts(meta.get("caption_head"), lm.cfg.dim),
    )
    load_adapter_weights(model, path)
    if mllama:
        transform = load_hf_mllama_transform(resolve_lm_path(path, meta), max_tiles=meta["max_tiles"])
    else:
        transform = TileTransform(meta["tile_size"], meta["max_tiles"], id_max_tiles=enc_cfg.max_tiles)
    return model.eval(), tok, transform, meta


class FrozenImagePathChanged(RuntimeError):
    """The image path's fingerprint differs from the one recorded."""


def image_path_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The frozen image path's tensors (image encoder, image cross-attention, extra token embeddings)."""
    return {k: v for k, v in model.adapter_state().items() if k.split(".")[0] in IMAGE_PATH_PARTS}


def video_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The video stage's tensors (aggregator, video cross-attention): what a video bundle holds."""
    return {k: v for k, v in model.adapter_state().items() if k.split(".")[0] in VIDEO_PARTS}


def attach_video(
    image_model: MultimodalLM, tok: Tokenizer, agg: AggregatorConfig, layers: list[int]
) -> MultimodalLM:
    """The image model plus a fresh video path (aggregator + video cross-attention before `layers`)."""
    c = image_model.cfg
    enc = image_model.image_encoder
    n_extra = (
        0 if image_model.extra_tok_embeddings is None else image_model.extra_tok_embeddings.num_embeddings
    )
    aggregator = TemporalAggregator(
        c.dim,
        agg.merge,
        n_latents=agg.n_latents,
        depth=agg.depth,
        n_heads=agg.n_heads,
        ffn_mult=agg.ffn_mult,
        max_frames=agg.max_frames,
        max_tokens=(enc.cfg.max_tiles * enc.num_tokens_per_tile) if agg.spatial else 0,
        motion=agg.motion,
        text_align=agg.contrastive > 0,
    )
    model = MultimodalLM(
        image_model.lm,
        image_model.image_encoder,
        xattn_layers=image_model.xattn_layers,
        hf_row_compat=next(iter(image_model.image_xattn.values())).hf_row_compat,
        trainable=VIDEO_PARTS,
        image_token_id=image_model.image_token_id,
        extra_tokens=n_extra,
        video_aggregator=aggregator,
        video_xattn_layers=layers,
        video_token_id=tok.video_id,
        image_aux=image_model.image_aux,  # the image stage's training-only head: kept, frozen, to match its bundle
    )
    model.image_xattn.load_state_dict(image_model.image_xattn.state_dict())
    if n_extra:
        model.extra_tok_embeddings.load_state_dict(image_model.extra_tok_embeddings.state_dict())
    model.set_trainable(VIDEO_PARTS)
    return model


def load_video_bundle(path: str | Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """Rebuild a trained video model from its bundle and the image bundle it names (both fingerprints checked)."""
    path = Path(path)
    meta = read_stage_config(path, VIDEO_STAGES)
    image = resolve_image_bundle(path, meta)
    image_model, tok, transform, _ = load_image_bundle(image)  # refuses a changed LM
    fp = fingerprint_tensors(image_path_state(image_model))
    if fp != meta["image_fingerprint"]:
        raise FrozenImagePathChanged(
            f"the image path at {image} has fingerprint {fp[:16]}..., but {path} was trained against "
            f"{meta['image_fingerprint'][:16]}...; refusing to combine them"
        )
    v = meta["video"]
    model = attach_video(image_model, tok, AggregatorConfig(**v["aggregator"]), v["xattn_layers"])
    load_adapter_weights(model, path)
    return model.eval(), tok, transform, meta


def load_speech_bundle(path: Path) -> tuple[SpeechLM, Tokenizer, AudioFeatures, dict[str, Any]]:
    """Rebuild a trained speech model from its bundle (refusing an LM whose fingerprint changed)."""
    meta = read_stage_config(path, SPEECH_STAGES)
    lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    enc_cfg = SpeechEncoderConfig(**meta["speech_encoder"])
    model = SpeechLM(
        lm,
        SpeechEncoder(enc_cfg),
        SpeechAdapter(enc_cfg.dim, lm.cfg.dim, SpeechAdapterConfig(**meta["speech_adapter"])),
    )
    load_adapter_weights(model, path)
    f = meta["features"]
    features = AudioFeatures(f["n_mels"], f["max_seconds"], f["too_long"], normalize=f["normalize"])
    return model.eval(), tok, features, meta
