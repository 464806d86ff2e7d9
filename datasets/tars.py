"""WebDataset tar shards read in order: shard lists (paths, globs, brace ranges, folders), member names split into
(key, extension) as WebDataset does (the member name up to the first dot of its file name is the key), and the
groups of consecutive members sharing a key. Members are read into memory and never extracted, so member names
such as `../x.png` are harmless (their group is marked unsafe); members larger than `max_member_bytes` are noted,
not read. Random access into the same shards is `mm.datasets.shards`.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .skips import SkipStats

__all__ = ["DEFAULT_MAX_MEMBER_BYTES", "expand_shards", "read_groups", "split_name", "unsafe_member_name"]

# Members larger than this are skipped without being read (a 64-megapixel PNG rarely exceeds it).
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(spec: str) -> list[str]:
    """Expand numeric ranges "{000..009}" (WebDataset's shard notation), zero-padded like the first bound."""
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = spec[: m.start()], spec[m.end() :]
    out = []
    for k in range(int(lo), int(hi) + 1):
        out += _expand_braces(f"{head}{k:0{width}d}{tail}")
    return out


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Shard paths from a path, a glob ("train-*.tar"), a brace range ("train-{00000..00009}.tar"), or a list."""
    specs = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    paths: list[Path] = []
    for spec in specs:
        for item in _expand_braces(os.fspath(spec)):
            if any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"no shard matches {item!r}")
                paths += [Path(p) for p in found]
            elif Path(item).is_dir():
                found = sorted(p for p in Path(item).iterdir() if fnmatch.fnmatch(p.name, "*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard folder {item} holds no .tar file")
                paths += found
            elif Path(item).is_file():
                paths.append(Path(item))
            else:
                raise FileNotFoundError(f"shard {item} does not exist")
    if not paths:
        raise ValueError(f"no shards given ({shards!r})")
    return paths


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, WebDataset style: "dir/abc.seg.png" -> ("dir/abc", "seg.png")."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def unsafe_member_name(name: str) -> bool:
    """True for a tar member name that is absolute or climbs out of its folder ("../x.png", "/etc/x.png")."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/")


def read_groups(
    shard: Path, stats: SkipStats, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {ext: bytes}) for consecutive members sharing a key; oversized members are noted, not read.

    A group may hold the markers `_unsafe` (a member name outside the shard's folder) and `_too_large`; a shard
    that cannot be read to its end is counted once as `broken_shard` in `stats` and the rest of it dropped."""
    key: str | None = None
    group: dict[str, Any] = {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = split_name(member.name)
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, group
                    key, group = split[0], {}
                ext = split[1]
                if unsafe_member_name(member.name):  # never extracted anyway: members are read in memory
                    group["_unsafe"] = f"member name {member.name!r} points outside the shard's folder"
                    continue
                if member.size > max_member_bytes:
                    group["_too_large"] = f"member {member.name} has {member.size} bytes > {max_member_bytes}"
                    continue
                f = tar.extractfile(member)
                group[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # truncated or corrupt shard
        stats.skip("broken_shard", str(shard), f"{type(e).__name__}: {e}; rest of the shard dropped")
        return
    if key is not None:
        yield key, group
