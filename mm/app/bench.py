"""`mm bench`: our models side by side with transformers, in one process, on identical configs and weights
(issues 9 and 27). Five benchmarks:

1. LM training step (forward + backward + AdamW), tokens/s, ours vs `LlamaForCausalLM`, float32 and bf16 autocast.
2. Greedy KV-cached generation, new tokens/s, ours (`mm.lm.generate`) vs `LlamaForCausalLM.generate`.
3. Image-adapter step (LM frozen; encoder + cross-attention train), samples/s and peak memory: ours vs ours with
   the LM trainable, and vs `MllamaForConditionalGeneration` with its language model frozen.
4. Captioning (one 4-tile image): ours with cached media K/V vs `MllamaForConditionalGeneration.generate`.
5. MFU: the training step's FLOP/s (`LMConfig.flops_per_token`) over a large matmul timed in the same run.

Every figure is the median of `repeats` timed runs after `warmup` untimed ones; each side is checked to compute
the same losses / tokens as the other on the same weights (recorded in the JSON). Ratios are ours over theirs.
Training, generation and captioning run two pairs: default against default (the top-level keys of issue 9) and
best against best (the same keys with `_vs_best`: our compiled blocks / compiled static-cache decode step against
transformers' `model.compile()` / static cache with its compiled decode), each side's compile time (its first
call less a timed one) in its own column. On a GPU the same code runs (CUDA graphs for our decode step); no GPU
figure is recorded until one has run it.

Peak memory on CPU: each configuration runs in a fresh Python process with glibc's mmap threshold fixed at
64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor buffer is its own mapping, returned to the kernel when freed;
the figure is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs once the model
is loaded, so the loading transient does not count) during the training steps minus its resident size before
the model was built (libraries already imported): weights + gradients + optimizer state + activations, as the
kernel counts them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mm.app.bench_config import (
    BEST_KEYS,
    BOS,
    DTYPES,
    IMAGE_TOKEN_OFFSET,
    RATIO_KEYS,
    BenchConfig,
    full_config,
    quick_config,
    tiny_config,
)
from mm.app.bench_image import bench_adapter, bench_caption
from mm.app.bench_lm import PAIRS, bench_generate, bench_lm_train, lm_pair
from mm.app.bench_memory import memory_probe, peak_memory_mb
from mm.app.bench_mllama import (
    adapter_batch,
    adapter_step_fn,
    freeze_mllama_lm,
    load_hf_mllama_for_bench,
    load_mllama_pair,
    mllama_xattn_text_layers,
    save_mllama,
    transformers_mllama_config,
)
from mm.app.bench_timing import cpu_model, measure_matmul_peak, paired_speedup, time_interleaved, time_repeats

__all__ = [
    "BEST_KEYS",
    "BOS",
    "IMAGE_TOKEN_OFFSET",
    "RATIO_KEYS",
    "BenchConfig",
    "adapter_batch",
    "adapter_step_fn",
    "bench_adapter",
    "bench_caption",
    "bench_generate",
    "bench_lm_train",
    "checks",
    "cpu_model",
    "format_table",
    "freeze_mllama_lm",
    "full_config",
    "lm_pair",
    "load_hf_mllama_for_bench",
    "load_mllama_pair",
    "main",
    "measure_matmul_peak",
    "memory_probe",
    "mllama_xattn_text_layers",
    "paired_speedup",
    "peak_memory_mb",
    "quick_config",
    "run_bench",
    "save_mllama",
    "time_interleaved",
    "time_repeats",
    "tiny_config",
    "transformers_mllama_config",
]


def _meta(bc: BenchConfig) -> dict[str, Any]:
    """The run's facts: date, versions, machine, repeats and how each figure is measured."""
    import transformers

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average": list(os.getloadavg()),
        "warmup": bc.warmup,
        "repeats": bc.repeats,
        "note": "ratios are ours/theirs measured in one process; absolute numbers are noisy on a shared machine",
        "memory_method": "fresh process per config, MALLOC_MMAP_THRESHOLD_=65536, "
        "VmHWM (reset after loading) - VmRSS after imports, before the model",
    }


