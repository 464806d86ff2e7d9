"""Temporal aggregator of the video adapter: a perceiver resampler that merges every M consecutive frames into
one effective frame (Llama 3 paper §7.5; `paper-notes.md` §4; the resampler follows Flamingo's
`PerceiverResampler`, Alayrac et al. 2022, and open_flamingo's `helpers.py`).

    frames (B, F, N, D)  N tokens per frame (the image encoder's output, in the LM width D)
    -> LayerNorm + time embedding[f]  (learned, one per frame position f < max_frames; the norm puts the frame
                                       tokens on the embeddings' scale whatever the encoder's output scale)
                 + space embedding[n] (learned, one per token position n < max_tokens; optional, max_tokens > 0):
                                       the latents then see where a token sits in its frame, not only what it
                                       holds, so motion (the same object at other positions over time) is
                                       readable from the pooled latents
                 + W_motion (x[f] - x[f-1]) (optional, motion=True; 0 for the first frame; W_motion starts at 0):
                                       what changed at each token since the previous frame. Attention that
                                       selects tokens by place then sums these differences over time, which
                                       telescopes to "last minus first frame" there: the direction of motion
                                       becomes one latent's linear read-out instead of a comparison between
                                       latents (measured: through the frozen LM the latents of the plain
                                       aggregator never learned direction)
    -> groups of M consecutive frames: (B*G, M*N, D), G = F / M
    -> learned latents (L, D) attend to concat(group tokens, latents), then an FFN; `depth` times
    -> LayerNorm -> (B, G, L, D): G effective frames of L tokens each

The paper merges 16 frames into 1 in pretraining and 32 into 1 (64 frames -> 2) in fine-tuning. A token mask
(B, N) hides padding tiles (clips whose grid has fewer tiles than `max_tiles`); the latents are always visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AggregatorConfig:
    """The perceiver-resampler temporal aggregator."""

    merge: int = 16  # frames merged into one effective frame (paper: 16 pretraining, 32 fine-tuning)
    n_latents: int = 64  # tokens per effective frame
    depth: int = 2
    n_heads: int = 8
    ffn_mult: int = 4
    max_frames: int = 64  # time embeddings
    spatial: bool = True  # a learned embedding per token position of a frame (where the object is)
    motion: bool = True  # + a learned projection of each token's change since the previous frame
    # Weight of a video-text contrastive loss in the video stage (0 = off): each clip's mean latent (through a
    # learned projection) against the mean of the frozen LM's token embeddings of every caption in the batch
    # (identical captions count as positives). The caption loss reaches the aggregator only through the gated
    # cross-attention, and what it asks of the latents is learned slowly there: measured, the latents never
    # came to encode the direction of motion, although the frozen LM reads it (direction 0.995) from an
    # aggregator that does. The contrastive loss asks for it directly, from the same video-text pairs.
    contrastive: float = 0.0

    def __post_init__(self) -> None:
        if self.contrastive < 0:
            raise ValueError(f"aggregator.contrastive must be >= 0 (0 = off), got {self.contrastive}")


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents): q from the latents, k/v from both (Flamingo)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self, media: torch.Tensor, latents: torch.Tensor, media_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """media (B, N, D), latents (B, L, D), media_mask bool (B, N) True = real -> (B, L, D)."""
        B, N, _ = media.shape
        L = latents.shape[1]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.wq(latents).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.wkv(torch.cat([media, latents], dim=1)).view(B, N + L, 2, self.n_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, N+L, hd)
        mask = None
        if media_mask is not None:
            mask = torch.cat([media_mask, media_mask.new_ones(B, L)], dim=1)[
                :, None, None, :
            ]  # (B, 1, 1, N+L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class PerceiverFeedForward(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (Flamingo's FeedForward)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w1 = nn.Linear(dim, mult * dim, bias=False)
        self.w2 = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        return self.w2(F.gelu(self.w1(self.norm(x))))


class TemporalAggregator(nn.Module):
    """Perceiver resampler over time: every `merge` consecutive frames -> `n_latents` tokens (see module doc)."""

    def __init__(
        self,
        dim: int,
        merge: int,
        *,
        n_latents: int = 64,
        depth: int = 2,
        n_heads: int = 8,
        head_dim: int | None = None,
        ffn_mult: int = 4,
        max_frames: int = 64,
        max_tokens: int = 0,
        motion: bool = False,
        text_align: bool = False,
    ) -> None:
        super().__init__()
        if merge < 1 or max_frames < 1 or n_latents < 1 or depth < 1 or max_tokens < 0:
            raise ValueError(
                f"merge, max_frames, n_latents and depth must be >= 1 and max_tokens >= 0, got merge={merge}, "
                f"max_frames={max_frames}, n_latents={n_latents}, depth={depth}, max_tokens={max_tokens}"
            )
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"n_heads={n_heads} must divide dim={dim} (or give head_dim)")
            head_dim = dim // n_heads
        self.dim, self.merge, self.max_frames = dim, merge, max_frames
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.norm_frames = nn.LayerNorm(dim)
        self.time_embed = nn.Parameter(torch.randn(max_frames, dim))
        self.space_embed = nn.Parameter(torch.randn(max_tokens, dim)) if max_tokens else None
        self.motion = nn.Linear(dim, dim, bias=False) if motion else None
        # Video-text alignment head (`align_logits`): pooled latents -> the space of the LM's token embeddings.
        self.align = nn.Linear(dim, dim, bias=False) if text_align else None
        self.align_log_scale = nn.Parameter(torch.tensor(2.3)) if text_align else None  # exp -> about 10
        if self.motion is not None:
            nn.init.zeros_(self.motion.weight)  # starts as the plain aggregator
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, n_heads, head_dim), PerceiverFeedForward(dim, ffn_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def align_vectors(self, aggregated: torch.Tensor) -> torch.Tensor:
        """Unit vectors (B, D) of clips' mean latents (B, G, L, D) through the alignment head."""
        if self.align is None or self.align_log_scale is None:
            raise ValueError("this aggregator has no alignment head (build it with text_align=True)")
        return F.normalize(self.align(aggregated.mean((1, 2))), dim=-1)

    def align_logits(self, aggregated: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (B, B) x learned scale of clips' mean latents (B, G, L, D) and texts (B, D)."""
        v = self.align_vectors(aggregated)
        return v @ F.normalize(text.to(v.dtype), dim=-1).T * self.align_log_scale.exp()

    @property
    def n_latents(self) -> int:
        """Tokens per effective frame."""
        return self.latents.shape[0]

    def n_groups(self, n_frames: int) -> int:
        """Effective frames of a clip of `n_frames` frames."""
        if n_frames % self.merge or not 1 <= n_frames <= self.max_frames:
            raise ValueError(
                f"{n_frames} frames: expected a multiple of merge={self.merge} in [1, max_frames={self.max_frames}]"
            )
        return n_frames // self.merge

    def forward(self, frames: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames (B, F, N, D), token_mask bool (B, N) True = real token -> (B, F / merge, n_latents, D)."""
        B, Fr, N, D = frames.shape
        G, M = self.n_groups(Fr), self.merge
        normed = self.norm_frames(frames)
        x = normed + self.time_embed[:Fr, None, :].to(frames.dtype)  # (B, F, N, D)
        if self.motion is not None:
            x = x + self.motion(F.pad(normed[:, 1:] - normed[:, :-1], (0, 0, 0, 0, 1, 0)))
        if self.space_embed is not None:
            if N > self.space_embed.shape[0]:
                raise ValueError(f"{N} tokens per frame: more than max_tokens={self.space_embed.shape[0]}")
            x = x + self.space_embed[:N].to(frames.dtype)
        x = x.reshape(B * G, M * N, D)  # consecutive frames of a group side by side
        mask = None
        if token_mask is not None:
            if tuple(token_mask.shape) != (B, N):
                raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, expected {(B, N)}")
            mask = token_mask.bool().repeat(1, M).repeat_interleave(G, dim=0)  # (B*G, M*N)
        lat = self.latents.to(frames.dtype).expand(B * G, -1, -1)  # (B*G, L, D)
        for attn, ffn in self.layers:
            lat = lat + attn(x, lat, mask)
            lat = lat + ffn(lat)
        return self.norm(lat).view(B, G, self.n_latents, D)
