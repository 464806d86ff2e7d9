"""Endless, seeded, resumable streams of image-text samples for training: a JSONL manifest (shuffled order per
epoch) or WebDataset shards (shard order shuffled per epoch, samples in stored order). A stream's position
(`state_dict`) is plain JSON, so an interrupted run continues with the same samples. Unusable files are
skipped and counted by the underlying readers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .images import ImageTextDataset, ImageTextShards

# Decoded, tiled samples kept in memory across the stages of one process (e.g. the demo), keyed by
# (manifest, transform); only used when a stream is opened with cache=True.
_CACHE: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}


class ManifestStream:
    """Samples of one JSONL manifest in a shuffled order per epoch (seeded by seed and epoch).

    The stream is a sequence of positions 0, 1, 2, ... over the epochs (position g is entry g % N of epoch
    g // N's order). Process `rank` of `world` reads only the positions g with g % world == rank, so the
    processes of a run read disjoint shares whose union, step by step, is what one process reads (when no
    file is skipped). Each sample carries its `position`, a key for per-sample randomness that does not
    depend on how a batch is split over processes.

    With `cache=True` every decoded, tiled sample is kept in memory (the tiling is deterministic), so later
    epochs and later stages of the same process skip decoding; meant for small data such as the demo's.
    """

    def __init__(
        self, dataset: Any, seed: int = 0, cache: bool = False, *, rank: int = 0, world: int = 1
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.dataset, self.seed, self.rank, self.world = dataset, seed, rank, world
        self.position = rank  # the next position this process reads
        self._order: tuple[int, list[int]] | None = None  # (epoch, order)
        key = (str(dataset.manifest.resolve()), repr(dataset.transform))
        self._cache = _CACHE.setdefault(key, {}) if cache else None

    def _load(self, idx: int) -> dict[str, Any] | None:
        if self._cache is None:
            return self.dataset.load(idx)
        if idx in self._cache:
            self.dataset.stats.ok()  # counted as if decoded, like the uncached path
            return self._cache[idx]
        sample = self.dataset.load(idx)
        if sample is not None:  # bad entries are not cached: each stream's dataset counts its own skips
            self._cache[idx] = sample
        return sample

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, len(self.dataset))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.dataset.sample_order(self.seed, epoch))
        return self._order[1][k]

    def next(self) -> dict[str, Any]:
        """The next usable sample of this process's share (with its stream `position`)."""
        for _ in range(2 * len(self.dataset) + 1):
            g = self.position
            self.position += self.world
            sample = self._load(
                self._index(g)
            )  # None for an unusable file (counted and logged by the dataset)
            if sample is not None:
                return {**sample, "position": g}
        raise ValueError(
            f"{self.dataset.manifest}: no usable sample in two passes ({self.dataset.stats.as_dict()})"
        )

    def stats(self) -> dict[str, Any]:
        """Skip counts per reason."""
        return self.dataset.stats.as_dict()

    def state_dict(self) -> dict[str, Any]:
        """The position where the run's next step starts (the same on every process when nothing was
        skipped), so a run resumes with any number of processes."""
        return {"position": self.position - self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (also reads the older {epoch, cursor} form)."""
        if "position" in state:
            start = int(state["position"])
        else:
            start = int(state["epoch"]) * len(self.dataset) + int(state["cursor"])
        self.position, self._order = start + self.rank, None


class ShardStream:
    """Samples of WebDataset shards, epoch after epoch; the position is (epoch, samples taken in it)."""

    def __init__(self, shards: ImageTextShards) -> None:
        self.shards = shards
        self.epoch, self.taken = 0, 0
        self._it: Iterator[dict[str, Any]] | None = None

    def _open(self) -> None:
        self.shards.set_epoch(self.epoch)
        self._it = iter(self.shards)
        for _ in range(self.taken):  # resume: pass over the samples this epoch already used
            next(self._it)

    def next(self) -> dict[str, Any]:
        """The next usable sample."""
        for _ in range(2):
            if self._it is None:
                self._open()
            try:
                sample = next(self._it)
                self.taken += 1
                return sample
            except StopIteration:
                if self.taken == 0:
                    break
                self.epoch, self.taken, self._it = self.epoch + 1, 0, None
        raise ValueError(
            f"shards {[str(s) for s in self.shards.shards[:3]]}...: no usable sample in an epoch"
        )

    def stats(self) -> dict[str, Any]:
        """Skip counts per reason."""
        return self.shards.stats.as_dict()

    def state_dict(self) -> dict[str, Any]:
        """Epoch and samples taken in it."""
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch, self.taken, self._it = int(state["epoch"]), int(state["taken"]), None


def open_stream(
    paths: Sequence[str],
    transform: Callable[[Image.Image], Any],
    *,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    cache: bool = False,
    rank: int = 0,
    world: int = 1,
) -> ManifestStream | ShardStream:
    """A stream over one JSONL manifest, or over WebDataset shards (.tar files, globs, brace ranges, folders);
    process `rank` of `world` reads only its share (`ManifestStream`; shards are split over processes)."""
    if not paths:
        raise ValueError("no training data given")
    if len(paths) == 1 and Path(paths[0]).suffix in (".jsonl", ".json"):
        dataset = ImageTextDataset(paths[0], transform, max_bad_fraction=max_bad_fraction)
        return ManifestStream(dataset, seed, cache=cache, rank=rank, world=world)
    if any(Path(p).suffix in (".jsonl", ".json") for p in paths):
        raise ValueError(f"give one JSONL manifest, or WebDataset shards; got {list(paths)}")
    return ShardStream(
        ImageTextShards(
            list(paths), transform, seed=seed, max_bad_fraction=max_bad_fraction, rank=rank, world_size=world
        )
    )
