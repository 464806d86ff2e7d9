"""The layers the image encoder adds around its timm ViT: gated aspect-ratio (tile) embeddings, gated global
layers, the convolutional stems and the canvas-position embedding (see `encoders/image.py`)."""

from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import nn


class AspectRatioEmbedding(nn.Module):
    """Gated per-tile embedding chosen by aspect-ratio id: x (BN, T, L, D) + tanh(gate) * E[id] (BN, T, 1, D)."""

    def __init__(self, max_aspect_ratio_id: int, max_tiles: int, dim: int) -> None:
        super().__init__()
        self.max_tiles, self.dim = max_tiles, dim
        self.embedding = nn.Embedding(max_aspect_ratio_id + 1, max_tiles * dim)
        self.gate = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (BN, T, L, D), ids (BN,) -> (BN, T, L, D)."""
        T = x.shape[1]
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.dim)[:, :T]
        return x + emb * self.gate.tanh()


class GatedBlock(nn.Module):
    """A timm `Block` whose attention and MLP outputs are scaled by tanh(gate): the paper's global layers.

    h = x + tanh(g_attn) * attn(norm1(x)); out = h + tanh(g_ffn) * mlp(norm2(h)). Gates start at 0 (identity).
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        if not isinstance(block, Block):
            raise TypeError(
                f"gated global layers need timm's vision_transformer.Block, got {type(block).__name__}"
            )
        self.block = block
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        b = self.block
        h = x + self.gate_attn.tanh() * b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask)))
        return h + self.gate_ffn.tanh() * b.drop_path2(b.ls2(b.mlp(b.norm2(h))))


class ConvStem(nn.Module):
    """Convolutional patch embedding ("Early Convolutions Help Transformers See Better", Xiao et al. 2021).

    log2(patch_size) blocks of [3x3 conv, stride 2 (-> channel LayerNorm after the first) -> GELU], then a
    1x1 conv to the ViT width:
    (B, 3, S, S) -> (B, D, S / patch_size, S / patch_size), the shape of timm's patch projection, so it takes
    the place of `vit.patch_embed.proj`. Each token then sees a neighbourhood of overlapping receptive fields
    instead of one disjoint patch, which lets a small ViT tell shapes apart at a few pixels' size.
    The first conv has no norm: a per-pixel LayerNorm over a linear map of RGB keeps only the direction of the
    colour's projection (measured: colour read from the features fell from 0.80 to 0.37); without any norm the
    stem's output starts too small and CLIP pretraining stalled (held-out retrieval 0.08). BatchNorm would make a
    sample's features depend on its batch.

    With `pool` (the "cnn" stem) each stage is [3x3 conv, stride 1 -> 2x2 max pool -> ReLU]: the same function
    as conv -> ReLU -> pool (ReLU is monotone, so it commutes with the max; gradients agree too), with the
    ReLU and its backward on a quarter of the values. The convolutions run channels-last (NHWC, oneDNN's
    native layout on CPU: no reorder per call); measured on the image-pretrain step (AMD EPYC, 2 threads): the
    two together 1.17x on forward + backward.
    """

    def __init__(
        self,
        patch_size: int,
        embed_dim: int,
        channels: tuple[int, ...] = (),
        pool: bool = False,
    ) -> None:
        super().__init__()
        n = patch_size.bit_length() - 1
        if not channels:  # double per stage, ending at embed_dim (at least 16 wide)
            channels = tuple(max(16, embed_dim >> (n - 1 - i)) for i in range(n))
        layers: list[nn.Module] = []
        c_in = 3
        if pool:  # [3x3 conv (stride 1) -> 2x2 max pool -> ReLU] per stage, no norm (class docstring)
            for c in channels:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()]
                c_in = c
            channels = ()
        for i, c in enumerate(channels):
            norm: list[nn.Module] = [LayerNorm2d(c)] if i else []
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=i == 0), *norm, nn.GELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D, S / patch_size, S / patch_size) (channels-last strides)."""
        return self.layers(x.contiguous(memory_format=torch.channels_last))


def tile_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (rows, columns) in aspect-ratio-id order (id k is grid k-1), as Mllama numbers them."""
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


class CanvasPosition(nn.Module):
    """Learned embedding of each output token's place on the image canvas: (x, y) in [0, 1] of the token's
    centre across the whole tile grid -> [x, y, sin(k pi x), cos(k pi x), sin(k pi y), cos(k pi y)]_k -> Linear.

    Prefix tokens (class token) get the canvas centre. Pure function of the aspect-ratio id and token index.
    """

    def __init__(self, max_tiles: int, grid: int, n_prefix: int, dim: int, n_freqs: int = 4) -> None:
        super().__init__()
        self.max_tiles, self.grid, self.n_prefix, self.n_freqs = max_tiles, grid, n_prefix, n_freqs
        self.proj = nn.Linear(2 + 4 * n_freqs, dim)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        table = [torch.zeros(max_tiles, n_prefix + grid * grid, 2)]  # id 0 (padding image)
        for rows, cols in tile_grids(max_tiles):
            xy = torch.full((max_tiles, n_prefix + grid * grid, 2), 0.5)
            ij = torch.arange(grid * grid)
            for t in range(min(max_tiles, rows * cols)):
                r, c = divmod(t, cols)
                xy[t, n_prefix:, 0] = (c * grid + ij % grid + 0.5) / (cols * grid)
                xy[t, n_prefix:, 1] = (r * grid + ij // grid + 0.5) / (rows * grid)
            table.append(xy)
        self.register_buffer("coords", torch.stack(table), persistent=False)  # (ids, max_tiles, n, 2)

    def forward(self, aspect_ratio_ids: torch.Tensor, T: int) -> torch.Tensor:
        """ids (B, N) -> embeddings (B, N, T, n, dim) for the first T tiles."""
        xy = self.coords[aspect_ratio_ids.clamp(max=self.coords.shape[0] - 1)][:, :, :T]  # (B, N, T, n, 2)
        k = torch.arange(1, self.n_freqs + 1, device=xy.device, dtype=xy.dtype) * math.pi
        ang = xy[..., None] * k  # (B, N, T, n, 2, F)
        feats = torch.cat([xy, ang.sin().flatten(-2), ang.cos().flatten(-2)], dim=-1)
        return self.proj(feats.to(self.proj.weight.dtype))
