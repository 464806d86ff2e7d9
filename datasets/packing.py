"""Packing tokenized documents into rows: one continuous token stream cut into fixed-length rows.

Each document is `bos + ids + eos`; rows are windows of seq_len + 1 stream tokens that overlap by one token,
so every token except a document's BOS is a label exactly once (-100 where the next token opens a document),
and `doc_ids` number the documents within each row for the model's document masking. `heldout_batches` is one
deterministic pass over text sources for perplexity; the training streams are `mixture.PackedText` (in memory)
and `tokens.TokenReader` (memory-mapped shards).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .text import IGNORE_INDEX, TextSource, TokenizerLike, new_read_stats

__all__ = [
    "check_batch_shape",
    "chunked",
    "encode_documents",
    "heldout_batches",
    "make_rows",
    "pack_heldout",
    "rows_from_windows",
]


def encode_documents(tokenizer: TokenizerLike, docs: Sequence[str]) -> list[list[int]]:
    """Encode documents as bos + ids + eos (batched when the tokenizer has `encode_batch`)."""
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(list(docs)) if callable(batch) else [tokenizer.encode(d) for d in docs]
    bos, eos = int(tokenizer.bos_id), int(tokenizer.eos_id)
    return [[bos, *x, eos] for x in ids]


def chunked(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Group an iterable into lists of at most size items."""
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def make_rows(stream: np.ndarray, starts: np.ndarray, n_rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Cut n_rows windows of seq_len + 1 stream tokens (consecutive windows share one token) into a batch."""
    idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return rows_from_windows(stream[idx], starts[idx])


def rows_from_windows(windows: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
    """A batch from (rows, L + 1) token windows and their document-start flags: tokens, labels, doc_ids (rows, L)."""
    w = windows.astype(np.int64)
    s = starts
    labels = w[:, 1:].copy()
    labels[s[:, 1:]] = IGNORE_INDEX  # the next token opens a new document: its BOS is unpredictable
    doc_ids = np.cumsum(s[:, :-1], axis=1, dtype=np.int64)
    doc_ids -= doc_ids[:, :1]
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(w[:, :-1])),
        "labels": torch.from_numpy(labels),
        "doc_ids": torch.from_numpy(doc_ids),
    }


def check_batch_shape(batch_size: int, seq_len: int) -> None:
    """Raise ValueError unless both are positive ints."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def heldout_batches(
    sources: Sequence[TextSource] | TextSource,
    tokenizer: TokenizerLike,
    seq_len: int,
    batch_size: int,
    stats: dict[str, Any] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One deterministic pass over every document of the sources (in order, weights ignored) for perplexity.

    Packs exactly as `PackedText` does (bos + ids + eos, windows of seq_len + 1 overlapping by one token), so
    every token except a document's BOS is a label exactly once. The last batch may have fewer rows, and its
    last row is padded: padding has token `eos_id`, label -100 and a document id of its own. Documents are
    read lazily; pass a `new_read_stats()` dict as stats to receive the reading counts.
    """
    check_batch_shape(batch_size, seq_len)
    if isinstance(sources, TextSource):
        sources = [sources]
    if stats is None:
        stats = new_read_stats()
    return _heldout_iter(list(sources), tokenizer, seq_len, batch_size, stats)


def _heldout_iter(
    sources: list[TextSource], tokenizer: TokenizerLike, seq_len: int, batch_size: int, stats: dict[str, Any]
) -> Iterator[dict[str, torch.Tensor]]:
    """The generator behind `heldout_batches`."""

    def docs() -> Iterator[str]:
        for s in sources:
            yield from s.documents(stats)

    encoded = (ids for chunk in chunked(docs(), 256) for ids in encode_documents(tokenizer, chunk))
    return pack_heldout(encoded, seq_len, batch_size, int(tokenizer.eos_id))


def pack_heldout(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, batch_size: int, eos_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Pack already tokenized documents (bos + ids + eos each) for one held-out pass, as `heldout_batches`."""
    check_batch_shape(batch_size, seq_len)
    need = batch_size * seq_len + 1
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    flags: list[np.ndarray] = [np.zeros(0, dtype=bool)]
    have = 0
    for chunk in chunked(documents, 256):
        for ids in chunk:
            start = np.zeros(len(ids), dtype=bool)
            start[0] = True
            parts.append(np.asarray(ids, dtype=np.int64))
            flags.append(start)
            have += len(ids)
        if have >= need:
            stream, starts = np.concatenate(parts), np.concatenate(flags)
            n_full = (len(stream) - 1) // (batch_size * seq_len)
            for b in range(n_full):
                off = b * batch_size * seq_len
                yield make_rows(stream[off:], starts[off:], batch_size, seq_len)
            rest = n_full * batch_size * seq_len
            parts, flags = [stream[rest:]], [starts[rest:]]
            have = len(parts[0])
    # The tail: fewer than batch_size * seq_len + 1 tokens left, at least one (the shared token) if any came.
    stream, starts = np.concatenate(parts), np.concatenate(flags)
    if len(stream) <= 1:
        return
    n_rows = math.ceil((len(stream) - 1) / seq_len)
    pad = n_rows * seq_len + 1 - len(stream)
    if pad:
        pad_starts = np.zeros(pad, dtype=bool)
        pad_starts[0] = True  # the padding is a document of its own; its first label is already -100
        stream = np.concatenate([stream, np.full(pad, eos_id, dtype=np.int64)])
        starts = np.concatenate([starts, pad_starts])
    batch = make_rows(stream, starts, n_rows, seq_len)
    if pad:
        # Labels pointing into the padding are -100 (the first by the start flag, the rest here).
        batch["labels"][-1, seq_len - pad :] = IGNORE_INDEX
    yield batch