def _run_lm(bc: BenchConfig, res: dict[str, Any], log: Callable[[str], None]) -> None:
    """Items 1, 2 and 5 into `res`: the matmul peaks, the LM training step per dtype (with its MFU) and
    generation per batch size."""
    res["matmul_peak"] = {}
    for name in bc.dtypes:  # alone, before the rest; the MFU uses the peak timed among the training steps
        log(f"matmul peak {name}")
        res["matmul_peak"][name] = measure_matmul_peak(DTYPES[name], bc.matmul_n, bc.warmup, bc.repeats)
    res["lm_train"] = {}
    for name in bc.dtypes:
        log(f"LM training step {name}")
        res["lm_train"][name] = bench_lm_train(bc, name)
        r = res["lm_train"][name]
        log(
            f"  speedup {r['speedup']:.3f}, ours {r['ours']['per_s']:.0f} tok/s, hf {r['hf']['per_s']:.0f} tok/s"
        )
        for side in ("ours", "hf", "ours_best", "hf_best"):
            if side in r:
                r[f"mfu_{side}"] = r[side]["flops_per_s"] / r["matmul_peak"]["per_s"]
        if "speedup_vs_best" in r:
            log(
                f"  best vs best {r['speedup_vs_best']:.3f}, ours best vs hf default {r['speedup_best_vs_default']:.3f}"
            )
    res["generate"] = {}
    for b in bc.gen_batches:
        log(f"generation batch {b}")
        r = res["generate"][f"b{b}"] = bench_generate(bc, b)
        log(
            f"  speedup {r['speedup']:.3f}, ours {r['ours']['per_s']:.1f} tok/s, hf {r['hf']['per_s']:.1f} tok/s"
        )
        if "speedup_vs_best" in r:
            log(f"  best vs best {r['speedup_vs_best']:.3f}")


