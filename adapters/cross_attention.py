"""Gated cross-attention block joining media tokens to the frozen LM (Llama 3 paper §7.3 "image adapter";
Meta's llama-models `CrossAttentionTransformerBlock` and transformers' `MllamaCrossAttentionDecoderLayer`).

    h   = x + tanh(gate_attn) * xattn(norm(x), media)        queries from text, keys/values from media
    out = h + tanh(gate_ffn)  * ffn(norm(h))

GQA, RMSNorm on q and k per head, no RoPE; both gates start at 0 so a fresh block is the identity and the
composite model equals the text-only LM. Text rows that can see no media get a zero block output, as Meta's
reference does (`full_text_row_masked_out_mask`). transformers' Mllama differs for those rows (its issue
#39379): they attend uniformly to all media tokens and only the FFN part is zeroed; `hf_row_compat=True`
reproduces that, for logits parity with transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.lm.model import FeedForward, RMSNorm


class CrossAttention(nn.Module):
    """Multi-head cross-attention with grouped K/V heads and per-head RMSNorm on q and k."""

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of media tokens (B, M, D) -> two (B, KV, M, hd); computed once per prompt."""
        B, M, _ = media.shape
        k = self.k_norm(self.wk(media).view(B, M, self.n_kv_heads, self.head_dim))
        v = self.wv(media).view(B, M, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, D), mask bool (B, T, M) True = may attend -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k, v, gqa = grouped_kv(k=kv[0], v=kv[1], n_heads=self.n_heads, device_type=q.device.type)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def grouped_kv(
    k: torch.Tensor, v: torch.Tensor, n_heads: int, device_type: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """K/V (B, KV, M, hd) for a masked SDPA with `n_heads` query heads, and its `enable_gqa`. On CUDA a mask
    together with `enable_gqa` sends SDPA to its math kernel (scores materialised), so the K/V heads are
    repeated for the flash / memory-efficient kernels instead; on the CPU, where both run the same kernel and
    the repeat only costs (about 20% on the demo's cross-attention), the grouped heads are kept."""
    if k.shape[1] == n_heads:
        return k, v, False
    if device_type == "cuda":
        group = n_heads // k.shape[1]
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    return k, v, True


class CrossAttentionBlock(nn.Module):
    """The gated cross-attention block inserted before an LM layer."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        ffn_dim: int,
        norm_eps: float = 1e-5,
        hf_row_compat: bool = False,
    ) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = CrossAttention(dim, n_heads, n_kv_heads, head_dim, norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.gate_ffn = nn.Parameter(torch.zeros(1))
        self.hf_row_compat = hf_row_compat
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) projections, unit norms, gates at 0 (the block starts as the identity)."""
        for lin in (self.attention.wq, self.attention.wk, self.attention.wv, self.attention.wo):
            nn.init.normal_(lin.weight, std=std)
        for lin in (self.feed_forward.w1, self.feed_forward.w2, self.feed_forward.w3):
            nn.init.normal_(lin.weight, std=std)
        for norm in (self.attention_norm, self.ffn_norm, self.attention.q_norm, self.attention.k_norm):
            norm.reset_parameters()
        self.gate_attn.zero_()
        self.gate_ffn.zero_()

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the media tokens for this block (cache them across decoding steps)."""
        return self.attention.media_kv(media)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, D); kv from `media_kv`; mask bool (B, T, M) True = token may see that media token."""
        row = mask.any(dim=-1, keepdim=True)  # (B, T, 1): rows that see some media
        if self.hf_row_compat:  # transformers: masked-out rows attend to every media token, FFN zeroed
            attn_mask = mask | ~row
            h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, attn_mask)
        else:  # Meta: rows that see no media get no cross-attention output at all
            attn_mask = mask | ~row  # (keeps softmax finite; those rows are zeroed below)
            h = x + self.gate_attn.tanh() * (self.attention(self.attention_norm(x), kv, attn_mask) * row)
        return h + self.gate_ffn.tanh() * (self.feed_forward(self.ffn_norm(h)) * row)
