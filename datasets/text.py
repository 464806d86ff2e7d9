"""Text corpora for LM pretraining: document readers and the sources of a data mix.

A source (`TextSource`) is files or folders with a mixture weight; its documents are packed into rows by
`packing` (one held-out pass) and `mixture.PackedText` (an in-memory weighted mixture), or tokenized once into
memory-mapped shards by `tokens` (training). `IGNORE_INDEX` is the label the loss ignores in every packed batch.

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

import codecs
import gzip
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "DOC_SPLITS",
    "IGNORE_INDEX",
    "TextSource",
    "TokenizerLike",
    "new_read_stats",
    "read_documents",
]

logger = logging.getLogger(__name__)

# Label value the loss ignores (PyTorch's cross_entropy default).
IGNORE_INDEX = -100
DOC_SPLITS: tuple[str, ...] = ("paragraph", "line")
# Extensions a folder is searched for (a file given by name is read whatever its extension).
_FOLDER_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".text", ".jsonl", ".jsonl.gz", ".txt.gz")
# How many skipped JSONL lines per file are logged one by one (the rest only in the per-file summary).
_MAX_LOGGED_SKIPS = 5


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


def check_source_names(names: list[str]) -> None:
    """Refuse repeated text source names (they key the mixture's draws and the data position)."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"text source names must be unique, repeated: {', '.join(dupes)} (set name=...)")
