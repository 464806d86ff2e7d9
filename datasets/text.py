"""Text corpora for LM pretraining: document readers, a weighted mixture, packing, and a resumable order.

The Llama 3 pretraining data path (paper section 3.1 and 3.4): documents from several sources are mixed with
fixed weights (the data mix), tokenized as `<|begin_of_text|> text <|end_of_text|>`, and packed into one
continuous token stream that is cut into fixed-length rows; the model's document masking (`doc_ids`) keeps
tokens from attending across document boundaries. The batch and sequence-length ramp is supported by letting
`seq_len` change from one batch to the next: the stream just continues.

Readers (`read_documents`):

- `.txt`, `.md` and any other text file: one document per paragraph (blocks of lines separated by blank
  lines), or with `doc_split="line"` one document per non-blank line (the shapes corpus).
- `.jsonl` (or `.json` holding JSON lines): the `text` field of each record; `.jsonl.gz`: the same, gzipped
  (any file whose name ends in `.gz` is decompressed, e.g. `.txt.gz`).
- folders: every `.txt`, `.md`, `.text`, `.jsonl`, `.jsonl.gz` and `.txt.gz` file below it, recursively, in
  sorted order of relative path (hidden files and folders are skipped).

Bytes that are not UTF-8 are replaced by U+FFFD and counted; JSONL lines that are not JSON objects with a
string `text` are skipped and counted; both are reported in a stats dict and with a logging warning naming the
file. Nothing here imports from the composition layer; the tokenizer is duck-typed (`encode(text)`, `bos_id`,
`eos_id`, and optionally `encode_batch(texts)`), e.g. `mm.lm.Tokenizer`.
"""

from __future__ import annotations

import bisect
import codecs
import gzip
import hashlib
import json
import logging
import math
import os
import random
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "DOC_SPLITS",
    "IGNORE_INDEX",
    "PackedText",
    "TextSource",
    "TokenizerLike",
    "heldout_batches",
    "new_read_stats",
    "pack_heldout",
    "read_documents",
    "rows_from_windows",
]

logger = logging.getLogger(__name__)

# Label value the loss ignores (PyTorch's cross_entropy default).
IGNORE_INDEX = -100
DOC_SPLITS: tuple[str, ...] = ("paragraph", "line")
# Extensions a folder is searched for (a file given by name is read whatever its extension).
_FOLDER_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".text", ".jsonl", ".jsonl.gz", ".txt.gz")
# How many skipped JSONL lines per file are logged one by one (the rest only in the per-file summary).
_MAX_LOGGED_SKIPS = 5
_STATE_VERSION = 1


class TokenizerLike(Protocol):
    """What the packers need from a tokenizer (`mm.lm.Tokenizer` has it)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Ids of text, without bos/eos."""
        ...


# ------------------------------------------------------------------------------------------------ reading

_replaced = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: like "replace", and counts the replaced bytes in a thread-local counter."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _replaced.n += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("mm.count-replace", _count_and_replace)


def _decode(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8 with U+FFFD replacement; return the text and the number of bytes replaced."""
    _replaced.n = 0
    text = raw.decode("utf-8", errors="mm.count-replace")
    return text, _replaced.n


def new_read_stats() -> dict[str, Any]:
    """An empty stats dict, as filled in by `read_documents`."""
    return {
        "files": 0,
        "documents": 0,
        "replaced_bytes": 0,
        "skipped_records": 0,
        "replaced_bytes_per_file": {},
        "skipped_records_per_file": {},
    }


def _is_jsonl(path: Path) -> bool:
    """True if the file holds JSON lines (`.jsonl`, `.jsonl.gz`, `.json.gz`)."""
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(".jsonl") or name.endswith(".json")


def _list_files(path: Path) -> list[Path]:
    """The files a path stands for: itself, or the text files below a folder in sorted order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"text data path {path} does not exist")
    files = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name.lower().endswith(_FOLDER_SUFFIXES):
            files.append(p)
    if not files:
        raise ValueError(
            f"text data folder {path} holds no text files ({', '.join(_FOLDER_SUFFIXES)}), so no documents"
        )
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file as bytes without their line ending; gzip-compressed if the name ends in `.gz`."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for raw in f:
                yield raw.rstrip(b"\r\n")
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable gzip file: {e}") from e


