"""Pre-tokenized text for LM pretraining: `mm data tokenize` writes memory-mapped token shards once, and training
streams packed rows from them, each process reading only its rows of every global batch.

The folders themselves (`tokenize_to_folder`, `mm data tokenize`) are described in `token_folders`.

The stream (`TokenReader`) is addressed by position, so it is the same whatever the number of processes:

- each source (`TokenCorpus`: a tokenized folder, memory-mapped, or text files tokenized in memory for small
  corpora such as the demo's) is an endless token stream (`SourceStream`): epoch e lays its documents back to
  back in a seeded order -- blocks of `block_docs` consecutive documents in a shuffled order, documents shuffled
  within each block (a full shuffle when the corpus has at most `block_docs` documents);
- global row k comes from source s_k, drawn with probability proportional to the source weights from a counter-
  based hash of (seed, k) -- the data mix, by tokens; a row of length L from a source at offset p is that
  source's tokens [p, p + L] (L + 1 tokens; the next row of the source starts at p + L, so every token except a
  document's BOS is a label exactly once, as `PackedText` packs);
- the state (`RowCursor`) is the global row count and each source's offset: advancing past a global batch of B
  rows only counts (no token is read), and process `rank` of `world` reads only rows rank * B/world ...
  (rank + 1) * B/world - 1 of each batch, straight from the memory map.

Batch sizes, sequence lengths and mixture weights may change between batches (the ramp, the anneal): they are
parameters of the next batch, not of the stream.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .mixture import load_corpus
from .packing import pack_heldout, rows_from_windows
from .seeding import derive_seed
from .text import TextSource, TokenizerLike, check_source_names
from .token_folders import INDEX, read_index

__all__ = ["RowCursor", "SourceStream", "TokenCorpus", "TokenReader", "heldout_token_batches"]

_STATE = "mm.tokens.rows/1"


# -------------------------------------------------------------------------------------------------- corpora


class TokenCorpus:
    """One source's documents as token arrays: memory-mapped shards of token folders, or arrays in memory.

    Documents never span shards; `document(d)` is the token ids of document d (bos + ids + eos) in stored
    order over all shards."""

    def __init__(
        self, name: str, shards: Sequence[tuple[np.ndarray, np.ndarray]], info: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.info = info or {}
        self._tokens = [t for t, _ in shards]
        self._starts = [s for _, s in shards]
        docs = np.asarray([len(s) for s in self._starts], dtype=np.int64)
        toks = np.asarray([len(t) for t in self._tokens], dtype=np.int64)
        self._doc_base = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
        self._tok_base = np.concatenate([[0], np.cumsum(toks)]).astype(np.int64)
        self.num_documents = int(self._doc_base[-1])
        self.num_tokens = int(self._tok_base[-1])
        if self.num_documents == 0 or self.num_tokens == 0:
            raise ValueError(f"text source {name!r} holds no documents")

    @classmethod
    def open(cls, folders: Sequence[str | os.PathLike[str]], name: str) -> TokenCorpus:
        """Memory-map the shards of one or more token folders (nothing is read until used)."""
        shards = []
        for folder in folders:
            folder = Path(folder)
            index = read_index(folder)
            if index.get("dtype") != "uint32":
                raise ValueError(f"{folder / INDEX}: dtype {index.get('dtype')!r}; expected uint32")
            for s in index["shards"]:
                if s["num_tokens"] == 0:
                    continue
                tokens = np.memmap(folder / s["tokens"], dtype=np.uint32, mode="r")
                if len(tokens) != s["num_tokens"]:
                    raise ValueError(
                        f"{folder / s['tokens']}: {len(tokens)} tokens, the index says {s['num_tokens']}"
                    )
                starts = np.load(folder / s["documents"], mmap_mode="r")
                if len(starts) != s["num_documents"]:
                    raise ValueError(
                        f"{folder / s['documents']}: {len(starts)} documents, the index says "
                        f"{s['num_documents']}"
                    )
                shards.append((tokens, starts))
        return cls(name, shards, {"folders": [str(f) for f in folders]})

    @classmethod
    def from_text(cls, source: TextSource, tokenizer: TokenizerLike) -> TokenCorpus:
        """Read and tokenize a text source into memory (small corpora, e.g. the demo's)."""
        c = load_corpus(source, tokenizer)
        return cls(source.name, [(c.tokens, c.offsets[:-1])], {"read_stats": c.read_stats})

    def global_starts(self, docs: np.ndarray) -> np.ndarray:
        """Token offset of each document in the concatenation of the shards (`num_documents` -> the end)."""
        docs = np.asarray(docs, dtype=np.int64)
        out = np.full(docs.shape, self.num_tokens, dtype=np.int64)
        inside = docs < self.num_documents
        si = np.searchsorted(self._doc_base, docs, side="right") - 1
        for s in np.unique(si[inside]):
            m = inside & (si == s)
            out[m] = self._tok_base[s] + np.asarray(self._starts[s][docs[m] - self._doc_base[s]], np.int64)
        return out

    def document(self, d: int) -> np.ndarray:
        """Token ids of document d (a view into the memory map)."""
        s = int(np.searchsorted(self._doc_base, d, side="right")) - 1
        local = d - int(self._doc_base[s])
        starts = self._starts[s]
        end = int(starts[local + 1]) if local + 1 < len(starts) else len(self._tokens[s])
        return self._tokens[s][int(starts[local]) : end]

    def documents(self) -> Any:
        """Every document in stored order."""
        return (self.document(d) for d in range(self.num_documents))


def heldout_token_batches(corpora: Sequence[TokenCorpus], seq_len: int, batch_size: int, eos_id: int) -> Any:
    """One pass over the documents of token corpora in stored order, packed as `heldout_batches` packs."""
    return pack_heldout((d for c in corpora for d in c.documents()), seq_len, batch_size, eos_id)


# --------------------------------------------------------------------------------------------------- orders


class SourceStream:
    """One source's endless token stream (see the module docstring): `read(p, n)` returns tokens p .. p + n - 1
    and their document-start flags, reading only those documents."""

    def __init__(self, corpus: TokenCorpus, seed: int, block_docs: int = 4096) -> None:
        if block_docs < 1:
            raise ValueError(f"block_docs must be >= 1, got {block_docs}")
        self.corpus, self.seed, self.block_docs = corpus, seed, block_docs
        d = corpus.num_documents
        self.n_blocks = math.ceil(d / block_docs)
        bounds = corpus.global_starts(np.minimum(np.arange(self.n_blocks + 1) * block_docs, d))
        self.block_tokens = np.diff(bounds)
        self._epochs: OrderedDict[int, tuple[list[int], np.ndarray]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned workers without the order caches."""
        return {**self.__dict__, "_epochs": OrderedDict(), "_blocks": OrderedDict()}

    def _epoch(self, e: int) -> tuple[list[int], np.ndarray]:
        """(block order, cumulative tokens along it) of epoch e."""
        hit = self._epochs.get(e)
        if hit is None:
            order = list(range(self.n_blocks))
            _shuffle(order, "mm.tokens.blocks", self.seed, self.corpus.name, e)
            hit = (order, np.cumsum(self.block_tokens[order]))
            self._epochs[e] = hit
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return hit

    def _block(self, e: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(documents in order, cumulative tokens along them) of block b in epoch e."""
        hit = self._blocks.get((e, b))
        if hit is None:
            lo = b * self.block_docs
            hi = min(lo + self.block_docs, self.corpus.num_documents)
            perm = list(range(hi - lo))
            _shuffle(perm, "mm.tokens.docs", self.seed, self.corpus.name, e, b)
            docs = lo + np.asarray(perm, dtype=np.int64)
            lengths = self.corpus.global_starts(docs + 1) - self.corpus.global_starts(docs)
            hit = (docs, np.cumsum(lengths))
            self._blocks[(e, b)] = hit
            while len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        return hit

    def read(self, p: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [p, p + n) of the stream (int64) and True where a document starts."""
        tokens = np.empty(n, dtype=np.int64)
        starts = np.zeros(n, dtype=bool)
        total = self.corpus.num_tokens
        got = 0
        while got < n:
            e, q = divmod(p + got, total)
            order, cum = self._epoch(e)
            i = int(np.searchsorted(cum, q, side="right"))
            q -= int(cum[i - 1]) if i else 0
            docs, dcum = self._block(e, order[i])
            j = int(np.searchsorted(dcum, q, side="right"))
            off = q - (int(dcum[j - 1]) if j else 0)
            doc = self.corpus.document(int(docs[j]))
            take = min(n - got, len(doc) - off)
            tokens[got : got + take] = doc[off : off + take]
            starts[got] = off == 0
            got += take
        return tokens, starts


def _shuffle(items: list[int], *key: object) -> None:
    """Shuffle in place, seeded by the key (Python's `random`: the same order on every platform and version)."""
    import random

    random.Random(derive_seed(*key)).shuffle(items)


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _uniforms(seed: int, rows: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per global row, from a counter-based hash (SplitMix64) of (seed, row)."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


# --------------------------------------------------------------------------------------------------- reader


class RowCursor:
    """The global packing state before a batch: rows taken so far, each source's offset and rows, tokens;
    `params` = (global rows B, sequence length L, weights per source or None)."""

    def __init__(self, reader: TokenReader, state: dict[str, Any], params: Hashable) -> None:
        self.reader = reader
        self.row = int(state["row"])
        self.offsets = [int(x) for x in state["offsets"]]
        self.rows = [int(x) for x in state["rows"]]
        self.tokens = int(state["tokens"])
        self.batch_rows, self.seq_len, weights = params if params is not None else (0, 0, None)
        w = np.asarray(weights if weights is not None else reader.weights, dtype=np.float64)
        if w.shape != (len(reader.streams),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"mixture weights must be >= 0 with a positive sum, one per source; got {weights}"
            )
        self.cum_weights = np.cumsum(w)
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, source offset) of each row of the next global batch."""
        if self._plan is not None and self._plan[0] == self.row:
            return self._plan[1], self._plan[2]
        b, L = self.batch_rows, self.seq_len
        rows = np.arange(self.row, self.row + b, dtype=np.int64)
        if len(self.reader.streams) == 1:
            src = np.zeros(b, dtype=np.int64)
        else:
            u = _uniforms(self.reader.mix_seed, rows) * self.cum_weights[-1]
            src = np.minimum(np.searchsorted(self.cum_weights, u, side="right"), len(self.cum_weights) - 1)
        off = np.empty(b, dtype=np.int64)
        for s in np.unique(src):
            m = src == s
            off[m] = self.offsets[s] + L * np.arange(int(m.sum()), dtype=np.int64)
        self._plan = (self.row, src, off)
        return src, off

    def advance(self) -> None:
        """Move past the global batch (no token is read)."""
        src, _ = self.plan()
        counts = np.bincount(src, minlength=len(self.offsets))
        for s, c in enumerate(counts):
            self.offsets[s] += int(c) * self.seq_len
            self.rows[s] += int(c)
        self.row += self.batch_rows
        self.tokens += self.batch_rows * self.seq_len

    def state_dict(self) -> dict[str, Any]:
        """The world-size independent packing state (plain JSON)."""
        return {
            "format": _STATE,
            "row": self.row,
            "offsets": list(self.offsets),
            "rows": list(self.rows),
            "tokens": self.tokens,
            "sources": self.reader.signature(),
        }


class TokenReader:
    """Packed rows of a weighted mixture of token corpora, for `mm.datasets.loader.ResumableLoader` (see the
    module docstring). `stats()` counts what this process read: rows and tokens, per source."""

    def __init__(
        self,
        corpora: Sequence[TokenCorpus],
        weights: Sequence[float],
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        block_docs: int = 4096,
    ) -> None:
        if not corpora:
            raise ValueError("TokenReader needs at least one source")
        check_source_names([c.name for c in corpora])
        if len(weights) != len(corpora) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"one weight >= 0 per source with a positive sum, got {list(weights)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.corpora = list(corpora)
        self.weights = [float(w) for w in weights]
        self.seed, self.rank, self.world = int(seed), rank, world
        self.mix_seed = derive_seed("mm.tokens.mixture", seed)
        self.streams = [SourceStream(c, self.seed, block_docs) for c in corpora]
        self._rows_read = [0] * len(corpora)
        self._tokens_read = [0] * len(corpora)

    def signature(self) -> list[list[Any]]:
        """(name, documents, tokens) per source: what a saved state must match."""
        return [[c.name, c.num_documents, c.num_tokens] for c in self.corpora]

    def initial_state(self) -> dict[str, Any]:
        """Nothing read yet."""
        k = len(self.corpora)
        return {"format": _STATE, "row": 0, "offsets": [0] * k, "rows": [0] * k, "tokens": 0}

    def cursor(self, state: dict[str, Any], params: Hashable) -> RowCursor:
        """A cursor at a saved state (checked against these sources) for batches of `params`."""
        if state.get("format") != _STATE:
            raise ValueError(
                f"data state of format {state.get('format', state.get('version'))!r} is not a packed-row "
                f"position ({_STATE}); a checkpoint of the older in-memory text stream cannot be continued "
                "by position: start the stage again"
            )
        saved = state.get("sources")
        if saved is not None and [list(s) for s in saved] != self.signature():
            raise ValueError(
                f"data state belongs to other text sources: saved (name, documents, tokens) {saved}, these "
                f"sources {self.signature()}"
            )
        if params is not None:
            b, seq_len, _ = params
            if b % self.world or b < self.world or seq_len < 1:
                raise ValueError(
                    f"global batch of {b} rows is not divisible by the {self.world} processes (seq_len {seq_len})"
                )
        return RowCursor(self, state, params)

    def read(self, cursor: RowCursor) -> dict[str, torch.Tensor]:
        """This process's rows of the batch at the cursor: tokens, labels, doc_ids (B / world, L)."""
        src, off = cursor.plan()
        per = cursor.batch_rows // self.world
        lo, L = self.rank * per, cursor.seq_len
        windows = np.empty((per, L + 1), dtype=np.int64)
        starts = np.empty((per, L + 1), dtype=bool)
        for i in range(per):
            s = int(src[lo + i])
            windows[i], starts[i] = self.streams[s].read(int(off[lo + i]), L + 1)
            self._rows_read[s] += 1
            self._tokens_read[s] += L + 1
        return rows_from_windows(windows, starts)

    def stats(self) -> dict[str, Any]:
        """Rows and tokens this process read, in total and per source."""
        names = [c.name for c in self.corpora]
        return {
            "rows_read": sum(self._rows_read),
            "tokens_read": sum(self._tokens_read),
            "rows_read_per_source": dict(zip(names, self._rows_read)),
            "tokens_read_per_source": dict(zip(names, self._tokens_read)),
        }

    def progress(self, state: dict[str, Any]) -> dict[str, Any]:
        """World-size independent figures of a state: tokens seen, and per source rows, tokens, epoch."""
        out: dict[str, Any] = {"tokens_seen": int(state.get("tokens", 0)), "sources": {}}
        for i, c in enumerate(self.corpora):
            off = int(state["offsets"][i]) if "offsets" in state else 0
            out["sources"][c.name] = {
                "documents": c.num_documents,
                "tokens": c.num_tokens,
                "rows": int(state["rows"][i]) if "rows" in state else 0,
                "epoch": off // c.num_tokens,
                **{k: v for k, v in c.info.get("read_stats", {}).items() if k in ("files", "replaced_bytes")},
            }
        return out
