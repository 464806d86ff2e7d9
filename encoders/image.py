"""The image encoder of the Llama 3 image adapter (Llama 3 paper section 7.2; `paper-notes.md` section 3).

A timm VisionTransformer (`self.vit`, so timm weight files load into it unchanged) wrapped with the tiling
machinery of Llama 3.2 Vision. The data flow mirrors transformers' `MllamaVisionModel`, step by step:

    pixels (B, N, T, 3, S, S)          B samples, N images each, T <= max_tiles tiles of S x S pixels
    -> vit.patch_embed                 (B*N, T, P, D)
    -> + tanh(g_pre) * pre-tile aspect-ratio embedding       (patch tokens only, as Mllama)
    -> prefix tokens (class token, registers) ++ patches     (B*N, T, n, D), n = num_tokens_per_tile
    -> + (1 - tanh(g_pos)) * vit.pos_embed + tanh(g_pos) * tile position embedding[aspect_ratio_id]
    -> vit.norm_pre (Mllama's layernorm_pre) -> zero-pad every tile to a multiple of 8 tokens
    -> vit.blocks over all tiles of an image as ONE sequence (local encoder), with the padding mask
    -> vit.norm (Mllama's layernorm_post) -> + tanh(g_post) * post-tile aspect-ratio embedding
    -> gated global layers: h = x + tanh(g_attn) attn(norm(x)); h = h + tanh(g_ffn) mlp(norm(h))
    -> drop the padding tokens -> features = [final | chosen local blocks' outputs]  (B, N, T, n, (1+K) D)
    -> project (Linear with bias) to the LM width -> (B, N, T * n, out_dim)

Conventions (identical to Mllama, so its weights and its projector load without permutation):
- `intermediate_layers = (i, ...)`: i is the 0-based index of a local block. What is kept depends on
  `intermediate_from`:
  - "block_input" (default): the block's INPUT, as Meta's reference `VisionEncoder` (llama-models, which
    trained the released weights: it appends `x` before running block i) and transformers 4.45. Index 0 is the
    embedded tiles after `vit.norm_pre`; index i > 0 is block i - 1's output.
  - "block_output": the block's OUTPUT (before `vit.norm`), as transformers 5.x's `MllamaVisionEncoder`
    (its `hidden_states` tuple holds no embedding entry) and timm's `forward_intermediates(indices=[i])`.
  Released configs keep Meta's indices (3, 7, 15, 23, 30): read with "block_output" they feed the projector
  one block later than the weights were trained with. "block_input" index i equals "block_output" i - 1.
- Feature layout: channels [0, D) are the final output; the K intermediates follow interleaved per channel,
  channel c of intermediate k at D + c * K + k (Mllama's `torch.stack(..., dim=-1)`); `split_features` undoes it.
- `aspect_ratio_ids`: 1-based index into the supported aspect ratios, 0 = no image (padding).
- `aspect_ratio_mask` (B, N, T): 1 for real tiles, 0 for padding tiles.

Attention mask (`mask_mode`):
- "strict" (default): every query attends only to real tokens (real tiles, not the pad-to-8 tokens), so
  padding never changes real tiles' features; with one real tile the local encoder equals timm's forward.
- "mllama": Meta's and transformers' mask, `pad_q * pad_k * finfo.min`, which hides only padding->padding
  pairs; real tokens DO attend to padding tiles and pad-to-8 tokens. Needed for parity with released
  Llama 3.2 Vision weights (`config_from_mllama` selects it).

This module knows nothing of checkpoint formats: timm weight files (`ImageEncoderConfig.weights`) are read by
`mm.formats.timm`, transformers' Mllama names are mapped by `mm.formats.hf_mllama` (`config_from_mllama`,
`load_mllama_vision_state_dict`). The layers around the ViT live in `encoders/image_layers.py`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import nn

from .image_layers import AspectRatioEmbedding, CanvasPosition, ConvStem, GatedBlock

MASK_MODES = ("strict", "mllama")
INTERMEDIATE_FROM = ("block_input", "block_output")
STEMS = ("patch", "conv", "cnn")


@dataclass
class ImageEncoderConfig:
    """Shape of the image encoder; `None` overrides keep the timm model's own default."""

    timm_name: str = "vit_tiny_patch16_224"  # any timm VisionTransformer
    tile_size: int = 224
    patch_size: int = 16
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    qkv_bias: bool | None = None  # Mllama: False
    proj_bias: bool | None = None  # attention/MLP output biases; Mllama has none on the attention output
    pre_norm: bool | None = None  # LayerNorm before the blocks (timm `norm_pre`, no patch bias); Mllama: True
    norm_eps: float | None = None  # LayerNorm eps of every timm norm; timm: 1e-6, Mllama: 1e-5
    # timm weights file for `vit` (.safetensors, or a torch file), loaded by `mm.formats.timm.build_image_encoder`
    # (the stages build the encoder with it); `ImageEncoder` itself reads no file
    weights: str | None = None
    intermediate_layers: tuple[int, ...] = ()  # 0-based local block indices; Llama 3.2: (3, 7, 15, 23, 30)
    # which feature an index names: "block_input" (Meta's reference, transformers 4.45) or "block_output"
    # (transformers 5.x); see the module docstring
    intermediate_from: str = "block_input"
    n_global_layers: int = 0  # paper: 8
    max_tiles: int = 4
    max_aspect_ratio_id: int = 8  # number of supported aspect ratios (ids 1..8; 0 = padding)
    out_dim: int = 4096  # LM width
    mask_mode: str = "strict"  # "strict" or "mllama" (see module docstring)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # further create_model kwargs
    # "patch": timm's patch embedding (one patch_size x patch_size conv, as the paper's ViT-H/14);
    # "conv": a stack of stride-2 3x3 convolutions in its place (`ConvStem`);
    # "cnn": full-resolution 3x3 convolutions, each followed by a 2x2 max pool (`ConvStem(pool=True)`), a small
    # classic CNN in place of the patch projection: the one stem that learned the world's shapes quickly here
    stem: str = "patch"
    stem_channels: tuple[int, ...] = ()  # conv stem widths, one per stride-2 conv (default: up to embed_dim)
    # true: every output token also gets a learned embedding of where it sits on the whole image's canvas
    # (Fourier features of its centre's x and y across the tile grid, `CanvasPosition`), so a cross-attention
    # query can prefer the leftmost object with a logit that falls with x; the ViT's own position embeddings
    # are per tile, and the gated tile embeddings start at 0
    canvas_position: bool = False

    def __post_init__(self) -> None:
        self.intermediate_layers = tuple(int(i) for i in self.intermediate_layers)
        if self.intermediate_from not in INTERMEDIATE_FROM:
            raise ValueError(
                f"ImageEncoderConfig.intermediate_from={self.intermediate_from!r}; expected one of "
                f"{INTERMEDIATE_FROM}"
            )
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"ImageEncoderConfig.mask_mode={self.mask_mode!r}; expected one of {MASK_MODES}")
        if self.tile_size % self.patch_size != 0:
            raise ValueError(
                f"ImageEncoderConfig.tile_size={self.tile_size} must be a multiple of patch_size={self.patch_size}"
            )
        for name in ("max_tiles", "max_aspect_ratio_id", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        self.stem_channels = tuple(int(c) for c in self.stem_channels)
        if self.stem not in STEMS:
            raise ValueError(f"ImageEncoderConfig.stem={self.stem!r}; expected one of {STEMS}")
        n_convs = self.patch_size.bit_length() - 1
        if self.stem != "patch" and (self.patch_size != 1 << n_convs or n_convs < 1):
            raise ValueError(
                f"ImageEncoderConfig.patch_size={self.patch_size}: the conv stem needs a power of two >= 2"
            )
        if self.stem_channels and len(self.stem_channels) != n_convs:
            raise ValueError(
                f"ImageEncoderConfig.stem_channels={list(self.stem_channels)}: expected {n_convs} widths, one per "
                f"stride-2 conv of patch_size={self.patch_size}"
            )
        if self.n_global_layers < 0:
            raise ValueError(f"ImageEncoderConfig.n_global_layers must be >= 0, got {self.n_global_layers}")


def create_vit(cfg: ImageEncoderConfig) -> VisionTransformer:
    """The timm VisionTransformer of `cfg` (random init, no classifier head, no pooling)."""
    overrides = {
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "pre_norm": cfg.pre_norm,
        "norm_layer": None if cfg.norm_eps is None else partial(LayerNorm, eps=cfg.norm_eps),
    }
    kwargs = {k: v for k, v in overrides.items() if v is not None} | dict(cfg.timm_kwargs)
    vit = timm.create_model(
        cfg.timm_name,
        pretrained=False,
        img_size=cfg.tile_size,
        patch_size=cfg.patch_size,
        num_classes=0,
        global_pool="",
        **kwargs,
    )
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"timm model {cfg.timm_name!r} is a {type(vit).__name__}, not a VisionTransformer")
    if vit.dynamic_img_size or not isinstance(vit.patch_drop, nn.Identity):
        raise ValueError(
            f"timm model {cfg.timm_name!r}: dynamic_img_size and patch dropout are not supported"
        )
    if cfg.stem == "conv":
        vit.patch_embed.proj = ConvStem(cfg.patch_size, vit.embed_dim, cfg.stem_channels)
    elif cfg.stem == "cnn":
        vit.patch_embed.proj = ConvStem(cfg.patch_size, vit.embed_dim, cfg.stem_channels, pool=True)
    return vit


