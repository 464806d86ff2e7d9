"""Media keyed by modality: what `MultimodalLM` knows of each cross-attention modality (`MODALITIES`), the
per-prompt media state (`MediaContext`), what a forward takes per modality (`MediaInput`) and the mask that
says which media tokens each text token sees.

A modality is one entry of `MODALITIES`: the model attributes that hold its parts (its encoder path and its
gated cross-attention blocks, one per LM layer it joins), the attribute holding the id of its placeholder token
in the text (`<|image|>`, `<|video|>`), and the model method that builds its `MediaContext`. A forward takes
`media={"image": MediaInput(ctx, mask), "video": ...}`; a new modality adds an entry, not arguments.

Mask rule (the `MllamaProcessor` layout, `mm.datasets.collate`): an image's span runs from its `<|image|>`
token up to the next image token; consecutive image tokens form a run whose images all span to the end of the
run's span; tokens before the first image see none. So a text token sees the latest image (or run of images)
placed before it. Several images per sample sit anywhere in the row: the context holds their tokens one image
after the other, the mask (B, T, N_img, max_tiles) says which of them each token sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mm.datasets.collate import cross_attention_mask_from_tokens
from mm.lm import KVCache

__all__ = [
    "MODALITIES",
    "MediaContext",
    "MediaInput",
    "Modality",
    "expand_cross_attention_mask",
    "media_mask",
    "scatter_kv",
]


@dataclass(frozen=True)
class Modality:
    """Where a cross-attention modality lives on `MultimodalLM` (attribute names, so state-dict keys stay put)."""

    parts: tuple[str, ...]  # its modules (state-dict prefixes), trainable or frozen together per stage
    xattn: str  # the nn.ModuleDict of its gated cross-attention blocks, keyed by LM layer index
    token_id: str  # the attribute holding the id of its placeholder token in the text
    encode: str  # the method that builds its MediaContext from the encoder's inputs


# In the order their blocks run before an LM layer: the video block before the image block.
MODALITIES: dict[str, Modality] = {
    "video": Modality(("video_aggregator", "video_xattn"), "video_xattn", "video_token_id", "encode_video"),
    "image": Modality(
        ("image_encoder", "image_xattn", "extra_tok_embeddings", "image_aux", "image_index"),
        "image_xattn",
        "image_token_id",
        "encode_media",
    ),
}


@dataclass
class MediaContext:
    """Per-prompt media state: K/V per cross-attention layer, and the mask row new tokens inherit."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    n_media_tokens: int  # M = images x tiles x tokens per tile
    tokens_per_tile: int
    last_mask: torch.Tensor | None = (
        None  # (B, M): what the last prompt token sees; decoded tokens see it too
    )
    extra: dict = field(default_factory=dict)


@dataclass
class MediaInput:
    """One modality's media for a forward: its `context` (from the modality's encode method, once per prompt)
    and optionally its cross-attention `mask` (B, T, N_img, max_tiles); without one the mask is inherited while
    decoding, else derived from the modality's placeholder tokens (`media_mask`). `rows` (B_m,) names the rows
    of the batch the context belongs to when only some rows hold this modality (chat batches): the mask then
    still covers every row, and rows without media see none."""

    context: MediaContext
    mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def scatter_kv(
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, batch: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """K/V of some rows (B_m, ...) placed at `rows` of a zero (batch, ...) K/V (differentiable)."""
    out = {}
    for i, (k, v) in kv.items():
        full = [x.new_zeros((batch, *x.shape[1:])).index_copy(0, rows.to(x.device), x) for x in (k, v)]
        out[i] = (full[0], full[1])
    return out


def expand_cross_attention_mask(mask: torch.Tensor, tokens_per_tile: int) -> torch.Tensor:
    """Mllama-format mask (B, T, N_img, max_tiles) -> per media token (B, T, N_img*max_tiles*P), bool."""
    B, T = mask.shape[:2]
    return mask.bool().repeat_interleave(tokens_per_tile, dim=3).reshape(B, T, -1)


def media_mask(
    tokens: torch.Tensor, media: MediaInput, cache: KVCache | None, token_id: int | None, what: str
) -> torch.Tensor:
    """Per media token mask (B, T, M): given, inherited while decoding, or derived from the media tokens."""
    B, T = tokens.shape
    ctx = media.context
    if media.mask is not None:
        xmask = expand_cross_attention_mask(media.mask, ctx.tokens_per_tile)
        if xmask.shape[-1] != ctx.n_media_tokens:
            raise ValueError(
                f"{what} cross-attention mask covers {xmask.shape[-1]} media tokens, the {what} has "
                f"{ctx.n_media_tokens}"
            )
    elif ctx.last_mask is not None and cache is not None and (cache.static or cache.length > 0):
        xmask = ctx.last_mask[:, None, :].expand(B, T, -1)  # decoding: see what the prompt's end saw
    elif token_id is not None:  # the paper's rule, from the media tokens in the text
        tile_mask = ctx.extra["tile_mask"]  # (B, N_img, max_tiles)
        n_tiles = tile_mask.sum(-1).tolist()  # real tiles per image
        ids = ctx.extra.get("aspect_ratio_ids")
        if ids is not None:  # padding images (id 0, as MllamaProcessor pads rows) have no image token
            n_tiles = [[n for n, i in zip(r, ri) if i != 0] for r, ri in zip(n_tiles, ids.tolist())]
        cam = cross_attention_mask_from_tokens(tokens, token_id, n_tiles, tile_mask.shape[-1])
        cam = F.pad(cam, (0, 0, 0, tile_mask.shape[1] - cam.shape[2]))  # (B, T, N_img, max_tiles)
        xmask = expand_cross_attention_mask(cam, ctx.tokens_per_tile)
    else:
        raise ValueError(f"{what} given without a cross-attention mask and no {what} token id to derive it")
    ctx.last_mask = xmask[:, -1]
    return xmask