def _run_image(bc: BenchConfig, res: dict[str, Any], log: Callable[[str], None]) -> None:
    """Items 3 and 4 into `res`, on a random Mllama saved to a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="mm-bench-") as tmp:
        path = save_mllama(bc, Path(tmp) / "mllama")
        log("image-adapter step")
        r = res["adapter_step"] = bench_adapter(bc, path)
        log(f"  vs hf {r['speedup_vs_hf']:.3f}, frozen/full memory {r['frozen_memory_ratio']:.3f}")
        log("captioning")
        r = res["caption"] = bench_caption(bc, path)
        log(
            f"  speedup {r['speedup']:.3f}"
            + (f", best vs best {r['speedup_vs_best']:.3f}" if "speedup_vs_best" in r else "")
        )


def _ratios(res: dict[str, Any]) -> dict[str, float | None]:
    """The headline ratios (`RATIO_KEYS`, `BEST_KEYS`) of a run; None for a dtype, batch size or pair not run."""
    lt, gen, ad, cap = res["lm_train"], res["generate"], res["adapter_step"], res["caption"]
    out: dict[str, float | None] = {}
    for suffix in ("", "_vs_best"):
        for d in ("fp32", "bf16"):
            out[f"lm_train_speedup_{d}{suffix}"] = lt.get(d, {}).get(f"speedup{suffix}")
        for b in ("b1", "b8"):
            out[f"generate_speedup_{b}{suffix}"] = gen.get(b, {}).get(f"speedup{suffix}")
        out[f"caption_speedup{suffix}"] = cap.get(f"speedup{suffix}")
    out.update(
        frozen_memory_ratio=ad["frozen_memory_ratio"],
        mllama_step_speedup=ad["speedup_vs_hf"],
        mfu_fp32=lt["fp32"]["mfu_ours"] if "fp32" in lt else None,
        mfu_bf16=lt["bf16"]["mfu_ours"] if "bf16" in lt else None,
    )
    return {k: out[k] for k in (*RATIO_KEYS, *BEST_KEYS)}


def run_bench(bc: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the five benchmarks; returns the JSON record (top-level ratio keys + details)."""
    meta = _meta(bc)  # imports transformers: before the clock starts
    t_start = time.perf_counter()
    res: dict[str, Any] = {"meta": meta, "config": asdict(bc)}
    _run_lm(bc, res, log)
    _run_image(bc, res, log)
    ratios = _ratios(res)
    res["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    return {**ratios, **res}


def _side_rows(label: str, r: dict[str, Any], unit: str, fmt: str) -> list[tuple[str, ...]]:
    """Table rows of one figure: default against default, then best against best when run."""
    rows = []
    for suffix, what in (("", "default"), ("_vs_best", "best")):
        if f"speedup{suffix}" not in r:
            continue
        a, b = PAIRS[suffix]
        ratio = f"{r[f'speedup{suffix}']:.2f}x (paired {r[f'speedup_paired{suffix}']:.2f}x)"
        if suffix == "_vs_best":
            ratio += f"; ours best / their default {r['speedup_best_vs_default']:.2f}x"
        compile_s = f"{r[a].get('compile_s', 0):.1f} / {r[b].get('compile_s', 0):.1f}"
        rows.append((f"{label} ({what}), {unit}", format(r[a]["per_s"], fmt), format(r[b]["per_s"], fmt), ratio,
                     compile_s))  # fmt: skip
    return rows


def format_table(res: dict[str, Any]) -> str:
    """A Markdown table of the run: ours, transformers, ratio, compile seconds (ours / theirs)."""
    rows = [("benchmark", "ours", "transformers", "ratio (ours/theirs)", "compile s (ours / theirs)")]
    for d, r in res["lm_train"].items():
        rows += _side_rows(f"LM train step {d}", r, "tokens/s", ".0f")
    for d, r in res["lm_train"].items():
        peak = f"{r['matmul_peak']['per_s'] / 1e9:.0f} GFLOP/s"
        rows.append((f"MFU {d} default (matmul peak {peak})", f"{r['mfu_ours']:.2f}", f"{r['mfu_hf']:.2f}",
                     f"{r['mfu_ours'] / r['mfu_hf']:.2f}x", "-"))  # fmt: skip
        if "mfu_ours_best" in r:
            rows.append((f"MFU {d} best", f"{r['mfu_ours_best']:.2f}", f"{r['mfu_hf_best']:.2f}",
                         f"{r['mfu_ours_best'] / r['mfu_hf_best']:.2f}x", "-"))  # fmt: skip
    for b, r in res["generate"].items():
        rows += _side_rows(f"generate {b} (ours auto: {r['ours_decode']})", r, "new tokens/s", ".1f")
    a = res["adapter_step"]
    rows.append(("image-adapter step (LM frozen), samples/s", f"{a['ours_frozen']['per_s']:.2f}",
                 f"{a['hf_frozen']['per_s']:.2f}", f"{a['speedup_vs_hf']:.2f}x (paired {a['speedup_vs_hf_paired']:.2f}x)",
                 "-"))  # fmt: skip
    rows.append(("image-adapter step peak memory, MiB", f"{a['ours_frozen']['peak_mb']:.0f}",
                 f"{a['hf_frozen']['peak_mb']:.0f}", f"{a['hf_frozen_memory_ratio']:.2f}x", "-"))  # fmt: skip
    rows.append(("ours, LM trainable: samples/s, peak MiB",
                 f"{a['ours_lm_trainable']['per_s']:.2f}, {a['ours_lm_trainable']['peak_mb']:.0f}", "-",
                 f"frozen/full memory {a['frozen_memory_ratio']:.2f}x", "-"))  # fmt: skip
    c = res["caption"]
    rows += _side_rows(f"caption 1 image 4 tiles (ours auto: {c['ours_decode']})", c, "new tokens/s", ".1f")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def checks(res: dict[str, Any]) -> list[str]:
    """Parity checks of the run (both sides of each pair computed the same thing); empty when all hold."""
    bad = []
    for d, r in res["lm_train"].items():
        tol = 1e-3 if d == "fp32" else 5e-2
        for suffix in PAIRS:
            diff = r.get(f"loss_abs_diff{suffix}")
            if diff is not None and diff > tol:
                bad.append(f"LM train {d}{suffix}: losses differ by {diff:.2e}")
    for what, r in [*((f"generate {b}", r) for b, r in res["generate"].items()), ("caption", res["caption"])]:
        for suffix in PAIRS:
            if r.get(f"tokens_equal{suffix}") is False:
                bad.append(f"{what}{suffix}: tokens differ (agreement {r[f'tokens_agree_frac{suffix}']:.3f})")
    if res["adapter_step"]["loss_abs_diff"] > 1e-3:
        bad.append(f"adapter step: losses differ by {res['adapter_step']['loss_abs_diff']:.2e}")
    return bad


def main(json_path: str | None = None, quick: bool = False) -> int:
    """`mm bench`: run, print the table (stdout), write the JSON; exit 1 if a parity check fails."""
    bc = quick_config() if quick else full_config()
    res = run_bench(bc, log=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    res["checks_failed"] = checks(res)
    print(format_table(res))
    print({k: None if res[k] is None else round(res[k], 3) for k in (*RATIO_KEYS, *BEST_KEYS)})
    for msg in res["checks_failed"]:
        print(f"mm bench: parity check failed: {msg}", file=sys.stderr)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["checks_failed"] else 0
