"""Document attention without a dense mask: flex (BlockMask) and varlen equal the dense (B, 1, T, T) mask,
equal per-document forwards, never leak across documents, and never build a T x T tensor."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from mm.lm import Transformer, preset
from mm.lm.doc_attention import (
    DENSE_DOC_MASK_MAX_T,
    document_block_mask,
    document_runs,
    document_segments,
    flex_document_attention,
    resolve_doc_attention,
    varlen_document_attention,
)

MASK_FREE = ["flex", "varlen"]
T = 384  # three 128-token blocks: full, partial and empty tiles all occur


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    """Eager flex on CPU warns (once) that it is unfused; that is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def lengths_to_ids(lengths: list[int]) -> torch.Tensor:
    """Doc ids (T,) for consecutive documents of the given lengths."""
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


# Row 0: seven documents, among them a 1-token one and two that straddle block boundaries; row 1: one
# document spanning the whole row.
ROW_LENGTHS = [[37, 1, 150, 64, 2, 100, 30], [T]]


def packed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and doc ids (2, T) of two rows with different document boundaries."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (2, T), generator=g)
    doc_ids = torch.stack([lengths_to_ids(lens) for lens in ROW_LENGTHS])
    return tokens, doc_ids


def models(*modes: str) -> list[Transformer]:
    """One nano model (GQA: 4 heads, 2 kv heads) per mode, sharing weights."""
    torch.manual_seed(0)
    first = Transformer(preset("nano", max_seq_len=T, doc_attention=modes[0]))
    out = [first]
    for mode in modes[1:]:
        m = Transformer(preset("nano", max_seq_len=T, doc_attention=mode))
        m.load_state_dict(first.state_dict())
        out.append(m)
    return out


