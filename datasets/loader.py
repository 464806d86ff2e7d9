"""Resumable multi-process loading: a `torch.utils.data.DataLoader` with workers, pinned memory and prefetch over
position-addressed data, whose saved state is one world-size independent cursor.

Every training stream here is addressed by position, not iterated: the sample at global position g (or, for
packed text, global row k) is a pure function of (data, seed, g) and of nothing a process has done before. So

- ordering: the global batch of step s is positions [P_s, P_s + B); process `rank` of `world` takes the
  positions P_s + rank + i * world (i < B / world) for sample streams, rows rank * B/world ... for packed text;
  within a process, DataLoader worker w of n makes the process's batches j = w, w + n, w + 2n, ... (the
  DataLoader hands them back in order j = 0, 1, 2, ...), so neither the world size nor the worker count
  changes which samples make up a global batch;
- state: the cursor of the next batch (`{"position": P}` for samples; the row count and per-source offsets
  for packed text) -- the same number on every process, whatever the world size, so a checkpoint written by 4
  processes resumes on 2 or 1 with the same global batches;
- resuming seeks: a new DataLoader starts its workers at the saved cursor; nothing before it is read or
  decoded again (only batches prefetched but not consumed before the stop are made again);
- counts: each worker reports its reader's counts with every batch (decoded samples, skips, rows and tokens
  read); `ResumableLoader.stats()` sums them over workers and over loader restarts, per process.

Why not torchdata's `StatefulDataLoader` (what torchtitan uses): its state is the per-rank, per-worker
iterator internals (worker ids, samples yielded per worker, the dataset's own state per worker), which
belongs to one world size and one worker count. Position-addressed data needs none of it: the state is one
cursor, and restarting a plain DataLoader at that cursor is the whole of resumption. This module is that thin
wrapper (no extra dependency).

Readers (`SampleReader` here; `mm.datasets.tokens.TokenReader` for packed text) implement
`initial_state()`, `cursor(state, params)` (a cheap object with `advance()` and `state_dict()`),
`read(cursor)` (this process's batch at the cursor) and `stats()` (this process's cumulative counts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = [
    "LoaderOptions",
    "PositionCursor",
    "RankBatches",
    "ResumableLoader",
    "SampleReader",
    "add_counts",
]

log = logging.getLogger(__name__)

_MAX_EXAMPLES = 5  # example sources kept per skip reason when counts are merged


class Cursor(Protocol):
    """Where the next batch of a reader starts; `advance()` moves past one batch without reading data."""

    def advance(self) -> None:
        """Move past one batch (the whole global batch: every process does the same)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The world-size independent position of the next batch."""
        ...


class BatchReader(Protocol):
    """What `ResumableLoader` needs from a data source (see the module docstring)."""

    def initial_state(self) -> dict[str, Any]:
        """The state of a run that has read nothing."""
        ...

    def cursor(self, state: dict[str, Any], params: Hashable) -> Cursor:
        """A cursor at `state` for batches of shape `params` (e.g. the local rows)."""
        ...

    def read(self, cursor: Any) -> Any:
        """This process's batch at the cursor (reads and decodes its share only)."""
        ...

    def stats(self) -> dict[str, Any]:
        """This process's cumulative counts (numbers, nested dicts of numbers, lists of examples)."""
        ...


@dataclass
class LoaderOptions:
    """DataLoader settings: worker processes (0 = read in the training process), batches prefetched per
    worker, pinned host memory (only when CUDA is available) and the worker start method ("" = the platform's
    default, fork on Linux; "spawn" or "forkserver" pickle the reader instead)."""

    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True
    start_method: str = ""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.start_method not in ("", "fork", "spawn", "forkserver"):
            raise ValueError(f"start_method={self.start_method!r}; allowed: '', fork, spawn, forkserver")

    @classmethod
    def from_config(cls, section: Any) -> LoaderOptions:
        """The options a config section holds (`num_workers`, `prefetch_factor`, `pin_memory`,
        `start_method`; missing keys keep their defaults); None gives the defaults."""
        if section is None:
            return cls()
        keys = ("num_workers", "prefetch_factor", "pin_memory", "start_method")
        return cls(**{k: getattr(section, k) for k in keys if hasattr(section, k)})


