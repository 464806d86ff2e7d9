"""The video stage's model: the image model plus a fresh video path (`attach_video`), the tensors of its frozen
image path and of its trained video path (the image path's tensors are the image model's own, not copies), and
the video model rebuilt from a trained bundle and the image bundle
it names (`load_video_bundle`, both fingerprints checked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mm.adapters import TemporalAggregator
from mm.adapters.temporal_aggregator import AggregatorConfig
from mm.datasets.tiling import TileTransform
from mm.formats.bundle import load_adapter_weights, resolve_image_bundle
from mm.lm import Tokenizer
from mm.models.loading import read_stage_config
from mm.models.multimodal import IMAGE_PATH_PARTS, VIDEO_PARTS, MultimodalLM
from mm.stages.image_model import load_image_bundle
from mm.training.freeze import fingerprint_tensors

VIDEO_STAGES = ("video",)


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
    take_tensors(model.image_xattn, image_model.image_xattn)
    if n_extra:
        take_tensors(model.extra_tok_embeddings, image_model.extra_tok_embeddings)
    model.set_trainable(VIDEO_PARTS)
    return model


def take_tensors(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """`dst`'s parameters and buffers become `src`'s (the same names and shapes), not copies: on a meta-device
    build a tensor still to be read from a bundle (`lazy_adapter_weights`) stays so, and each process of a sharded
    run reads only its rows of it."""
    mine = dict(dst.state_dict(keep_vars=True))
    for name, t in src.state_dict(keep_vars=True).items():
        if name not in mine or mine[name].shape != t.shape:
            raise ValueError(f"{name}: {tuple(t.shape)} has no counterpart of that shape in the video model")
        owner, _, attr = name.rpartition(".")
        module = dst.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = t
        else:
            module._buffers[attr] = t


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
