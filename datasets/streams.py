"""Endless, seeded, position-addressed streams of training samples: a JSONL manifest (a fresh shuffled order
per epoch) or WebDataset shards (`mm.datasets.shards.IndexedShards`: shard order shuffled per epoch, then a
seeded shuffle within windows of consecutive samples).

The stream is a sequence of global positions 0, 1, 2, ... over the epochs: position g is the entry at place
g mod N of epoch g // N's order. `sample(g)` is a pure function of (data, seed, g): it does not depend on how
many processes or DataLoader workers read the stream, nor on what was read before, so a run can be split over
any number of processes and resumed at any position without reading the past (`mm.datasets.loader`).

Unusable entries (missing, corrupt, ... files) are skipped and counted by the underlying readers; the position
of an unusable entry is filled by the next usable entry of the stream (positions g + 1, g + 2, ...), so every
position holds a sample and no process's share shifts when another process meets a bad file. A sample keeps
its stream `position` as the key of its per-sample randomness (masks, noise, SpecAugment).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .media import MediaDecoder, MediaTextDataset

# Decoded, tiled samples kept in memory across the stages of one process (e.g. the demo), keyed by
# (data, transform); only used when a stream is opened with cache=True.
_CACHE: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}


def _data_key(dataset: Any) -> str:
    """What identifies a dataset's entries for the in-memory cache: the manifest, or the shard list."""
    manifest = getattr(dataset, "manifest", None)
    if manifest is not None:
        return str(Path(manifest).resolve())
    return "|".join(str(Path(p).resolve()) for p in dataset.shards)


class SampleStream:
    """Position-addressed samples of an indexed dataset (`len`, `load(i)` -> sample or None, `stats`, and
    `order_index(seed, epoch, k)` or `sample_order(seed, epoch)`).

    `sample(g)` is the sample at global position g. The sequential API (`next`, `state_dict`,
    `load_state_dict`) reads the positions of process `rank` of `world`, g = rank, rank + world, ...: the
    processes of a run read disjoint shares whose union, step by step, is what one process reads. Each sample
    carries its `position`.

    With `cache=True` every decoded sample is kept in memory (decoding is deterministic), so later epochs and
    later stages of the same process skip decoding; meant for small data such as the demo's (with DataLoader
    workers each worker keeps its own cache).
    """

    def __init__(
        self, dataset: Any, seed: int = 0, cache: bool = False, *, rank: int = 0, world: int = 1
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.dataset, self.seed, self.rank, self.world = dataset, seed, rank, world
        self.position = rank  # the next position `next` reads
        self._order: tuple[int, list[int]] | None = None  # (epoch, order)
        key = (_data_key(dataset), repr(getattr(dataset, "transform", None)))
        self._cache = _CACHE.setdefault(key, {}) if cache else None

    def __len__(self) -> int:
        return len(self.dataset)

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

    def index(self, position: int) -> int:
        """The dataset entry at a global position."""
        epoch, k = divmod(position, len(self.dataset))
        order_index = getattr(self.dataset, "order_index", None)
        if order_index is not None:
            return int(order_index(self.seed, epoch, k))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.dataset.sample_order(self.seed, epoch))
        return self._order[1][k]

    def sample(self, position: int) -> dict[str, Any]:
        """The sample at a global position: its entry, or if that one is unusable the entry of the next
        position holding a usable one (with `position` set to the position asked for)."""
        if position < 0:
            raise ValueError(f"stream positions start at 0, got {position}")
        n = len(self.dataset)
        for step in range(2 * n + 1):
            sample = self._load(self.index(position + step))  # None: unusable (counted by the dataset)
            if sample is not None:
                return {**sample, "position": position}
        raise ValueError(f"{_data_key(self.dataset)}: no usable sample in two passes ({self.stats()})")

    def next(self) -> dict[str, Any]:
        """The sample at this process's next position."""
        sample = self.sample(self.position)
        self.position += self.world
        return sample

    def stats(self) -> dict[str, Any]:
        """Decodes tried and skips per reason (this process's, or this worker's)."""
        return self.dataset.stats.as_dict()

    def global_position(self, state: dict[str, Any]) -> int:
        """The global position a saved state names ({"position": P}; the older {epoch, cursor} form too)."""
        if not state:
            return 0
        if "position" in state:
            return int(state["position"])
        if "cursor" in state:
            return int(state["epoch"]) * len(self.dataset) + int(state["cursor"])
        raise ValueError(
            f"data state {state} is not a stream position (a checkpoint of the older sequential shard "
            "reader, which cannot be resumed by position: start the stage again)"
        )

    def state_dict(self) -> dict[str, Any]:
        """The global position where the run's next step starts, the same on every process."""
        return {"position": self.position - self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (also reads the older {epoch, cursor} form)."""
        self.position, self._order = self.global_position(state) + self.rank, None


ManifestStream = SampleStream  # the name the stages used for manifest streams


class ShardStream(SampleStream):
    """A `SampleStream` over WebDataset shards (`IndexedShards`)."""


def check_paths(paths: Sequence[str]) -> bool:
    """True for one JSONL manifest, False for shards; raise ValueError for no paths or a mix."""
    if not paths:
        raise ValueError("no training data given")
    if len(paths) == 1 and Path(paths[0]).suffix in (".jsonl", ".json"):
        return True
    if any(Path(p).suffix in (".jsonl", ".json") for p in paths):
        raise ValueError(f"give one JSONL manifest, or WebDataset shards; got {list(paths)}")
    return False


def open_stream(
    paths: Sequence[str],
    decoder: MediaDecoder,
    *,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    cache: bool = False,
    require_text: bool = True,
    rank: int = 0,
    world: int = 1,
    shuffle_window: int = 1024,
) -> SampleStream:
    """A stream of media-text samples made by `decoder` (`image_decoder`, `audio_decoder`, `video_decoder`) over
    one JSONL manifest, or over WebDataset shards (.tar files, globs, brace ranges, folders); `next` reads process
    `rank`'s share of `world`, `sample(g)` any position; `require_text=False` for unlabeled data."""
    if check_paths(paths):
        dataset = MediaTextDataset(
            paths[0], decoder, max_bad_fraction=max_bad_fraction, require_text=require_text
        )
        return SampleStream(dataset, seed, cache=cache, rank=rank, world=world)
    from .shards import IndexedShards  # reads with the webdataset package

    shards = IndexedShards(
        list(paths),
        decoder,
        require_text=require_text,
        window=shuffle_window,
        max_bad_fraction=max_bad_fraction,
    )
    return ShardStream(shards, seed, cache=cache, rank=rank, world=world)
