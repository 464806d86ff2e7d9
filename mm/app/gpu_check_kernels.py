"""Check 1 of `mm.app.gpu_check`: the attention kernels against float32 dense SDPA.

Document attention: FlexAttention (compiled on CUDA) and varlen (`varlen_attn` on CUDA in bf16; one SDPA per
document elsewhere) at the 8B head shapes (32 query heads, 8 K/V heads, head dim 128), once on one 4096-token
document and once on a ragged batch of packed documents. Each kernel's output and dq / dk / dv are compared
with dense SDPA in float32 on the same bf16 inputs; the tolerance is the bf16 one of the flash-attention test
suites: a kernel's largest error may be at most twice that of dense SDPA run in bf16 (plus a small floor), so
it is as exact as bf16 arithmetic allows. Time and peak memory of forward + backward for each.

Cross-attention: the gated block's attention at the same head shapes over 4 tiles of media tokens, with a
text-to-media mask, under `sdpa_kernel([FLASH, EFFICIENT, CUDNN])` (no math fallback, which would materialise
the scores): it must run forward and backward there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mm.app.gpu_check import CheckContext, CheckResult

ERROR_FLOOR = 1e-3  # absolute slack over 2x the bf16 reference's error


def ragged_doc_ids(lengths: tuple[int, ...], rows: int, T: int, device: torch.device) -> torch.Tensor:
    """Packed rows (rows, T) of document ids from consecutive lengths (a row's tail padded into its last doc)."""
    ids, row, used, doc = torch.zeros(rows, T, dtype=torch.long), 0, 0, 0
    for n in lengths:
        if row >= rows:
            break
        take = min(n, T - used)
        ids[row, used : used + take] = doc
        used, doc = used + take, doc + 1
        if used == T:
            row, used = row + 1, 0
    if row < rows and used:  # the last row's tail joins its last document
        ids[row, used:] = doc - 1
    return ids.to(device)


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Causal attention within documents by dense SDPA with a (B, 1, T, T) mask, in `dtype` (math kernel)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask[:, None], enable_gqa=True
        )


def flex_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The LM's FlexAttention path (a document block mask; compiled on CUDA)."""
    from mm.lm.doc_attention import document_block_mask, flex_document_attention

    return flex_document_attention(q, k, v, document_block_mask(doc_ids))


def varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The LM's varlen path over the flattened tokens, back in (B, H, T, hd)."""
    from mm.lm.doc_attention import document_segments, varlen_document_attention

    B, H, T, hd = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(B * T, x.shape[1], hd)

    out = varlen_document_attention(flat(q), flat(k), flat(v), document_segments(doc_ids))
    return out.view(B, T, H, hd).transpose(1, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_kernel(
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    grad: torch.Tensor,
    doc_ids: torch.Tensor,
    backward: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], float, float]:
    """Output, [dq, dk, dv] ([] without `backward`), seconds and peak GiB (CUDA; 0 elsewhere) of one forward
    and backward."""
    q, k, v = (x.detach().clone().requires_grad_(backward) for x in inputs)
    dev = q.device
    _sync(dev)
    base = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    out = fn(q, k, v, doc_ids)
    if backward:
        out.backward(grad)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if dev.type == "cuda" else 0.0
    return out.detach().float(), [x.grad.float() for x in (q, k, v) if backward], seconds, peak


