"""Timing for `mm bench`: repeated and interleaved wall-clock runs, rates and speedups, the matmul peak (the
MFU denominator), and the side-by-side timing of two greedy generators."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def time_repeats(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, the sides taking turns (order alternating per round), so that load from
    other processes on a shared machine falls on every side alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def paired_speedup(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of theirs/ours time, each round's two runs back to back (robust to drifting load)."""
    return statistics.median(t / o for o, t in zip(ours, theirs))


def rate(work: float, times: list[float]) -> dict[str, Any]:
    """`work` per second at the median time, the median and every time (rounded) of a timed run."""
    med = statistics.median(times)
    return {"per_s": work / med, "median_s": med, "times_s": [round(t, 5) for t in times]}


def speedups(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[float, float]:
    """Ours over theirs of two `rate` records: the ratio of medians and the paired speedup."""
    return ours["per_s"] / theirs["per_s"], paired_speedup(ours["times_s"], theirs["times_s"])


def matmul_calls(a: torch.Tensor, b: torch.Tensor, seconds: float = 0.3) -> int:
    """How many a @ b fill about `seconds` (after a warm-up call)."""
    a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or k < 1:
        a @ b
        k += 1
    return k


def measure_matmul_peak(dtype: torch.dtype, n: int, warmup: int, repeats: int) -> dict[str, Any]:
    """FLOP/s of an n x n matmul in `dtype` (the MFU denominator), median of repeats of a ~0.3 s batch."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    k = matmul_calls(a, b)
    return rate(2 * n**3 * k, time_repeats(lambda: [a @ b for _ in range(k)], warmup, repeats))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated positions equal up to each row's first difference (1.0 = identical)."""
    same = total = 0
    for ra, rb in zip(a, b):
        k = 0
        while k < min(len(ra), len(rb)) and ra[k] == rb[k]:
            k += 1
        same, total = same + k, total + max(len(ra), len(rb))
    return same / max(1, total)


def time_generation(
    runs: dict[str, Callable[[int], list[list[int]]]],
    n_new: int,
    warmup: int,
    repeats: int,
    work: float,
    pairs: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Time generators side by side (each generates n tokens per row and returns them; `n_new` per call, `work`
    tokens in all): `warmup` untimed calls of the full length (the first one's seconds kept: compile time
    included), then `repeats` rounds taking turns. Per side its rate and `first_call_s`; per pair
    (name -> (ours, theirs); default "" -> ("ours", "hf")) whether their tokens agree and the speedups, under
    `speedup{name}`, `tokens_equal{name}`, `tokens_agree_frac{name}`."""
    pairs = pairs or {"": ("ours", "hf")}
    out: dict[str, Any] = {}
    first: dict[str, float] = {}
    for name, fn in runs.items():
        for i in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn(n_new)  # the full length: a static cache sized for it, so no later recompile
            if i == 0:
                first[name] = time.perf_counter() - t0
    tokens: dict[str, list[list[int]]] = {}

    def timed(name: str) -> Callable[[], None]:
        def call() -> None:
            tokens[name] = runs[name](n_new)

        return call

    for name, times in time_interleaved({name: timed(name) for name in runs}, repeats).items():
        out[name] = rate(work, times)
        out[name]["first_call_s"] = round(first[name], 3)
        out[name]["compile_s"] = round(max(0.0, first[name] - out[name]["median_s"]), 3)
    for suffix, (a, b) in pairs.items():
        out[f"tokens_equal{suffix}"] = tokens[a] == tokens[b]
        out[f"tokens_agree_frac{suffix}"] = agreement(tokens[a], tokens[b])
        out[f"speedup{suffix}"], out[f"speedup_paired{suffix}"] = speedups(out[a], out[b])
    return out


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
