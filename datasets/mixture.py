"""An in-memory weighted mixture of text sources, packed into rows with a resumable, deterministic order.

The Llama 3 pretraining data path (paper section 3.1 and 3.4): documents from several sources are mixed with
fixed weights (the data mix), tokenized as `<|begin_of_text|> text <|end_of_text|>`, and packed into one
continuous token stream that is cut into fixed-length rows (`packing`); the model's document masking
(`doc_ids`) keeps tokens from attending across document boundaries. The batch and sequence-length ramp is
supported by letting `seq_len` change from one batch to the next: the stream just continues.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .packing import check_batch_shape, chunked, encode_documents, make_rows
from .seeding import derive_seed
from .text import TextSource, TokenizerLike, check_source_names, new_read_stats

__all__ = ["PackedText", "load_corpus"]

_STATE_VERSION = 1


@dataclass
class _Corpus:
    """One source's documents, tokenized, as a flat token array plus document offsets."""

    source: TextSource
    tokens: np.ndarray  # int32/int64, all documents' bos + ids + eos, concatenated
    offsets: np.ndarray  # int64, len = n_docs + 1
    read_stats: dict[str, Any] = field(default_factory=new_read_stats)

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i (bos + ids + eos)."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def load_corpus(source: TextSource, tokenizer: TokenizerLike, chunk_docs: int = 4096) -> _Corpus:
    """Read and tokenize all documents of a source into memory."""
    stats = new_read_stats()
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    for chunk in chunked(source.documents(stats), chunk_docs):
        for ids in encode_documents(tokenizer, chunk):
            parts.append(np.asarray(ids, dtype=np.int64))
            lengths.append(len(ids))
    tokens = np.concatenate(parts)
    if tokens.size and 0 <= tokens.min() and tokens.max() < 2**31:
        tokens = tokens.astype(np.int32)  # halves the memory of a large corpus
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return _Corpus(source, tokens, offsets, stats)


