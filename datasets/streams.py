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

    With `cache=True` every decoded, tiled sample is kept in memory (the tiling is deterministic), so later
    epochs and later stages of the same process skip decoding; meant for small data such as the demo's.
    """

    def __init__(self, dataset: ImageTextDataset, seed: int = 0, cache: bool = False) -> None:
        self.dataset, self.seed = dataset, seed
        self.epoch, self.cursor = 0, 0
        self._order: list[int] | None = None
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

    def next(self) -> dict[str, Any]:
        """The next usable sample."""
        for _ in range(2 * len(self.dataset) + 1):
            if self._order is None:
                self._order = self.dataset.sample_order(self.seed, self.epoch)
            idx = self._order[self.cursor]
            self.cursor += 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            sample = self._load(idx)  # None for an unusable file (counted and logged by the dataset)
            if sample is not None:
                return sample
        raise ValueError(
            f"{self.dataset.manifest}: no usable sample in two passes ({self.dataset.stats.as_dict()})"
        )

    def stats(self) -> dict[str, Any]:
        """Skip counts per reason."""
        return self.dataset.stats.as_dict()

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position in its order."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


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
) -> ManifestStream | ShardStream:
    """A stream over one JSONL manifest, or over WebDataset shards (.tar files, globs, brace ranges, folders)."""
    if not paths:
        raise ValueError("no training data given")
    if len(paths) == 1 and Path(paths[0]).suffix in (".jsonl", ".json"):
        dataset = ImageTextDataset(paths[0], transform, max_bad_fraction=max_bad_fraction)
        return ManifestStream(dataset, seed, cache=cache)
    if any(Path(p).suffix in (".jsonl", ".json") for p in paths):
        raise ValueError(f"give one JSONL manifest, or WebDataset shards; got {list(paths)}")
    return ShardStream(ImageTextShards(list(paths), transform, seed=seed, max_bad_fraction=max_bad_fraction))