def compare_kernel(
    name: str, fn: Callable[..., torch.Tensor], doc_ids: torch.Tensor, ctx: CheckContext, res: CheckResult
) -> None:
    """One kernel on one layout against float32 dense SDPA: errors asserted, time and memory recorded."""
    s, dev = ctx.sizes, ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    B, T = doc_ids.shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype)

    inputs = (
        rnd(B, s.heads, T, s.head_dim),
        rnd(B, s.kv_heads, T, s.head_dim),
        rnd(B, s.kv_heads, T, s.head_dim),
    )
    grad = rnd(B, s.heads, T, s.head_dim)
    ref32, refg32, _, _ = run_kernel(
        lambda q, k, v, d: dense_reference(q, k, v, d, torch.float32), inputs, grad, doc_ids
    )
    ref16, refg16, _, _ = run_kernel(
        lambda q, k, v, d: dense_reference(q, k, v, d, dtype), inputs, grad, doc_ids
    )
    backward = ctx.cuda or not name.startswith("flex")  # FlexAttention has no backward on the CPU
    run_kernel(fn, inputs, grad, doc_ids, backward)  # warm-up (compilation)
    out, grads, seconds, peak = run_kernel(fn, inputs, grad, doc_ids, backward)
    figures: dict[str, Any] = {"seconds": seconds, "peak_gib": peak}
    for what, got, ref, low in (
        ("out", [out], [ref32], [ref16]),
        *([("dq_dk_dv", grads, refg32, refg16)] if backward else []),
    ):
        err = max(float((a - r).abs().max()) for a, r in zip(got, ref, strict=True))
        limit = 2 * max(float((a - r).abs().max()) for a, r in zip(low, ref, strict=True)) + ERROR_FLOOR
        res.expect(f"{name} {what} max error", err <= limit, err, limit)
        figures[f"{what}_max_error"] = err
    res.figure(**{name: figures})


def cross_attention_fused(ctx: CheckContext, res: CheckResult) -> None:
    """The gated cross-attention (mask and grouped K/V heads) forward and backward with no math kernel."""
    from mm.adapters.cross_attention import CrossAttentionBlock

    s, dev = ctx.sizes, ctx.device
    dim = s.heads * s.head_dim
    block = CrossAttentionBlock(dim, s.heads, s.kv_heads, s.head_dim, ffn_dim=4 * dim).to(dev)
    with torch.no_grad():
        block.gate_attn.fill_(0.5)
    g = torch.Generator(device="cpu").manual_seed(1)
    T, M = s.attn_seq // 4, s.media_tokens
    x = torch.randn(1, T, dim, generator=g).to(dev).requires_grad_(True)
    media = torch.randn(1, M, dim, generator=g).to(dev)
    mask = torch.zeros(1, T, M, dtype=torch.bool, device=dev)
    mask[:, T // 8 :, : M // 2] = True  # text after the first image token sees the first image only
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    autocast = torch.autocast("cuda", torch.bfloat16) if ctx.cuda else torch.autocast("cpu", enabled=False)
    backends = fused if ctx.cuda else [SDPBackend.MATH, *fused]  # the CPU has only math and its flash kernel
    _sync(dev)
    t0 = time.perf_counter()
    try:
        with sdpa_kernel(backends), autocast:
            out = block(x, block.media_kv(media), mask)
        out.float().square().mean().backward()
        _sync(dev)
        ran, why = True, ""
    except RuntimeError as e:  # "No available kernel": the call needs the math kernel
        ran, why = False, str(e).splitlines()[0]
    res.expect(
        "cross-attention runs under sdpa_kernel([FLASH, EFFICIENT, CUDNN])", ran, why or "ran", "no math"
    )
    res.figure(cross_attention={"text": T, "media_tokens": M, "seconds": time.perf_counter() - t0})


def check_attention(ctx: CheckContext, res: CheckResult) -> None:
    """Check 1: document attention kernels against float32 dense SDPA; cross-attention without the math kernel."""
    s = ctx.sizes
    layouts = {
        "one_document": torch.zeros(1, s.attn_seq, dtype=torch.long, device=ctx.device),
        "ragged": ragged_doc_ids(s.ragged, 2, s.attn_seq, ctx.device),
    }
    for layout, doc_ids in layouts.items():
        for kernel, fn in (("flex", flex_kernel), ("varlen", varlen_kernel)):
            compare_kernel(f"{kernel}_{layout}", fn, doc_ids, ctx, res)
    cross_attention_fused(ctx, res)
