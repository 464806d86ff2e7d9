"""The Llama 3 dense decoder (Llama 3 paper, section 3; Meta's llama-models `model.py` is the reference).

Pre-norm RMSNorm, grouped-query attention through `scaled_dot_product_attention`, SwiGLU, RoPE with the
Llama 3.1 frequency scaling, no biases, optional tied embeddings. RoPE uses Meta's interleaved pair layout
(dims 2i and 2i+1 rotate together); the Hugging Face adapter in `hf.py` permutes q/k weights to and from the
rotate-half layout. This file knows nothing of checkpoint formats or parallelism.

Masks: plain causal by default; packed sequences pass per-token `doc_ids` and never attend across documents
(positions restart in each document, so a packed forward equals per-document forwards); batched prompts of
different lengths pass an `attention_mask` (False = padding).

Document attention (`LMConfig.doc_attention`, in `doc_attention.py`) never needs a (B, 1, T, T) mask: "flex"
(a FlexAttention `BlockMask`) and "varlen" (one causal attention per document) work from the document
boundaries, "dense" builds the boolean mask (the reference), and "auto" takes flex on CUDA and, on CPU, dense
for short rows and varlen for long ones (FlexAttention has no CPU backward and runs unfused on CPU unless
compiled). A document is a run of equal consecutive ids, as for the positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from .checks import check_on_host_or_async
from .config import LMConfig, RopeScaling
from .doc_attention import (
    DocSegments,
    document_block_mask,
    document_runs,
    document_segments,
    flex_document_attention,
    positions_in_documents,
    resolve_doc_attention,
    varlen_document_attention,
)
from .kv_cache import KVCache
from .loss import head_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 (as Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension and scale."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        """Weight to ones."""
        nn.init.ones_(self.weight)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim/2,), with the Llama 3.1 scaling rule when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Wavelengths longer than original/low_freq_factor are divided by `factor`, shorter than
    # original/high_freq_factor are kept, and the band between is blended smoothly.
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, hd) by angles with cos/sin (B, T, hd/2)."""
    xp = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