def _read_file(path: Path, doc_split: str, stats: dict[str, Any]) -> Iterator[str]:
    """Yield the documents of one file and record its counts in stats."""
    key = str(path)
    replaced = 0
    skipped = 0
    n_docs = 0
    jsonl = _is_jsonl(path)
    paragraph: list[str] = []
    for lineno, raw in enumerate(_raw_lines(path), start=1):
        line, bad = _decode(raw)
        replaced += bad
        if jsonl:
            if not line.strip():
                continue
            reason = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"not JSON ({e.msg})"
            else:
                if not isinstance(record, dict) or "text" not in record:
                    reason = "no 'text' field"
                elif not isinstance(record["text"], str):
                    reason = f"'text' is {type(record['text']).__name__}, not a string"
                elif not record["text"]:
                    reason = "empty 'text'"
            if reason is not None:
                skipped += 1
                if skipped <= _MAX_LOGGED_SKIPS:
                    logger.warning("%s:%d: skipped JSONL record: %s", path, lineno, reason)
                continue
            n_docs += 1
            yield record["text"]
        elif doc_split == "line":
            if line.strip():
                n_docs += 1
                yield line
        elif line.strip():
            paragraph.append(line)
        elif paragraph:
            n_docs += 1
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        n_docs += 1
        yield "\n".join(paragraph)
    stats["files"] += 1
    stats["documents"] += n_docs
    if replaced:
        logger.warning("%s: %d bytes were not UTF-8 and were replaced with U+FFFD", path, replaced)
        stats["replaced_bytes"] += replaced
        stats["replaced_bytes_per_file"][key] = stats["replaced_bytes_per_file"].get(key, 0) + replaced
    if skipped:
        logger.warning("%s: skipped %d JSONL records (not JSON, or no string 'text' field)", path, skipped)
        stats["skipped_records"] += skipped
        stats["skipped_records_per_file"][key] = stats["skipped_records_per_file"].get(key, 0) + skipped


def read_documents(
    path: str | os.PathLike[str], doc_split: str = "paragraph", stats: dict[str, Any] | None = None
) -> Iterator[str]:
    """Iterate over the documents of a text file, JSONL(.gz) file or folder (see the module docstring).

    `doc_split` ("paragraph" or "line") applies to plain text files; JSONL records are always one document
    each. Pass a dict from `new_read_stats()` as `stats` to receive the counts (files, documents, replaced
    bytes, skipped records, per file). A missing path raises FileNotFoundError at once; a path that yields no
    document at all raises ValueError naming it when the iteration ends.
    """
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {doc_split!r}")
    path = Path(path)
    files = _list_files(path)  # raises now, not at the first next()
    if stats is None:
        stats = new_read_stats()
    else:
        for k, v in new_read_stats().items():
            stats.setdefault(k, v)
    return _iter_documents(path, files, doc_split, stats)


def _iter_documents(path: Path, files: list[Path], doc_split: str, stats: dict[str, Any]) -> Iterator[str]:
    """The generator behind `read_documents`."""
    n = 0
    for f in files:
        for doc in _read_file(f, doc_split, stats):
            n += 1
            yield doc
    if n == 0:
        what = "folder" if path.is_dir() else "file"
        raise ValueError(f"text data {what} {path} holds no documents (empty, or every record was skipped)")


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class TextSource:
    """One component of the data mix: files or folders, a mixture weight, a name, and how text files split.

    `paths` may also be given as one string. The name defaults to the first path's file name (plus "+N" when
    there are more); names must be unique within a mixture.
    """

    paths: list[str]
    weight: float = 1.0
    name: str = ""
    doc_split: str = "paragraph"

    def __post_init__(self) -> None:
        """Normalise paths to a list of strings and check weight and doc_split."""
        if isinstance(self.paths, str | os.PathLike):
            self.paths = [self.paths]
        self.paths = [os.fspath(p) for p in self.paths]
        if not self.paths:
            raise ValueError("TextSource needs at least one path")
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"TextSource weight must be a finite number >= 0, got {self.weight!r}")
        if self.doc_split not in DOC_SPLITS:
            raise ValueError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {self.doc_split!r}")
        if not self.name:
            first = Path(self.paths[0]).name or self.paths[0]
            self.name = first + (f"+{len(self.paths) - 1}" if len(self.paths) > 1 else "")

    def documents(self, stats: dict[str, Any] | None = None) -> Iterator[str]:
        """All documents of all paths, in order."""
        for p in self.paths:
            yield from read_documents(p, self.doc_split, stats)