def per_document_logits(m: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Each document of each row through the model alone (positions from 0), re-packed: (2, T, V)."""
    rows = []
    for b, lens in enumerate(ROW_LENGTHS):
        docs = tokens[b].split(lens)
        rows.append(torch.cat([m(d[None])[0] for d in docs]))
    return torch.stack(rows)


@torch.no_grad()
@pytest.mark.parametrize("mode", MASK_FREE)
def test_mask_free_logits_equal_dense_and_per_document_runs(mode):
    dense, free = models("dense", mode)
    tokens, doc_ids = packed_batch()
    ctx = free.context(2, T, device=tokens.device, doc_ids=doc_ids)
    assert ctx.mask is None and (ctx.block_mask is not None or ctx.segments is not None)
    out = free(tokens, doc_ids=doc_ids)
    ref = dense(tokens, doc_ids=doc_ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, per_document_logits(dense, tokens), atol=1e-5, rtol=1e-5)


def test_mask_free_gradients_equal_dense():
    """A training step: the varlen path (the CPU path with a backward) gives the dense gradients."""
    dense, free = models("dense", "varlen")
    tokens, doc_ids = packed_batch(1)
    labels = tokens.roll(-1, dims=1)
    grads = []
    for m in (dense, free):
        m.train()
        loss = F.cross_entropy(m(tokens, doc_ids=doc_ids).flatten(0, 1), labels.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-4, msg=n)


def test_flex_on_cpu_is_forward_only():
    """torch 2.14 FlexAttention has no CPU backward (CUDA has a fused one): CPU training uses varlen/dense."""
    q, k, v = (torch.randn(2, h, T, 16) for h in (4, 2, 2))
    doc_ids = packed_batch()[1]
    with torch.no_grad():
        out = flex_document_attention(q, k, v, document_block_mask(doc_ids))
    torch.testing.assert_close(out, dense_reference(q, k, v, doc_ids), atol=1e-5, rtol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="backward on CPU"):
            flex_document_attention(q.requires_grad_(), k, v, document_block_mask(doc_ids))


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """SDPA under the dense causal same-document mask: (B, H, T, hd)."""
    n = doc_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal & (document_runs(doc_ids)[:, :, None] == document_runs(doc_ids)[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["dense", *MASK_FREE])
def test_documents_do_not_leak(mode):
    """Changing one token of document 1 changes nothing outside document 1 (and does change document 1)."""
    (m,) = models(mode)
    tokens, doc_ids = packed_batch(2)
    out = m(tokens, doc_ids=doc_ids)
    pos = 37 + 1 + 20  # inside the 150-token document (index 2) of row 0
    changed = tokens.clone()
    changed[0, pos] = (changed[0, pos] + 1) % 512
    out2 = m(changed, doc_ids=doc_ids)
    doc = doc_ids[0] == 2
    after = doc & (torch.arange(T) >= pos)
    assert torch.equal(out2[0, ~doc], out[0, ~doc])  # bit-identical: not a single logit elsewhere moved
    assert torch.equal(out2[1], out[1])
    assert torch.equal(out2[0, doc & ~after], out[0, doc & ~after])  # and causal inside the document
    assert (out2[0, after] - out[0, after]).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_attention_equals_dense_on_random_layouts():
    """Many random layouts, ragged T and small blocks (many full/partial tiles): flex and varlen vs dense."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 96, 100, 173):
        for _ in range(3):
            lens = torch.randint(1, 40, (2, n), generator=g).tolist()
            doc_ids = torch.stack([lengths_to_ids(x)[:n] for x in lens])
            q = torch.randn(2, 4, n, 16, generator=g)
            k, v = torch.randn(2, 2, 2, n, 16, generator=g)
            ref = dense_reference(q, k, v, doc_ids)
            for bs in (16, 128):
                out = flex_document_attention(q, k, v, document_block_mask(doc_ids, block_size=bs))
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            flat = varlen_document_attention(
                q.transpose(1, 2).flatten(0, 1),
                k.transpose(1, 2).flatten(0, 1),
                v.transpose(1, 2).flatten(0, 1),
                document_segments(doc_ids),
            )
            torch.testing.assert_close(flat.unflatten(0, (2, n)).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,bs", [(96, 16), (100, 16), (384, 128), (300, 128)])
def test_block_mask_equals_create_block_mask(n, bs):
    """The block mask built from the boundaries is exactly `create_block_mask` (which evaluates T x T)."""
    g = torch.Generator().manual_seed(n)
    doc_ids = torch.stack(
        [lengths_to_ids(torch.randint(1, 3 * bs, (n,), generator=g).tolist())[:n] for _ in "ab"]
    )
    doc_ids[1, : n // 2] = 0  # a document covering several whole blocks: full tiles
    doc_ids[1, n // 2 :] = 1
    ours = document_block_mask(doc_ids, block_size=bs)
    runs = document_runs(doc_ids)

    def same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (runs[b, q_idx] == runs[b, kv_idx])

    ref = create_block_mask(same_document, 2, 1, n, n, device="cpu", BLOCK_SIZE=bs)
    assert ours.shape == ref.shape
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert torch.equal(ours.to_dense(), ref.to_dense())
    # What a fused kernel does with the tiles (eager CPU flex only evaluates the mask_mod, so the forward
    # tests cannot see the tiles): empty tiles are skipped, full ones computed unmasked, partial ones masked.
    true_mask = torch.ones(n, n, dtype=torch.bool).tril() & (runs[:, :, None] == runs[:, None, :])
    partial = tiles_to_elements(ours.kv_num_blocks, ours.kv_indices, bs, n)
    full = tiles_to_elements(ours.full_kv_num_blocks, ours.full_kv_indices, bs, n)
    assert not (partial & full).any()
    assert torch.equal(full | (partial & true_mask), true_mask)
    assert (full & true_mask).sum() == full.sum()


def tiles_to_elements(num: torch.Tensor, idx: torch.Tensor, bs: int, n: int) -> torch.Tensor:
    """Bool (B, n, n): the elements covered by the listed kv tiles of each query-block row."""
    B, _, nq, nk = idx.shape
    tiles = torch.zeros(B, nq, nk, dtype=torch.bool)
    for b in range(B):
        for i in range(nq):
            tiles[b, i, idx[b, 0, i, : num[b, 0, i]].long()] = True
    return tiles.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :n, :n]


def test_repeated_ids_are_separate_documents():
    """A document is a run of equal ids (as for the positions): [0 0 1 1 0 0] is three documents in every mode."""
    ms = models("dense", *MASK_FREE)
    tokens = torch.randint(0, 512, (1, 6))
    doc_ids = torch.tensor([[0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        alone = torch.cat([ms[0](tokens[:, i : i + 2]) for i in (0, 2, 4)], dim=1)
        for m in ms:
            torch.testing.assert_close(m(tokens, doc_ids=doc_ids), alone, atol=1e-5, rtol=1e-5)


def test_auto_default():
    assert preset("nano").doc_attention == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_doc_attention("auto", cuda, 64) == "flex"
    assert resolve_doc_attention("auto", cuda, 131072) == "flex"
    assert resolve_doc_attention("auto", cpu, DENSE_DOC_MASK_MAX_T) == "dense"
    assert resolve_doc_attention("auto", cpu, DENSE_DOC_MASK_MAX_T + 1) == "varlen"
    assert resolve_doc_attention("dense", cuda, 131072) == "dense"
    with pytest.raises(ValueError, match="doc_attention"):
        preset("nano", doc_attention="sparse")


class SquareTensorSpy(TorchDispatchMode):
    """Records every op output with two dimensions of at least `n` (a T x T tensor in any layout)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(s >= self.n for s in t.shape) >= 2:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@torch.no_grad()
def test_no_t_by_t_tensor_at_4096():
    n = 4096
    doc_ids = lengths_to_ids([1000, 1, 2000, 1095])[None].repeat(2, 1)
    doc_ids[1] = 0  # row 1: one document over the whole row
    # The block mask: O((T/128)^2) per row, and building it makes nothing T x T.
    with SquareTensorSpy(n) as spy:
        bm = document_block_mask(doc_ids)
    assert spy.seen == []
    tiles = (n // 128) ** 2
    for t in bm.as_tuple()[2:]:
        if isinstance(t, torch.Tensor):
            assert t.numel() <= 2 * tiles
    assert sum(t.numel() * t.element_size() for t in bm.as_tuple()[2:] if isinstance(t, torch.Tensor)) < 2**20
    # The whole CPU forward at this length ("auto" -> varlen) makes nothing T x T either ...
    m = Transformer(preset("nano", max_seq_len=n))
    tokens = torch.randint(0, 512, (2, n))
    assert resolve_doc_attention(m.cfg.doc_attention, tokens.device, n) == "varlen"
    with SquareTensorSpy(n) as spy:
        m(tokens, doc_ids=doc_ids)
    assert spy.seen == []
    # ... while the dense reference does (so the spy sees such tensors).
    m.cfg.doc_attention = "dense"
    with SquareTensorSpy(n) as spy:
        ctx = m.context(2, n, device=tokens.device, doc_ids=doc_ids)
    assert ctx.mask is not None and ctx.mask.shape == (2, 1, n, n) and spy.seen


@pytest.mark.parametrize("newer", [True, False])
def test_varlen_is_called_with_the_keywords_this_torch_has(newer):
    """torch releases before `window_size` / `enable_gqa` (e.g. 2.11) get `is_causal` and repeated K/V heads;
    both calls give the per-document causal attention."""
    from mm.lm.doc_attention import DocSegments, _per_document_attention, call_varlen

    def reference(q, k, v, cu, cu_k, max_q, max_k, **kw):
        assert kw.pop("window_size" if newer else "is_causal") in ((-1, 0), True)
        gqa = kw.pop("enable_gqa", False)
        assert not kw and gqa == (newer and q.shape[1] != k.shape[1])
        lengths = cu.diff().tolist()
        if not gqa:
            assert k.shape[1] == q.shape[1]  # repeated for a call without enable_gqa
        return _per_document_attention(q, k, v, DocSegments(cu, lengths, max_q))

    if newer:

        def fn(q, k, v, cu, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
            return reference(q, k, v, cu, cu_k, max_q, max_k, window_size=window_size, enable_gqa=enable_gqa)

    else:

        def fn(q, k, v, cu, cu_k, max_q, max_k, *, is_causal=False):
            return reference(q, k, v, cu, cu_k, max_q, max_k, is_causal=is_causal)

    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    seg = DocSegments(torch.tensor([0, 3, 10], dtype=torch.int32), [3, 7], 10)
    torch.testing.assert_close(call_varlen(fn, q, k, v, seg), _per_document_attention(q, k, v, seg))
