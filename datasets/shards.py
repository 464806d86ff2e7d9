"""Random access into WebDataset tar shards: an index of each shard's samples (byte ranges, from the tar headers
only), a seeded, world-size independent epoch order, and one sample read with `os.pread` and parsed by the
`webdataset` package's tar iterator.

Why not `webdataset.WebDataset(...).compose(split_by_node, split_by_worker)`: that pipeline hands whole shards
to each (process, worker) and streams them in order, so which samples make up a global batch depends on the
number of processes and of workers, and resuming means reading a shard again up to the point reached. Training
here needs the sample at a global position to be the same whatever the world size (a 4-process checkpoint
resumes on 2 processes with the same batches), and resuming to seek. So the shards are indexed instead: opening
reads every member header (seeking over the data, nothing is decoded), a sample is the members sharing a key
(WebDataset's key convention: the member name up to the first dot of its file name), and reading a sample is
one `pread` of its byte range, parsed with `webdataset.tariterators.tar_file_iterator`. Shards must be files on
a filesystem (local or mounted); URLs and pipes, which WebDataset can stream, cannot be read at random.

Order (`order_index`): epoch e visits the shards in a seeded order (seed, e) and cuts the concatenated samples
into windows of `window` consecutive samples, each visited in a seeded order (seed, e, window): a shuffle
buffer whose contents are fixed by position, not by what a reader happened to read before. Process `rank`
then reads every `world`-th position of each window (`mm.datasets.streams`), i.e. only its samples' bytes.

Bad input follows the readers' policy (`mm.datasets.skips`): a member larger than `max_member_bytes` or a
member cut off by the end of the file marks its sample bad without reading it; a shard whose headers stop early
(corrupt or truncated) is counted once as `broken_shard` when it is indexed, keeping the samples before the
break; member names that climb out of the folder mark their sample `unsafe_name` (members are never extracted
anyway). A sample's members become the sample as in sequential reading (`mm.datasets.media.decode_group`).
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.tariterators import tar_file_iterator

from .media import MediaDecoder, decode_group
from .seeding import derive_seed
from .skips import BadSample, SkipStats
from .tars import DEFAULT_MAX_MEMBER_BYTES, expand_shards, split_name, unsafe_member_name

__all__ = ["IndexedShards", "ShardIndex", "index_shard"]

_BLOCK = 512
_MAX_OPEN = 64  # shard files kept open per process


@dataclass
class ShardIndex:
    """The samples of one shard: byte range [start, end) of each (its members' headers and data), problems
    known from the headers (sample -> (reason, detail)), and why the index stops early (None: it does not)."""

    path: Path
    starts: np.ndarray
    ends: np.ndarray
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)
    broken: str | None = None


def index_shard(path: str | os.PathLike[str], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> ShardIndex:
    """Index a tar shard from its headers (data is skipped by seeking): one byte range per run of members
    sharing a key."""
    path = Path(path)
    size = path.stat().st_size
    starts: list[int] = []
    ends: list[int] = []
    problems: dict[int, tuple[str, str]] = {}
    broken = None
    key: str | None = None
    try:
        with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                tar.members = []  # keep memory flat on large shards
                split = split_name(member.name) if member.isfile() else None
                if split is None:  # folders, links, names without an extension: not part of a sample
                    continue
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if split[0] != key:
                    key = split[0]
                    starts.append(member.offset)
                    ends.append(end)
                else:
                    ends[-1] = end
                n = len(starts) - 1
                if member.size > max_member_bytes:
                    problems[n] = (
                        "too_large",
                        f"member {member.name} has {member.size} bytes > {max_member_bytes}",
                    )
                if member.offset_data + member.size > size:
                    problems[n] = ("truncated", f"member {member.name} ends past the end of the shard")
            stop = tar.offset
        with path.open("rb") as f:
            f.seek(stop)
            rest = f.read(2 * _BLOCK)
        if rest.strip(b"\0"):
            broken = f"unreadable tar header at byte {stop} of {size}"
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # not a tar file, or a broken first header
        broken = f"{type(e).__name__}: {e}"
    if broken is not None and starts and len(starts) - 1 not in problems:
        problems[len(starts) - 1] = ("truncated", f"last sample before the break ({broken})")
    return ShardIndex(path, np.asarray(starts, np.int64), np.asarray(ends, np.int64), problems, broken)


def _group(data: bytes) -> tuple[str, dict[str, Any]]:
    """(key, {extension: bytes}) of one sample's tar bytes, parsed with webdataset's tar iterator."""
    key: str | None = None
    group: dict[str, Any] = {}
    try:
        for member in tar_file_iterator(io.BytesIO(data + b"\0" * (2 * _BLOCK))):
            split = split_name(member["fname"])
            if split is None:
                continue
            key = key or split[0]
            if unsafe_member_name(member["fname"]):
                group["_unsafe"] = f"member name {member['fname']!r} points outside the shard's folder"
                continue
            group[split[1]] = member["data"]
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise BadSample("corrupt", f"unreadable tar members ({type(e).__name__}: {e})") from None
    if key is None:
        raise BadSample("corrupt", "no members")
    return key, group


class IndexedShards:
    """WebDataset shards as an indexed dataset: `len`, `load(i)` -> sample or None (a bad sample is counted
    in `stats` once and remembered), `order_index(seed, epoch, k)` (see the module docstring).

    A sample's members ({extension: bytes}) become the sample by `mm.datasets.media.decode_group` with the
    modality's `decoder` (raising BadSample when unusable); the sample also gets `source` ("shard:key"), `key`
    and `index` (its number in the shards' stored order)."""

    kind = "shard"

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        decoder: MediaDecoder,
        *,
        require_text: bool = True,
        window: int = 1024,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        max_bad_fraction: float = 0.05,
        min_tried: int = 20,
    ) -> None:
        if window < 1:
            raise ValueError(f"shuffle_window must be >= 1 (1 = stored order), got {window}")
        self.shards = expand_shards(shards)
        self.decoder, self.require_text, self.window = decoder, require_text, int(window)
        self.transform = decoder.transform  # what streams key their in-memory cache on
        self.stats = SkipStats(
            max_bad_fraction, min_tried, what=f"{decoder.unit} of shards {self.shards[0].parent}"
        )
        self.indexes = [index_shard(p, max_member_bytes) for p in self.shards]
        for ix in self.indexes:
            if ix.broken is not None:
                self.stats.skip("broken_shard", str(ix.path), f"{ix.broken}; rest of the shard dropped")
        self.counts = np.asarray([len(ix.starts) for ix in self.indexes], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        if self._first[-1] == 0:
            raise ValueError(f"shards {[str(p) for p in self.shards[:3]]}...: no samples")
        self._bad: set[int] = set()
        self._fds: dict[int, int] = {}
        self._epoch: tuple[int, int, list[int], np.ndarray] | None = None  # (seed, epoch, order, cum counts)
        self._perm: tuple[int, int, int, list[int]] | None = None  # (seed, epoch, window, order)

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers: open files are not carried over."""
        return {**self.__dict__, "_fds": {}}

    # ---------------------------------------------------------------------------------------------- order

    def order_index(self, seed: int, epoch: int, k: int) -> int:
        """The sample (number in stored order) at place k of epoch `epoch`'s order."""
        n = len(self)
        if not 0 <= k < n:
            raise IndexError(f"place {k} out of range for {n} samples")
        if self._epoch is None or self._epoch[:2] != (seed, epoch):
            order = list(range(len(self.shards)))
            random.Random(derive_seed("mm.shards.order", seed, epoch)).shuffle(order)
            self._epoch = (seed, epoch, order, np.cumsum(self.counts[order]))
        _, _, order, cum = self._epoch
        w, j = divmod(k, self.window)
        if self._perm is None or self._perm[:3] != (seed, epoch, w):
            perm = list(range(min(self.window, n - w * self.window)))
            random.Random(derive_seed("mm.shards.window", seed, epoch, w)).shuffle(perm)
            self._perm = (seed, epoch, w, perm)
        t = w * self.window + self._perm[3][j]  # place in the epoch's concatenation of shards
        si = int(np.searchsorted(cum, t, side="right"))
        local = t - (int(cum[si - 1]) if si else 0)
        return int(self._first[order[si]]) + local

    def sample_order(self, seed: int, epoch: int) -> list[int]:
        """The whole order of an epoch (for small data and tests)."""
        return [self.order_index(seed, epoch, k) for k in range(len(self))]

    # --------------------------------------------------------------------------------------------- samples

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, sample number within the shard) of sample i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self._first, i, side="right")) - 1
        return shard, i - int(self._first[shard])

    def _read(self, shard: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of a shard (pread: no shared file offset, safe in forked workers)."""
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                for old in self._fds.values():
                    os.close(old)
                self._fds.clear()
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(fd, end - start, start)

    def load(self, i: int) -> dict[str, Any] | None:
        """Sample i, or None if it is unusable (counted in `stats` the first time)."""
        if i in self._bad:
            return None
        shard, local = self.locate(i)
        ix = self.indexes[shard]
        source = f"{ix.path}:#{local}"
        try:
            if local in ix.problems:
                raise BadSample(*ix.problems[local])
            key, group = _group(self._read(shard, int(ix.starts[local]), int(ix.ends[local])))
            source = f"{ix.path}:{key}"
            sample = decode_group(group, self.decoder, self.require_text)
        except BadSample as e:
            self._bad.add(i)
            self.stats.skip(e.reason, source, e.detail)
            return None
        self.stats.ok()
        sample.update(source=source, key=key, index=i)
        return sample

    def close(self) -> None:
        """Close the open shard files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
