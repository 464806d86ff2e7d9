"""Document attention for packed rows: positions within documents, FlexAttention block masks, varlen spans.

A document is a run of equal consecutive ids in a row of `doc_ids` (B, T). "flex" runs FlexAttention with a
`BlockMask` derived from the document boundaries (O((T/128)^2) per row; compiled, hence fused, on CUDA),
"varlen" runs one causal attention per document (`torch.nn.attention.varlen` on CUDA in half precision, a
per-document SDPA loop otherwise); `resolve_doc_attention` says which one "auto" means. Neither builds a
(B, 1, T, T) mask; the dense mask (the reference) is built by `Transformer.context` in `model.py`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = [
    "DENSE_DOC_MASK_MAX_T",
    "call_varlen",
    "FLEX_BLOCK_SIZE",
    "DocSegments",
    "document_block_mask",
    "document_runs",
    "document_segments",
    "document_starts",
    "flex_document_attention",
    "positions_in_documents",
    "resolve_doc_attention",
    "varlen_document_attention",
]

# "auto" document attention on CPU: the dense mask up to this row length (fastest there), varlen beyond.
DENSE_DOC_MASK_MAX_T = 512
FLEX_BLOCK_SIZE = 128  # FlexAttention's sparse block (its default)


@dataclass
class DocSegments:
    """Packed rows as documents for varlen attention: each document a contiguous span of the flat B*T tokens."""

    cu_seqlens: torch.Tensor  # int32 (N + 1,), document starts in the flattened (B*T) tokens, then B*T
    lengths: list[int] | None  # host copy of the N lengths (the per-document loop); None on CUDA
    max_len: int  # an upper bound of the lengths (T: no host sync)


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """FlexAttention compiled once per process: the fused kernel (eager flex materialises all scores)."""
    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """FlexAttention of q (B, H, T, hd) over k, v (B, KV, T, hd) under a document block mask."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu":  # torch 2.14's compiled CPU kernel (inductor's C++ template) fails on views
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        # Inside a compiled block the outer compile fuses it; on CPU eager flex is unfused but needs no
        # C++ build (compile the blocks, `train.compile`, for the fused CPU kernel; there is no CPU backward).
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def varlen_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: DocSegments
) -> torch.Tensor:
    """Causal attention within each document of flat q (N, H, hd), k, v (N, KV, hd) -> (N, H, hd)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        return call_varlen(varlen_attn, q, k, v, segments)
    return _per_document_attention(q, k, v, segments)


def call_varlen(
    fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: DocSegments
) -> torch.Tensor:
    """Causal `varlen_attn` with the keywords this torch has: `window_size=(-1, 0)` (or `is_causal=True` in
    releases before it), `enable_gqa` where it exists (else the K/V heads are repeated to the query heads)."""
    params = inspect.signature(fn).parameters
    kw: dict[str, object] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    cu, n = segments.cu_seqlens, segments.max_len
    return fn(q, k, v, cu, cu, n, n, **kw)


@torch.compiler.disable  # traced, the host lengths would be constants: a recompile for every batch
def _per_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: DocSegments
) -> torch.Tensor:
    """`varlen_document_attention` as one causal SDPA per document (CPU, or CUDA in float32)."""
    lengths = segments.lengths if segments.lengths is not None else segments.cu_seqlens.diff().tolist()
    gqa = q.shape[1] != k.shape[1]
    # (1, H, L, hd): with no batch dimension torch 2.11's CPU SDPA takes its math kernel (a causal L x L mask)
    outs = [
        F.scaled_dot_product_attention(
            qd.transpose(0, 1)[None],
            kd.transpose(0, 1)[None],
            vd.transpose(0, 1)[None],
            is_causal=True,
            enable_gqa=gqa,
        )[0].transpose(0, 1)
        for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
    ]
    return torch.cat(outs)


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Per-token position within its document, for packed rows of doc ids (B, T) -> (B, T)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    start_idx = torch.where(document_starts(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, T): True where a document begins (row start or a change of id)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_runs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Index of each token's document (a run of equal consecutive ids) in its row: (B, T), 0, 0, 1, ..."""
    return document_starts(doc_ids).cumsum(dim=1) - 1


def document_block_mask(doc_ids: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """FlexAttention BlockMask for causal attention within documents of packed rows (B, T), without a T x T tensor.

    Documents are contiguous runs, so a (query block, key block) tile is decided by the runs at the blocks'
    ends: some pair may attend iff the key block's last run reaches the query block's first run, and every
    pair may (a full tile, which the kernel computes without the mask_mod) iff both blocks lie inside one
    document, the key block strictly before the query block, and the query block is not the ragged tail.
    Equals `create_block_mask` on the same mask_mod, which would evaluate all T x T pairs.
    """
    B, T = doc_ids.shape
    runs = document_runs(doc_ids)
    n = -(-T // block_size)
    block_start = torch.arange(n, device=doc_ids.device) * block_size
    first = runs[:, block_start]  # (B, n) run of each block's first token
    last = runs[:, (block_start + block_size - 1).clamp(max=T - 1)]  # ... and of its last token
    blk = torch.arange(n, device=doc_ids.device)
    causal = blk[None, :] <= blk[:, None]  # (q block, kv block)
    some = causal & (last[:, None, :] >= first[:, :, None])  # (B, n, n)
    whole = (blk[:, None] + 1) * block_size <= T
    full = (blk[None, :] < blk[:, None]) & whole & (first[:, None, :] == last[:, :, None])
    partial = some & ~full

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = tiles.to(torch.int32)[:, None]  # (B, 1, n, n)
        return t.sum(-1, dtype=torch.int32), t.argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    def same_document(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return (kv_idx <= q_idx) & (runs[b, q_idx] == runs[b, kv_idx])

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=same_document, seq_lengths=(T, T)
    )


def document_segments(doc_ids: torch.Tensor) -> DocSegments:
    """The documents of packed rows (B, T) as spans of the flattened B*T tokens (varlen attention)."""
    B, T = doc_ids.shape
    starts = document_starts(doc_ids).flatten().nonzero().flatten()
    cu = torch.cat([starts, starts.new_full((1,), B * T)]).to(torch.int32)
    lengths = None if doc_ids.is_cuda else cu.diff().tolist()
    return DocSegments(cu_seqlens=cu, lengths=lengths, max_len=T)


def resolve_doc_attention(mode: str, device: torch.device, T: int) -> str:
    """The document attention ("flex" | "varlen" | "dense") that `mode` means for rows of T tokens on device."""
    if mode != "auto":
        return mode
    if torch.device(device).type == "cuda":
        return "flex"
    return "dense" if T <= DENSE_DOC_MASK_MAX_T else "varlen"