# ------------------------------------------------------------------------------------------------ packing


def _encode_docs(tokenizer: TokenizerLike, docs: Sequence[str]) -> list[list[int]]:
    """Encode documents as bos + ids + eos (batched when the tokenizer has `encode_batch`)."""
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(list(docs)) if callable(batch) else [tokenizer.encode(d) for d in docs]
    bos, eos = int(tokenizer.bos_id), int(tokenizer.eos_id)
    return [[bos, *x, eos] for x in ids]


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Group an iterable into lists of at most size items."""
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _make_rows(stream: np.ndarray, starts: np.ndarray, n_rows: int, seq_len: int) -> dict[str, torch.Tensor]:
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


def _check_shape(batch_size: int, seq_len: int) -> None:
    """Raise ValueError unless both are positive ints."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _derive_seed(*parts: object) -> int:
    """A 64-bit seed derived from the parts (stable across runs and Python versions)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


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


def _load_corpus(source: TextSource, tokenizer: TokenizerLike, chunk_docs: int = 4096) -> _Corpus:
    """Read and tokenize all documents of a source into memory."""
    stats = new_read_stats()
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    for chunk in _chunks(source.documents(stats), chunk_docs):
        for ids in _encode_docs(tokenizer, chunk):
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
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"TextSource names must be unique, repeated: {', '.join(dupes)} (set name=...)")
        weights = [float(s.weight) for s in sources]
        if sum(weights) <= 0:
            raise ValueError("at least one TextSource needs a weight > 0")
        self.sources = sources
        self.tokenizer = tokenizer
        self._corpora = [_load_corpus(s, tokenizer) for s in sources]
        self._cum_weights = list(np.cumsum(weights, dtype=np.float64))
        self._reset(int(seed))

    def _reset(self, seed: int) -> None:
        """Put the stream at its start for the given seed."""
        self.seed = seed
        self._rng = random.Random(_derive_seed("mm.text.mixture", seed))
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
            random.Random(_derive_seed("mm.text.order", self.seed, i, self._epoch[i])).shuffle(order)
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
        _check_shape(batch_size, seq_len)
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
        batch = _make_rows(stream[lo:], starts[lo:], per, seq_len)
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


# ----------------------------------------------------------------------------------------------- held out


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
    _check_shape(batch_size, seq_len)
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

    encoded = (ids for chunk in _chunks(docs(), 256) for ids in _encode_docs(tokenizer, chunk))
    return pack_heldout(encoded, seq_len, batch_size, int(tokenizer.eos_id))


def pack_heldout(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, batch_size: int, eos_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Pack already tokenized documents (bos + ids + eos each) for one held-out pass, as `heldout_batches`."""
    _check_shape(batch_size, seq_len)
    need = batch_size * seq_len + 1
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    flags: list[np.ndarray] = [np.zeros(0, dtype=bool)]
    have = 0
    for chunk in _chunks(documents, 256):
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
                yield _make_rows(stream[off:], starts[off:], batch_size, seq_len)
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
    batch = _make_rows(stream, starts, n_rows, seq_len)
    if pad:
        # Labels pointing into the padding are -100 (the first by the start flag, the rest here).
        batch["labels"][-1, seq_len - pad :] = IGNORE_INDEX
    yield batch
