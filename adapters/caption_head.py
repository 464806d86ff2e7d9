"""An auxiliary head that asks the image path directly for every word of the caption (training only).

The caption loss reaches the image encoder only through the frozen LM and the gated cross-attention, whose
gates start at 0: early in training almost no gradient flows back, and what does flow is shaped by how the
LM happens to read the media. This head gives the image path a short path to the same target, as the speech
adapter's CTC head (`adapters/speech.py`) and the video stage's contrastive loss do for their paths:

    slots (S learned queries) -> `depth` Transformer decoder layers reading the media tokens (B, M, D)
    -> slot k names the caption's k-th token: cosine against the frozen LM's token embeddings x exp(scale)

so the media tokens the cross-attention reads must carry each object's attributes and where the object is
(the k-th word of "a large red circle and a small blue square" depends on which object is on the left). The
head is trained with the image path and never used when captioning. Tokens past S are not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CaptionHeadConfig:
    """The auxiliary caption head on the media tokens (`adapters.CaptionSlotHead`; training only)."""

    weight: float = 0.0  # its loss is added to the caption loss with this weight (0 = no head)
    n_slots: int = 16  # caption tokens it names (the shapes world's longest caption has 11 + the end token)
    depth: int = 2
    n_heads: int = 4
    # weight of a caption bag-of-words loss on the max-pooled media tokens (which words the caption holds),
    # per caption token; needs the head (weight > 0)
    bag_of_words: float = 0.0

    def __post_init__(self) -> None:
        if self.bag_of_words < 0:
            raise ValueError(f"caption_head.bag_of_words must be >= 0 (0 = off), got {self.bag_of_words}")
        if self.weight < 0:
            raise ValueError(f"caption_head.weight must be >= 0 (0 = off), got {self.weight}")


class CaptionSlotHead(nn.Module):
    """S slot queries read the media tokens; slot k scores every token id as the caption's k-th token."""

    def __init__(self, dim: int, n_slots: int = 16, depth: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        if n_slots < 1 or depth < 1:
            raise ValueError(f"CaptionSlotHead needs n_slots >= 1 and depth >= 1, got {n_slots}, {depth}")
        if dim % n_heads:
            raise ValueError(f"CaptionSlotHead: n_heads={n_heads} must divide the width {dim}")
        self.slots = nn.Parameter(torch.randn(n_slots, dim) * 0.02)
        self.media_norm = nn.LayerNorm(dim)
        layer = nn.TransformerDecoderLayer(
            dim, n_heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))
        self.log_scale = nn.Parameter(torch.full((1,), 2.3))  # exp -> about 10, as the speech CTC head
        # bag of words: each channel's largest value over the real media tokens -> which words the caption holds
        self.bow_proj = nn.Linear(dim, dim)
        self.bow_log_scale = nn.Parameter(torch.full((1,), 2.3))

    @property
    def n_slots(self) -> int:
        """How many caption tokens the head names (S)."""
        return self.slots.shape[0]

    def forward(
        self, media: torch.Tensor, media_mask: torch.Tensor, token_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """media (B, M, D), media_mask bool (B, M) True = real token, table (V, D) -> logits (B, S, V)."""
        B = media.shape[0]
        queries = self.slots[None].expand(B, -1, -1).to(media.dtype)
        out = self.decoder(queries, self.media_norm(media), memory_key_padding_mask=~media_mask)
        table = F.normalize(token_embeddings.to(out.dtype), dim=-1)
        return F.normalize(out, dim=-1) @ table.T * self.log_scale.exp()

    def bag_of_words_logits(
        self, media: torch.Tensor, media_mask: torch.Tensor, token_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """media (B, M, D), media_mask (B, M), table (V, D) -> (B, V): max over real tokens, then cosine."""
        pooled = media.masked_fill(~media_mask[..., None], torch.finfo(media.dtype).min).amax(1)  # (B, D)
        out = F.normalize(self.bow_proj(pooled), dim=-1)
        return out @ F.normalize(token_embeddings.to(out.dtype), dim=-1).T * self.bow_log_scale.exp()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of logits (B, S, V) against targets (B, S) (-100 = no token there)."""
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )


def caption_slot_targets(labels: torch.Tensor, n_slots: int) -> torch.Tensor:
    """The caption tokens of each row, left-aligned: labels (B, T) (-100 off the caption) -> (B, n_slots)."""
    B = labels.shape[0]
    out = torch.full((B, n_slots), -100, dtype=labels.dtype, device=labels.device)
    for b in range(B):
        row = labels[b][labels[b] != -100][:n_slots]
        out[b, : row.numel()] = row
    return out
