"""Token folders: `mm data tokenize` writes the documents of text files once as memory-mapped token shards.

Folder layout (`tokenize_to_folder`):

    index.json             {"format": "mm-tokens", "version": 1, "dtype": "uint32", "tokenizer": {...},
                            "shards": [{"tokens": "tokens-00000.bin", "documents": "tokens-00000.docs.npy",
                            "num_tokens": n, "num_documents": d}, ...], "num_tokens": N, "num_documents": D, ...}
    tokens-00000.bin       uint32 token ids; every document is bos + ids + eos, documents back to back
    tokens-00000.docs.npy  int64 start of each document in the shard (the document boundaries)
    tokenizer.json|.model  the tokenizer the folder was made with

`index.json` is written last, so a folder without it is an unfinished run. Its `tokenizer` entry (vocabulary size,
bos/eos ids and the ids of a probe text) is checked against the training tokenizer when the folder is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .packing import chunked, encode_documents
from .text import TokenizerLike, new_read_stats, read_documents

__all__ = [
    "FORMAT",
    "INDEX",
    "check_tokenizer",
    "is_token_folder",
    "read_index",
    "tokenize_to_folder",
    "tokenizer_fingerprint",
]

FORMAT = "mm-tokens"
INDEX = "index.json"
_VERSION = 1
_PROBE = "The quick brown fox, 0123456789 -- naïve café 漢字 🙂\n\tdef f(x): return {x: [x]}"


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> dict[str, Any]:
    """What identifies a tokenizer's ids: vocabulary size, bos/eos ids and a hash of a probe text's ids."""
    ids = [int(i) for i in tokenizer.encode(_PROBE)]
    return {
        "vocab_size": int(getattr(tokenizer, "vocab_size", 0)),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
        "probe_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
    }


def is_token_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by `mm data tokenize` (it holds an `index.json` of format mm-tokens)."""
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_index(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The `index.json` of a token folder (checked for format and version)."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a tokenized folder: no {INDEX} (unfinished `mm data tokenize`?)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != _VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}; expected {FORMAT!r} {_VERSION}"
        )
    return index


def check_tokenizer(folder: str | os.PathLike[str], tokenizer: TokenizerLike) -> None:
    """Refuse a token folder made with another tokenizer than `tokenizer`, naming both."""
    index = read_index(folder)
    saved, mine = index["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
    if saved != mine:
        differ = sorted(k for k in mine if saved.get(k) != mine[k])
        raise ValueError(
            f"{folder} was tokenized with another tokenizer ({index['tokenizer'].get('source') or 'unnamed'}): "
            f"{', '.join(differ)} differ (folder {[saved.get(k) for k in differ]}, training tokenizer "
            f"{[mine[k] for k in differ]}); tokenize again with the training tokenizer, or set tokenizer.path "
            f"to the folder's own ({Path(folder) / index['tokenizer'].get('file', '')})"
        )


def tokenize_to_folder(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: TokenizerLike,
    out: str | os.PathLike[str],
    *,
    doc_split: str = "paragraph",
    shard_tokens: int = 1 << 28,
    tokenizer_source: str | None = None,
    chunk_docs: int = 1024,
) -> dict[str, Any]:
    """Tokenize the documents of text files / folders (`read_documents`) into memory-mapped shards in `out`;
    return the index. Shards hold at most `shard_tokens` tokens (a longer document gets a shard of its own)."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    vocab = int(getattr(tokenizer, "vocab_size", 0))
    if vocab > 2**32:
        raise ValueError(f"a vocabulary of {vocab} ids does not fit uint32 token shards")
    out = Path(out)
    if (out / INDEX).exists():
        raise ValueError(f"{out} already holds tokenized data ({INDEX}); remove it or choose another --out")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"text data path {p} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    stats = new_read_stats()
    shards: list[dict[str, Any]] = []
    handle = None
    starts: list[int] = []
    n_tok = 0

    def close() -> None:
        nonlocal handle
        if handle is None:
            return
        handle.close()
        name = shards[-1]["tokens"].removesuffix(".bin")
        np.save(out / f"{name}.docs.npy", np.asarray(starts, dtype=np.int64))
        shards[-1].update(num_tokens=n_tok, num_documents=len(starts))
        handle = None

    docs = (d for p in paths for d in read_documents(p, doc_split, stats))
    for chunk in chunked(docs, chunk_docs):
        for ids in encode_documents(tokenizer, chunk):
            arr = np.asarray(ids, dtype=np.uint32)
            if handle is not None and n_tok + len(arr) > shard_tokens:
                close()
            if handle is None:
                name = f"tokens-{len(shards):05d}"
                shards.append({"tokens": f"{name}.bin", "documents": f"{name}.docs.npy"})
                handle = (out / f"{name}.bin").open("wb")
                starts, n_tok = [], 0
            starts.append(n_tok)
            handle.write(arr.tobytes())
            n_tok += len(arr)
    close()
    tok_file = tokenizer.save(out) if hasattr(tokenizer, "save") else None
    index = {
        "format": FORMAT,
        "version": _VERSION,
        "dtype": "uint32",
        "tokenizer": {
            "source": tokenizer_source,
            "file": Path(tok_file).name if tok_file else None,
            "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "doc_split": doc_split,
        "inputs": [str(p) for p in paths],
        "shards": shards,
        "num_tokens": int(sum(s["num_tokens"] for s in shards)),
        "num_documents": int(sum(s["num_documents"] for s in shards)),
        "read_stats": stats,
    }
    tmp = out / f"{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX)
    return index