def add_counts(a: dict[str, Any], b: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    """a + sign * b for count dicts: numbers add, dicts recurse, lists (examples) are merged without repeats."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, bool) or not isinstance(v, int | float | dict | list):
            out.setdefault(k, v)
        elif isinstance(v, dict):
            out[k] = add_counts(out.get(k, {}), v, sign)
        elif isinstance(v, list):
            if sign > 0:
                mine = list(out.get(k, []))
                out[k] = (mine + [x for x in v if x not in mine])[:_MAX_EXAMPLES]
            else:
                out.setdefault(k, [])
        else:
            out[k] = out.get(k, 0) + sign * v
    return out


def _keep(item: Any) -> Any:
    """The DataLoader's collate_fn: batches are made by the readers (in the workers)."""
    return item


class RankBatches(IterableDataset):
    """This process's batches from `state` on, as an IterableDataset: worker w of n yields batches w, w + n, ...

    Each item is {"batch": the reader's batch, "worker": w, "stats": the reader's counts in that worker}."""

    def __init__(self, reader: BatchReader, state: dict[str, Any], params: Hashable) -> None:
        self.reader, self.state, self.params = reader, state, params

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        cursor = self.reader.cursor(self.state, self.params)
        for _ in range(worker):
            cursor.advance()
        while True:
            batch = self.reader.read(cursor)
            yield {"batch": batch, "worker": worker, "stats": self.reader.stats()}
            for _ in range(workers):
                cursor.advance()


class ResumableLoader:
    """Batches of a reader through a DataLoader, with a world-size independent, resumable cursor.

    `next(params)` returns this process's next batch (`params`, e.g. the local row count, fixes its shape; a
    change restarts the DataLoader at the current cursor). `state_dict()` is the cursor of the next batch not
    yet returned; `load_state_dict()` moves there (the workers start there on the next `next`). The DataLoader
    starts lazily, so loading a state before the first batch reads nothing twice."""

    def __init__(self, reader: BatchReader, options: LoaderOptions | None = None) -> None:
        self.reader = reader
        self.options = options or LoaderOptions()
        self.state: dict[str, Any] = dict(reader.initial_state())
        self._it: Iterator[dict[str, Any]] | None = None
        self._params: Hashable = None
        self._cursor: Any = None
        self._base: dict[str, Any] = {}
        self._latest: dict[int, dict[str, Any]] = {}
        self._done: dict[str, Any] = {}
        self.restarts = 0

    # ---------------------------------------------------------------------------------------------- batches

    def next(self, params: Hashable) -> Any:
        """This process's next batch of shape `params`."""
        if self._it is None or params != self._params:
            self._start(params)
        assert self._it is not None
        item = next(self._it)
        self._cursor.advance()
        self.state = self._cursor.state_dict()
        self._latest[int(item["worker"])] = item["stats"]
        return item["batch"]

    def _start(self, params: Hashable) -> None:
        """A new DataLoader whose workers start at the current cursor."""
        self.close()
        self._params = params
        self._cursor = self.reader.cursor(self.state, params)
        self._base = self.reader.stats()
        opts = self.options
        kw: dict[str, Any] = {}
        if opts.num_workers > 0:
            kw["prefetch_factor"] = opts.prefetch_factor
            if opts.start_method:
                kw["multiprocessing_context"] = opts.start_method
        loader = DataLoader(
            RankBatches(self.reader, dict(self.state), params),
            batch_size=None,
            collate_fn=_keep,
            num_workers=opts.num_workers,
            pin_memory=bool(opts.pin_memory and torch.cuda.is_available()),
            **kw,
        )
        self._it = iter(loader)
        self.restarts += 1

    def close(self) -> None:
        """Stop the workers (their counts are kept); the next `next` starts new ones at the cursor."""
        if self._it is not None and self.options.num_workers > 0:
            for snapshot in self._latest.values():
                self._done = add_counts(self._done, add_counts(snapshot, self._base, -1))
        self._latest = {}
        self._it = None  # the iterator's finaliser shuts its workers down

    # ------------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The cursor of the next batch (plain JSON, the same on every process)."""
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor (nothing before it is read again)."""
        self.close()
        self.state = dict(state)
        self.reader.cursor(self.state, self._params)  # a state of other data is refused now

    def stats(self) -> dict[str, Any]:
        """This process's counts, summed over its workers and loader restarts (and `num_workers`)."""
        total = self.reader.stats()
        if self.options.num_workers > 0:
            total = add_counts(total, self._done)
            for snapshot in self._latest.values():
                total = add_counts(total, add_counts(snapshot, self._base, -1))
        return {**total, "num_workers": self.options.num_workers}


# ---------------------------------------------------------------------------------------------------- samples


class PositionCursor:
    """The global position of the next batch of a sample stream; a batch of `rows` local rows spans
    `rows * world` positions."""

    def __init__(self, position: int, rows: int, world: int) -> None:
        self.position, self.rows, self.world = position, rows, world

    def advance(self) -> None:
        """Move past one global batch."""
        self.position += self.rows * self.world

    def state_dict(self) -> dict[str, Any]:
        """{"position": P}."""
        return {"position": self.position}


class SampleReader:
    """Batches of a position-addressed sample stream (`mm.datasets.streams.SampleStream`): this process's local
    row i of the batch at position P is the sample at P + rank + i * world; `collate` (run in the worker)
    turns the samples into the batch (default: the list of samples)."""

    def __init__(
        self,
        stream: Any,
        rank: int = 0,
        world: int = 1,
        collate: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.stream, self.rank, self.world, self.collate = stream, rank, world, collate

    def initial_state(self) -> dict[str, Any]:
        """Position 0."""
        return {"position": 0}

    def cursor(self, state: dict[str, Any], params: Hashable) -> PositionCursor:
        """A cursor at the saved position for batches of `params` local rows."""
        position = self.stream.global_position(state)
        return PositionCursor(position, int(params or 0), self.world)

    def read(self, cursor: PositionCursor) -> Any:
        """This process's samples of the batch at the cursor, collated."""
        p = cursor.position + self.rank
        samples = [self.stream.sample(p + i * self.world) for i in range(cursor.rows)]
        return self.collate(samples) if self.collate is not None else samples

    def stats(self) -> dict[str, Any]:
        """The stream's decode and skip counts in this process."""
        return self.stream.stats()
