"""A failing process ends the whole torchrun group at once, instead of leaving the others waiting in a
collective until the backend's timeout (NCCL's is 10 minutes; its waits do not notice a dead peer).

    rank r raises -> `end_group_on_failure` prints its traceback, each line prefixed `[rank r]`, to stderr,
    records "rank r failed" in the launcher's key-value store, and ends the process with `os._exit` (no
    `destroy_process_group`, no atexit handlers or DataLoader joins: each can wait on the peers that wait on it)
    -> every other process's watcher thread (`start_watch`, polling the store every half second) sees the record,
    prints one line naming the failed rank and ends its process too, wherever its main thread is blocked (a
    collective, a device synchronisation: the thread holding them releases the GIL; the trainer's SIGTERM
    handler, which waits for the step to end before saving, never gets to run there).

The store is torchrun's (its agent serves it at MASTER_ADDR:MASTER_PORT and outlives the workers); the watcher
opens its own client connection to it, so it never waits behind a store operation of the main thread. A process
that fails after another one did prints one line instead of its traceback (its error is the consequence, e.g.
gloo's "Connection reset by peer"). Everything here is a no-op in one process.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist

POLL_S = 0.5  # how often the watcher looks at the store
_state: dict[str, Any] = {"store": None, "stop": None, "thread": None, "rank": 0}


def failure_key() -> str:
    """The store key of a failure in this attempt of the run (torchrun restarts count separately)."""
    return f"mm/failed_rank/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store() -> Any:
    """A new client connection to the launcher's store (None without MASTER_ADDR/MASTER_PORT)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(
        host, int(port), is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False
    )


def start_watch(rank: int) -> bool:
    """Start this process's watcher thread (after the process group is up); True if it runs."""
    if _state["thread"] is not None:
        return True
    try:
        store = _store()
    except (RuntimeError, ValueError, OSError):  # no reachable store: a failure here still ends this process
        store = None
    if store is None:
        return False
    stop = threading.Event()
    _state.update(store=store, stop=stop, rank=rank)
    thread = threading.Thread(target=_watch, args=(store, stop, rank), name="mm-rank-failure", daemon=True)
    _state["thread"] = thread
    thread.start()
    return True


def stop_watch() -> None:
    """Stop the watcher thread (before leaving the process group at the end of a run)."""
    thread, stop = _state["thread"], _state["stop"]
    if thread is None:
        return
    stop.set()
    thread.join(timeout=5 * POLL_S)
    _state.update(store=None, stop=None, thread=None)


def _watch(store: Any, stop: threading.Event, rank: int) -> None:
    key = failure_key()
    while not stop.wait(POLL_S):
        try:
            if not store.check([key]):
                continue
            failed = store.get(key).decode()
        except (RuntimeError, ValueError, OSError):  # the store is gone: the launcher has ended the run
            return
        if failed != str(rank):
            print(f"[rank {rank}] mm: ending this process: rank {failed} failed", file=sys.stderr, flush=True)
            os._exit(1)


def failed_rank() -> str | None:
    """The rank recorded as failed in this attempt, if any (None without a store)."""
    store = _state["store"]
    if store is None:
        return None
    try:
        return store.get(failure_key()).decode() if store.check([failure_key()]) else None
    except (RuntimeError, ValueError, OSError):
        return None


def report_and_exit(error: BaseException, rank: int, world: int, code: int = 1) -> None:
    """Print `error`'s traceback prefixed with the rank (one line if another rank failed first), record the
    failure in the store, and end this process with exit status `code`."""
    first = failed_rank()
    if first is not None and first != str(rank):
        line = f"{type(error).__name__}: {error}".splitlines()[0]
        print(f"[rank {rank}] mm: stopped after rank {first} failed ({line})", file=sys.stderr, flush=True)
    else:
        text = "".join(traceback.format_exception(error))
        lines = [f"[rank {rank}] {x}" for x in text.rstrip("\n").splitlines()]
        print(f"[rank {rank}] mm: rank {rank} of {world} failed; ending the process group", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr, flush=True)
        store = _state["store"]
        if store is not None:
            try:
                store.set(failure_key(), str(rank))
            except (RuntimeError, ValueError, OSError):
                pass  # the launcher still sees this exit status and stops the others
    sys.stdout.flush()
    os._exit(code)


@contextmanager
def end_group_on_failure(exit_codes: Mapping[type[BaseException], int] | None = None) -> Iterator[None]:
    """In a process group of several processes, an exception (or KeyboardInterrupt) ends this process and the
    group (`report_and_exit`) with the status `exit_codes` gives its type (default 1; KeyboardInterrupt 130);
    in one process it propagates as usual."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            raise
        codes = {KeyboardInterrupt: 130, **(exit_codes or {})}
        code = next((c for t, c in codes.items() if isinstance(e, t)), 1)
        report_and_exit(e, dist.get_rank(), dist.get_world_size(), code)


__all__ = ["end_group_on_failure", "failure_key", "report_and_exit", "start_watch", "stop_watch"]
