"""Where the gated cross-attention blocks sit in the LM: before every k-th layer, or before listed layers;
video blocks before every k-th image cross-attention layer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mm.adapters import CrossAttentionBlock
from mm.lm.config import LMConfig


def xattn_layer_ids(n_layers: int, every: int) -> list[int]:
    """LM layer indices preceded by a cross-attention block: every k-th layer (k-1, 2k-1, ...)."""
    if every < 1 or every > n_layers:
        raise ValueError(f"cross-attention interval every={every} must be in [1, n_layers={n_layers}]")
    return [i for i in range(n_layers) if i % every == every - 1]


def check_xattn_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """An explicit placement: distinct LM layer indices in [0, n_layers), returned sorted."""
    ids = sorted(int(i) for i in layers)
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(
            f"cross-attention layers {list(layers)}: expected distinct LM layer indices in [0, {n_layers})"
        )
    return ids


def video_xattn_layer_ids(image_layers: Sequence[int], every: int) -> list[int]:
    """LM layers whose image cross-attention block gets a video block before it: every k-th image block."""
    if every < 1:
        raise ValueError(f"video cross-attention interval every={every} must be >= 1")
    layers = sorted(image_layers)
    ids = [i for k, i in enumerate(layers) if k % every == every - 1]
    if not ids:
        raise ValueError(
            f"video cross-attention every {every} image cross-attention layers: there are only {len(layers)} "
            f"image cross-attention layers ({layers}); choose every <= {len(layers)} or explicit layers"
        )
    return ids


def xattn_blocks(c: LMConfig, layers: Sequence[int], hf_row_compat: bool) -> nn.ModuleDict:
    """A fresh gated cross-attention block (the LM's width and heads) before each of `layers`."""
    return nn.ModuleDict(
        {
            str(i): CrossAttentionBlock(
                c.dim, c.n_heads, c.n_kv_heads, c.hd, c.hidden_dim, c.norm_eps, hf_row_compat=hf_row_compat
            )
            for i in layers
        }
    )