class PackedText:
    """An endless, deterministic, resumable stream of packed token batches from a weighted mixture of sources.

    All documents of every source are read and tokenized into memory at construction, and every caller cuts
    its rows out of the whole global batch (small corpora only). Training uses `mm.datasets.tokens` instead:
    pre-tokenized, memory-mapped shards (`mm data tokenize`) packed by position, each process reading only its
    rows. This class stays for its sequential, document-level mixture semantics. Each document becomes
    `bos + ids + eos`. The next document of the stream comes from a source drawn with probability proportional
    to its weight (a seeded RNG); within a source, documents are visited in a fresh shuffled order each epoch
    (seeded by (seed, source index, epoch)), and a new epoch starts when a source is exhausted.

    `next_batch(B, L)` takes B consecutive windows of L + 1 stream tokens; consecutive windows overlap by one
    token (row r covers stream tokens [rL, rL + L]), and the stream advances by B * L, so every stream token
    except a document's BOS is a label exactly once. `seq_len` may change between calls. The batch holds:

    - `tokens` (B, L) int64: window[:-1];
    - `labels` (B, L) int64: window[1:], with -100 where the next token is a document's BOS (the start of a
      new document is unpredictable; the EOS before it is predicted as usual);
    - `doc_ids` (B, L) int64: document index per token within the row, starting at 0 in every row and
      increasing by one at each BOS. A row that begins mid-document starts with the rest of that document
      as document 0 (with document masking its positions restart at 0 there).

    `state_dict()` / `load_state_dict()` capture the full position (mixture RNG, per-source epoch and cursor,
    the buffered leftover tokens, counters) as plain JSON-serialisable values, so a fresh `PackedText` over
    the same sources continues exactly where the saved one stopped.
    """

    def __init__(
        self, sources: Sequence[TextSource] | TextSource, tokenizer: TokenizerLike, seed: int = 0
    ) -> None:
        """Read and tokenize all sources; seed fixes the mixture draws and the per-epoch document orders."""
        if isinstance(sources, TextSource):
            sources = [sources]
        sources = list(sources)
        if not sources:
            raise ValueError("PackedText needs at least one TextSource")
        check_source_names([s.name for s in sources])
        weights = [float(s.weight) for s in sources]
        if sum(weights) <= 0:
            raise ValueError("at least one TextSource needs a weight > 0")
        self.sources = sources
        self.tokenizer = tokenizer
        self._corpora = [load_corpus(s, tokenizer) for s in sources]
        self._cum_weights = list(np.cumsum(weights, dtype=np.float64))
        self._reset(int(seed))

    def _reset(self, seed: int) -> None:
        """Put the stream at its start for the given seed."""
        self.seed = seed
        self._rng = random.Random(derive_seed("mm.text.mixture", seed))
        k = len(self._corpora)
        self._epoch = [0] * k
        self._cursor = [0] * k
        self._drawn = [0] * k
        self._orders: list[list[int] | None] = [None] * k
        self._buf_tokens = np.zeros(0, dtype=np.int64)
        self._buf_starts = np.zeros(0, dtype=bool)
        self.tokens_seen = 0

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the mixture weights by source name (e.g. upweight a high-quality source while annealing).

        The weights are not part of `state_dict`: the caller derives them from the step, so a resumed run
        sets the same weights at the same step.
        """
        unknown = sorted(set(weights) - {s.name for s in self.sources})
        if unknown:
            raise ValueError(f"unknown source names {unknown}; sources: {[s.name for s in self.sources]}")
        new = [float(weights.get(s.name, s.weight)) for s in self.sources]
        if any(w < 0 for w in new) or sum(new) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {new}")
        self._cum_weights = list(np.cumsum(new, dtype=np.float64))

    # ---------------------------------------------------------------------------------------- the stream

    def _order(self, i: int) -> list[int]:
        """The shuffled document order of source i in its current epoch."""
        order = self._orders[i]
        if order is None:
            order = list(range(self._corpora[i].num_documents))
            random.Random(derive_seed("mm.text.order", self.seed, i, self._epoch[i])).shuffle(order)
            self._orders[i] = order
        return order

    def _next_document(self) -> np.ndarray:
        """Draw a source by weight and return its next document's tokens."""
        x = self._rng.random() * self._cum_weights[-1]
        i = min(bisect.bisect_right(self._cum_weights, x), len(self._corpora) - 1)
        order = self._order(i)
        doc = self._corpora[i].document(order[self._cursor[i]])
        self._cursor[i] += 1
        self._drawn[i] += 1
        if self._cursor[i] == len(order):
            self._epoch[i] += 1
            self._cursor[i] = 0
            self._orders[i] = None
        return doc

    def next_batch(
        self, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
    ) -> dict[str, torch.Tensor]:
        """The next (batch_size, seq_len) batch of `tokens`, `labels` and `doc_ids` (see the class docstring).

        With `world` > 1, only process `rank`'s rows (rows rank * b .. (rank + 1) * b - 1, b = batch_size /
        world) are cut into tensors; every process advances the token stream over the whole global batch."""
        check_batch_shape(batch_size, seq_len)
        if batch_size % world or not 0 <= rank < world:
            raise ValueError(f"batch_size={batch_size} is not divisible by world={world} (rank {rank})")
        need = batch_size * seq_len + 1
        have = len(self._buf_tokens)
        parts, flags = [self._buf_tokens], [self._buf_starts]
        while have < need:
            doc = self._next_document()
            start = np.zeros(len(doc), dtype=bool)
            start[0] = True
            parts.append(doc)
            flags.append(start)
            have += len(doc)
        stream = np.concatenate(parts).astype(np.int64, copy=False)
        starts = np.concatenate(flags)
        per = batch_size // world
        lo = rank * per * seq_len
        batch = make_rows(stream[lo:], starts[lo:], per, seq_len)
        consumed = batch_size * seq_len
        self._buf_tokens = stream[consumed:].copy()
        self._buf_starts = starts[consumed:].copy()
        self.tokens_seen += consumed
        return batch

    def batches(self, batch_size: int, seq_len: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless iterator of `next_batch(batch_size, seq_len)`."""
        while True:
            yield self.next_batch(batch_size, seq_len)

    # ------------------------------------------------------------------------------------------ reporting

    @property
    def stats(self) -> dict[str, Any]:
        """Counts: tokens seen, and per source documents loaded/drawn, epoch, replaced bytes, skipped records."""
        per_source = {}
        for i, c in enumerate(self._corpora):
            rs = c.read_stats
            per_source[c.source.name] = {
                "documents": c.num_documents,
                "tokens": int(c.offsets[-1]),
                "documents_drawn": self._drawn[i],
                "epoch": self._epoch[i],
                "files": rs["files"],
                "replaced_bytes": rs["replaced_bytes"],
                "skipped_records": rs["skipped_records"],
                "replaced_bytes_per_file": dict(rs["replaced_bytes_per_file"]),
                "skipped_records_per_file": dict(rs["skipped_records_per_file"]),
            }
        return {
            "tokens_seen": self.tokens_seen,
            "replaced_bytes": sum(s["replaced_bytes"] for s in per_source.values()),
            "skipped_records": sum(s["skipped_records"] for s in per_source.values()),
            "sources": per_source,
        }

    # ---------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The stream position as JSON-serialisable plain values (ints, floats, lists, strings)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rng": [version, list(internal), gauss],
            "sources": [
                {
                    "name": c.source.name,
                    "num_documents": c.num_documents,
                    "num_tokens": int(c.offsets[-1]),
                    "epoch": self._epoch[i],
                    "cursor": self._cursor[i],
                    "documents_drawn": self._drawn[i],
                }
                for i, c in enumerate(self._corpora)
            ],
            "buffer_tokens": self._buf_tokens.tolist(),
            "buffer_doc_starts": np.flatnonzero(self._buf_starts).tolist(),
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; the sources must be the same (names, document and token counts).

        The saved seed wins over the one given to the constructor: the state defines the run being resumed.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported PackedText state version {state.get('version')!r}")
        saved = [(s["name"], s["num_documents"], s["num_tokens"]) for s in state["sources"]]
        mine = [(c.source.name, c.num_documents, int(c.offsets[-1])) for c in self._corpora]
        if saved != mine:
            raise ValueError(
                "PackedText state belongs to other sources: saved (name, documents, tokens) "
                f"{saved}, these sources {mine}"
            )
        self._reset(int(state["seed"]))
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        for i, s in enumerate(state["sources"]):
            self._epoch[i] = int(s["epoch"])
            self._cursor[i] = int(s["cursor"])
            self._drawn[i] = int(s["documents_drawn"])
        self._buf_tokens = np.asarray(state["buffer_tokens"], dtype=np.int64)
        self._buf_starts = np.zeros(len(self._buf_tokens), dtype=bool)
        self._buf_starts[np.asarray(state["buffer_doc_starts"], dtype=np.int64)] = True
        self.tokens_seen = int(state["tokens_seen"])
