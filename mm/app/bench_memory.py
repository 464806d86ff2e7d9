"""Peak memory of the image-adapter training step (`mm bench` item 3), each configuration in a fresh Python
process: glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor buffer is its own
mapping, returned to the kernel when freed; the figure is the resident high-water mark during the steps (reset
once the model is loaded) minus the resident size before the model was built."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mm.app.bench_config import BenchConfig
from mm.app.bench_mllama import (
    adapter_batch,
    adapter_step_fn,
    load_hf_mllama_for_bench,
    load_hf_mllama_frozen,
)


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key}")


def memory_probe(bc_json: str, path: str, kind: str) -> float:
    """In a fresh process: MiB of peak resident memory of `memory_steps` adapter steps, above the pre-model RSS."""
    import transformers.models.mllama.modeling_mllama  # noqa: F401  (code, not training memory: import first)

    import mm.formats.hf_mllama  # noqa: F401

    bc = BenchConfig(**json.loads(bc_json))
    torch.manual_seed(0)
    batch = adapter_batch(bc, bc.adapter_batch, bc.adapter_seq)
    gc.collect()
    base = _proc_status_kb("VmRSS")
    if kind == "hf_frozen":
        model = load_hf_mllama_frozen(path)
    else:
        model = load_hf_mllama_for_bench(Path(path), lm_trainable=kind == "ours_lm_trainable")
    step = adapter_step_fn(model, batch, kind == "hf_frozen")
    gc.collect()
    # Forget the loading transient (file mapping + tensors read before they reach the model): reset the
    # high-water mark to the current resident size, model in memory.
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(bc.memory_steps):
        step()
    peak = _proc_status_kb("VmHWM")
    return (peak - base) / 1024


def peak_memory_mb(bc: BenchConfig, path: Path, kind: str) -> float:
    """Run `memory_probe` in a fresh Python process (mmap threshold fixed, so freed buffers leave RSS)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    code = (
        "import sys, torch; from mm.app.bench_memory import memory_probe; "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        "print('PEAK_MB', memory_probe(sys.argv[1], sys.argv[2], sys.argv[3]))"
    )
    cfg = json.dumps(asdict(bc))
    res = subprocess.run(
        [sys.executable, "-c", code, cfg, str(path), kind],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in res.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    raise RuntimeError(f"memory probe {kind} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