@dataclass
class AttnContext:
    """What every layer of one forward shares: rotary angles, the mask and the cache."""

    cos: torch.Tensor  # (B, T, hd/2)
    sin: torch.Tensor  # (B, T, hd/2)
    mask: torch.Tensor | None  # bool (B, 1, T, S), True = may attend; None: `is_causal` says which
    cache: KVCache | None = None
    is_causal: bool = True  # with mask None: causal (T == S) or, False, every key (one new token, no padding)
    block_mask: BlockMask | None = None  # "flex" document attention (then mask is None)
    segments: DocSegments | None = None  # "varlen" document attention (then mask is None)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, cfg: LMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttnContext, layer_idx: int | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); `layer_idx` (the KV-cache slot) defaults to this layer's own."""
        layer_idx = self.layer_idx if layer_idx is None else layer_idx
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.segments is not None:
            out = varlen_document_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), ctx.segments)
            return self.wo(out.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, hd)
        if ctx.block_mask is not None:
            out = flex_document_attention(q, k, v, ctx.block_mask)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer_idx, k, v)  # (B, KV, S, hd), S = cached + T
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None and ctx.is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        # No layer_idx argument: passed across the per-document loop's graph break (compiled blocks), a module
        # int is guarded by value, so every layer would recompile the block (and past 8 layers run eagerly).
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 decoder: tokens (B, T) -> logits (B, T, V).

    The pieces (`embed`, `context`, `layers`, `head`) are public so that a composition layer can run the
    layers itself (e.g. insert cross-attention blocks) without this class knowing about it.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.hd, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Llama-style init: N(0, init_std) for inputs, depth-scaled std for residual outputs (wo, w2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(layer.feed_forward.w3.weight, std=std)
            nn.init.normal_(layer.attention.wo.weight, std=out_std)
            nn.init.normal_(layer.feed_forward.w2.weight, std=out_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        self.inv_freq.copy_(rope_inv_freq(self.cfg.hd, self.cfg.rope_theta, self.cfg.rope_scaling))

    def set_rope_scaling(self, scaling: RopeScaling | None, max_seq_len: int | None = None) -> None:
        """Switch RoPE scaling (e.g. for a long-context stage); weights are untouched."""
        self.cfg.rope_scaling = scaling
        if max_seq_len is not None:
            self.cfg.max_seq_len = max_seq_len
        inv = rope_inv_freq(self.cfg.hd, self.cfg.rope_theta, scaling)
        self.inv_freq = inv.to(self.inv_freq.device)

    # ---- pieces -------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D), after checking every id is in the vocabulary (on CUDA a
        device-side assertion: no host sync)."""
        V = self.cfg.vocab_size
        if tokens.numel():

            def detail() -> str:
                bad = tokens[(tokens < 0) | (tokens >= V)]
                n = bad.numel()
                return (
                    f"token id {int(bad[0])} is outside the vocabulary [0, {V}) ({n} such ids in the batch)"
                )

            inside = ((tokens >= 0) & (tokens < V)).all()
            check_on_host_or_async(inside, f"a token id is outside the vocabulary [0, {V})", detail)
        return self.tok_embeddings(tokens)

    def context(
        self,
        B: int,
        T: int,
        *,
        device: torch.device,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> AttnContext:
        """Rotary angles and mask for a forward over T new tokens (after `cache.length` cached ones)."""
        start = 0
        if cache is not None and cache.static:
            return self._static_context(B, T, device, positions, attention_mask, cache)
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids (document masking) cannot be combined with a KV cache")
            if cache.batch_size != B:
                raise ValueError(f"KV cache holds batch {cache.batch_size}, input has batch {B}")
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(
                    f"sequence of {start + T} tokens ({start} cached + {T} new) is longer than the KV cache "
                    f"({cache.max_len}); allocate a larger cache"
                )
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            if doc_ids is not None:
                positions = positions_in_documents(doc_ids)
            else:
                positions = torch.arange(start, start + T, device=device).expand(B, T)
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()  # (B, T, hd/2)
        cos, sin = angles.cos(), angles.sin()

        mask = None
        key_valid = cache.update_valid(attention_mask, T) if cache is not None else None  # (B, S)
        if doc_ids is None and cache is not None and not cache.has_padding and (start == 0 or T == 1):
            # No padding anywhere: a prefill is plain causal and one new token sees every key, so SDPA
            # needs no mask tensor (and takes its fused path).
            return AttnContext(cos=cos, sin=sin, mask=None, cache=cache, is_causal=start == 0)
        if doc_ids is not None and attention_mask is None:  # cache is None here
            mode = resolve_doc_attention(self.cfg.doc_attention, device, T)
            if mode == "flex":
                return AttnContext(cos=cos, sin=sin, mask=None, block_mask=document_block_mask(doc_ids))
            if mode == "varlen":
                return AttnContext(cos=cos, sin=sin, mask=None, segments=document_segments(doc_ids))
        if doc_ids is not None:  # dense: documents are runs, as for the positions and the other modes
            doc_ids = document_runs(doc_ids)
        if doc_ids is not None or attention_mask is not None or cache is not None:
            q_idx = torch.arange(start, start + T, device=device)
            k_idx = torch.arange(start + T, device=device)
            mask = (k_idx[None, :] <= q_idx[:, None]).expand(B, T, start + T)  # causal (B, T, S)
            if doc_ids is not None:
                mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
            if cache is None and attention_mask is not None:
                key_valid = attention_mask.bool()
            if key_valid is not None:
                # Padding keys are hidden; a padding query still sees itself, so no row is empty.
                mask = mask & (key_valid[:, None, :] | (k_idx[None, None, :] == q_idx[None, :, None]))
            mask = mask.unsqueeze(1)
        return AttnContext(cos=cos, sin=sin, mask=mask, cache=cache)

    def _static_context(
        self,
        B: int,
        T: int,
        device: torch.device,
        positions: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVCache,
    ) -> AttnContext:
        """The context of a forward on a static cache: the new keys go to `cache.pos` and attention runs over the
        whole buffer, a (B, 1, T, max_len) mask hiding keys not yet written and padding. Nothing here reads a
        Python int that changes between steps, so one compiled graph serves every step."""
        q_idx = cache.new_positions(T)  # (T,)
        if positions is None:
            positions = q_idx.expand(B, T)
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()
        key_valid = cache.update_valid(attention_mask, T)  # (B, max_len)
        k_idx = torch.arange(cache.max_len, device=device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None] & (
            key_valid[:, None, :] | (k_idx[None, None, :] == q_idx[None, :, None])
        )
        return AttnContext(cos=angles.cos(), sin=angles.sin(), mask=mask.unsqueeze(1), cache=cache)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: (B, T, D) -> logits (B, T, V)."""
        return self.output(self.norm(h))

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Summed float32 cross-entropy (label -100 ignored) of the head's logits for h (B, T, D) against labels
        (B, T); `chunk` > 0 tokens at a time, the logits never whole (`loss.head_cross_entropy`)."""
        return head_cross_entropy(self.head, h, labels, chunk)

    # ---- full forward -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        input_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T) or precomputed input embeddings (B, T, D); (B, 1, V) of the
        last position only with `last_only` (generation needs no others). With `labels` (B, T): the summed
        cross-entropy instead (`head_loss`, `loss_chunk` tokens at a time), inside the forward so that a
        sharded model gathers the head's weights for it."""
        if (tokens is None) == (input_embeds is None):
            raise ValueError("pass exactly one of tokens or input_embeds")
        h = self.embed(tokens) if tokens is not None else input_embeds
        B, T, _ = h.shape
        ctx = self.context(
            B,
            T,
            device=h.device,
            positions=positions,
            doc_ids=doc_ids,
            attention_mask=attention_mask,
            cache=cache,
        )
        for layer in self.layers:
            h = layer(h, ctx)
        if cache is not None:
            cache.advance(T)
        if labels is not None:
            return self.head_loss(h, labels, loss_chunk)
        return self.head(h[:, -1:] if last_only else h)
