"""How the world's generators write their files: atomic text files, reproducible tar members, and one split
of numbered samples (files, WebDataset shards and a JSONL manifest) that `mm.datasets` reads."""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from .grammar import check_word

__all__ = ["remove_stale", "split_count", "tar_add", "write_lines", "write_split"]


def write_lines(path: Path, lines: list[str]) -> None:
    """Write lines atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata (reproducible bytes)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def remove_stale(folder: Path, pattern: str, keep: int) -> None:
    """Delete files of a previous, larger run: names matching pattern whose number is >= keep."""
    if not folder.is_dir():
        return
    regex = re.compile(pattern)
    for p in folder.iterdir():
        m = regex.fullmatch(p.name)
        if m and int(m.group(1)) >= keep:
            p.unlink()


def split_count(split: str, n: int | None, shard_size: int, defaults: dict[str, int]) -> int:
    """The number of samples to write: `n`, or the split's default; the split must be one of `defaults`."""
    check_word(split, tuple(defaults), "split")
    if n is None:
        n = defaults[split]
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be at least 1, got n={n}, shard_size={shard_size}")
    return n


def write_split(
    root: Path,
    split: str,
    n: int,
    shard_size: int,
    kind: tuple[str, str],
    sample: Callable[[int], tuple[bytes, dict]],
) -> Path:
    """Write samples 0..n-1 of a split (`sample(i)` -> file bytes, metadata with `text`); return the manifest.

    `kind` is (manifest key, file extension), e.g. ("image", "png"): sample i goes to `root/{split}/{i:06d}.ext`,
    to the WebDataset shard `root/{split}-{k:05d}.tar` (`.ext`, `.txt` with the text, `.json` with split, index
    and the metadata; `shard_size` samples each) and to a line of `root/{split}.jsonl` (the key with the path
    relative to `root`, then the metadata). Files of an earlier, larger run of the split are removed.
    """
    key, ext = kind
    item_dir = root / split
    item_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    remove_stale(item_dir, rf"(\d+)\.{ext}", n)
    remove_stale(root, re.escape(split) + r"-(\d{5})\.tar", n_shards)
    lines = []
    for k in range(n_shards):
        shard = root / f"{split}-{k:05d}.tar"
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{shard.name}.", suffix=".tmp")
        try:
            with (
                os.fdopen(fd, "wb") as f,
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ):
                for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
                    data, meta = sample(i)
                    name = f"{i:06d}"
                    (item_dir / f"{name}.{ext}").write_bytes(data)
                    lines.append(json.dumps({key: f"{split}/{name}.{ext}", **meta}))
                    tar_add(tar, f"{name}.{ext}", data)
                    tar_add(tar, f"{name}.txt", meta["text"].encode("utf-8"))
                    tar_add(
                        tar, f"{name}.json", json.dumps({"split": split, "index": i, **meta}).encode("utf-8")
                    )
            os.replace(tmp, shard)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    manifest = root / f"{split}.jsonl"
    write_lines(manifest, lines)
    return manifest