class ImageEncoder(nn.Module):
    """Tiled ViT image encoder with multi-layer features and gated global layers (see module docstring).

    forward: pixel_values (B, N, T, 3, S, S), aspect_ratio_ids (B, N), aspect_ratio_mask (B, N, T)
             -> (B, N, T * num_tokens_per_tile, out_dim). T may be below max_tiles (the trailing tiles'
             embeddings are then unused); Mllama always passes T = max_tiles.
    """

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = create_vit(cfg)
        D, depth = self.vit.embed_dim, len(self.vit.blocks)
        bad = [i for i in cfg.intermediate_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"ImageEncoderConfig.intermediate_layers {bad} out of range: the ViT has blocks 0..{depth - 1}"
            )
        n_tok = self.num_tokens_per_tile
        self.pre_tile = AspectRatioEmbedding(cfg.max_aspect_ratio_id, cfg.max_tiles, D)
        self.pos_gate = nn.Parameter(torch.zeros(1))
        self.tile_pos_embed = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_tiles * n_tok * D)
        nn.init.normal_(self.tile_pos_embed.weight, std=0.02)
        self.post_tile = AspectRatioEmbedding(cfg.max_aspect_ratio_id, cfg.max_tiles, D)
        self.global_layers = nn.ModuleList(
            GatedBlock(self._fresh_block()) for _ in range(cfg.n_global_layers)
        )
        self.project = nn.Linear(self.features_dim, cfg.out_dim, bias=True)
        grid = self.vit.patch_embed.grid_size[0]
        self.canvas_position = (
            CanvasPosition(cfg.max_tiles, grid, self.vit.num_prefix_tokens, cfg.out_dim)
            if cfg.canvas_position
            else None
        )

    def _fresh_block(self) -> Block:
        """A newly initialised block built exactly like the ViT's own (same norm, act, biases, width)."""
        block = copy.deepcopy(self.vit.blocks[0])
        for m in block.modules():
            init_weights_vit_timm(m)
        return block

    @property
    def width(self) -> int:
        """Token width D of the ViT."""
        return self.vit.embed_dim

    @property
    def num_tokens_per_tile(self) -> int:
        """Tokens per tile in the output: patches plus prefix tokens (class token, registers)."""
        return self.vit.patch_embed.num_patches + self.vit.num_prefix_tokens

    @property
    def features_dim(self) -> int:
        """Width of the pre-projection features: (1 + len(intermediate_layers)) * D."""
        return (1 + len(self.cfg.intermediate_layers)) * self.width

    # ---- pieces -------------------------------------------------------------------------------------
    def _add_positions(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor, T: int) -> torch.Tensor:
        """Patch tokens (BN*T, P, D) -> prefix ++ patches with gated position + tile embeddings (BN, T, n, D)."""
        vit = self.vit
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        pos = None if vit.pos_embed is None else (1 - self.pos_gate.tanh()) * vit.pos_embed
        if pos is not None and vit.no_embed_class:
            x = x + pos
        x = torch.cat([*prefix, x], dim=1)
        if pos is not None and not vit.no_embed_class:
            x = x + pos
        n_tok, D = x.shape[1:]
        x = x.view(-1, T, n_tok, D)
        tile = self.tile_pos_embed(aspect_ratio_ids).view(-1, self.cfg.max_tiles, n_tok, D)[:, :T]
        x = x + self.pos_gate.tanh() * tile
        return vit.pos_drop(x)

    def attention_mask(
        self, aspect_ratio_mask: torch.Tensor, n_tok: int, L: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask for tiles padded to L tokens: (BN, T) -> (BN, 1, 1, T*L) strict or (BN, 1, T*L, T*L)."""
        BN, T = aspect_ratio_mask.shape
        real = aspect_ratio_mask.bool()[:, :, None].expand(BN, T, L).clone()
        real[:, :, n_tok:] = False  # the pad-to-8 tokens of every tile
        real = real.reshape(BN, T * L)
        neg = torch.finfo(dtype).min
        if self.cfg.mask_mode == "strict":
            hidden = ~real[:, None, None, :]  # no query sees a padding key
        else:
            pad = ~real  # Mllama: only padding queries x padding keys are hidden
            hidden = (pad[:, :, None] & pad[:, None, :]).unsqueeze(1)
        return torch.zeros(hidden.shape, dtype=dtype, device=real.device).masked_fill(hidden, neg)

    def encode(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final output (B, N, T, n, D) and the chosen local blocks' outputs, each (B, N, T, n, D)."""
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be (B, N, T, C, S, S), got shape {tuple(pixel_values.shape)}"
            )
        B, N, T, C, H, W = pixel_values.shape
        S = self.cfg.tile_size
        if (H, W) != (S, S) or T > self.cfg.max_tiles:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)}: expected tiles of {S}x{S} and at most "
                f"max_tiles={self.cfg.max_tiles} tiles"
            )
        if tuple(aspect_ratio_ids.shape) != (B, N) or tuple(aspect_ratio_mask.shape) != (B, N, T):
            raise ValueError(
                f"aspect_ratio_ids {tuple(aspect_ratio_ids.shape)} / aspect_ratio_mask "
                f"{tuple(aspect_ratio_mask.shape)} must be {(B, N)} / {(B, N, T)}"
            )
        BN, vit = B * N, self.vit
        ids = aspect_ratio_ids.reshape(BN)

        x = vit.patch_embed(pixel_values.reshape(BN * T, C, H, W))  # (BN*T, P, D)
        P, D = x.shape[1:]
        x = self.pre_tile(x.view(BN, T, P, D), ids)  # (BN, T, P, D)
        x = self._add_positions(x.view(BN * T, P, D), ids, T)  # (BN, T, n, D)
        x = vit.norm_pre(x)
        n_tok = x.shape[2]
        # Mllama pads every tile to a multiple of 8 tokens and lets real tokens see them; with the strict mask
        # no query sees a pad token, so strict mode skips the padding (same outputs, less compute).
        L = n_tok + (-n_tok) % 8 if self.cfg.mask_mode == "mllama" else n_tok
        x = F.pad(x, (0, 0, 0, L - n_tok))  # (BN, T, L, D)
        mask = self.attention_mask(aspect_ratio_mask.reshape(BN, T), n_tok, L, x.dtype)

        x = x.reshape(BN, T * L, D)
        kept: dict[int, torch.Tensor] = {}
        before = self.cfg.intermediate_from == "block_input"
        for i, blk in enumerate(vit.blocks):
            if before and i in self.cfg.intermediate_layers:
                kept[i] = x
            x = blk(x, attn_mask=mask)  # (BN, T*L, D)
            if not before and i in self.cfg.intermediate_layers:
                kept[i] = x
        x = vit.norm(x)
        x = self.post_tile(x.view(BN, T, L, D), ids).view(BN, T * L, D)
        for layer in self.global_layers:
            x = layer(x, attn_mask=mask)

        def unpad(h: torch.Tensor) -> torch.Tensor:
            return h.view(B, N, T, L, D)[:, :, :, :n_tok]

        return unpad(x), [unpad(kept[i]) for i in self.cfg.intermediate_layers]

    def forward_features(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Pre-projection features (B, N, T, n, (1 + K) * D) in Mllama's layout (see `split_features`)."""
        final, inters = self.encode(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        if not inters:
            return final
        return torch.cat([final, torch.stack(inters, dim=-1).flatten(-2)], dim=-1)

    def split_features(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Inverse of the concatenation: features (..., (1 + K) * D) -> final (..., D), K x (..., D)."""
        D, K = self.width, len(self.cfg.intermediate_layers)
        inters = features[..., D:].unflatten(-1, (D, K))
        return features[..., :D], [inters[..., k] for k in range(K)]

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image tokens in the LM width: (B, N, T, 3, S, S) -> (B, N, T * num_tokens_per_tile, out_dim)."""
        feats = self.forward_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        B, N, T, n, _ = feats.shape
        out = self.project(feats)  # (B, N, T, n, out_dim)
        if self.canvas_position is not None:
            out = out + self.canvas_position(aspect_ratio_ids, T)
        return out.view(B, N, T * n, -1)
