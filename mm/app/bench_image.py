"""`mm bench` items 3 and 4 on one saved Mllama: the image-adapter training step (samples/s, peak memory; ours
with the LM frozen against ours with it trainable and against transformers' Mllama frozen) and captioning one
max-tile image (ours with cached media K/V against `MllamaForConditionalGeneration.generate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mm.app.bench_config import BenchConfig
from mm.app.bench_memory import peak_memory_mb
from mm.app.bench_mllama import (
    adapter_batch,
    adapter_loss,
    adapter_step_fn,
    load_hf_mllama_for_bench,
    load_mllama_pair,
)
from mm.app.bench_timing import rate, speedups, time_generation, time_interleaved
from mm.models.media import MediaInput

ADAPTER_KINDS = ("ours_frozen", "ours_lm_trainable", "hf_frozen")


@torch.no_grad()
def _parity_losses(
    ours: torch.nn.Module, hf: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Both frozen-LM models' losses on one batch in eval mode (equal weights: equal losses)."""
    ours.eval()
    hf.eval()
    out = {
        "loss_ours": float(adapter_loss(ours, batch, hf=False)),
        "loss_hf": float(adapter_loss(hf, batch, hf=True)),
    }
    out["loss_abs_diff"] = abs(out["loss_ours"] - out["loss_hf"])
    return out


def bench_adapter(bc: BenchConfig, path: Path) -> dict[str, Any]:
    """Item 3: image-adapter training step, samples/s (in process) and peak memory (fresh processes)."""
    batch = adapter_batch(bc, bc.adapter_batch, bc.adapter_seq)
    ours, hf = load_mllama_pair(path)
    full = load_hf_mllama_for_bench(path, lm_trainable=True)
    models = dict(zip(ADAPTER_KINDS, (ours, full, hf)))
    out: dict[str, Any] = _parity_losses(ours, hf, batch)
    out["trainable_params"] = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()
    }
    steps = {name: adapter_step_fn(model, batch, name == "hf_frozen") for name, model in models.items()}
    for step in steps.values():
        for _ in range(bc.warmup):
            step()
    for name, times in time_interleaved(steps, bc.repeats).items():
        out[name] = rate(bc.adapter_batch, times)
    del ours, hf, full, models, steps
    for name in ADAPTER_KINDS:
        out[name]["peak_mb"] = peak_memory_mb(bc, path, name)
    out["frozen_memory_ratio"] = out["ours_frozen"]["peak_mb"] / out["ours_lm_trainable"]["peak_mb"]
    out["hf_frozen_memory_ratio"] = out["ours_frozen"]["peak_mb"] / out["hf_frozen"]["peak_mb"]
    out["speedup_vs_hf"], out["speedup_vs_hf_paired"] = speedups(out["ours_frozen"], out["hf_frozen"])
    out["speedup_vs_lm_trainable"] = out["ours_frozen"]["per_s"] / out["ours_lm_trainable"]["per_s"]
    return out


@torch.inference_mode()
def bench_caption(bc: BenchConfig, path: Path) -> dict[str, Any]:
    """Item 4: greedy caption of one max-tile image, ours (media K/V cached; by default and compiled) against
    transformers' generate (by default and with its static cache compiled)."""
    from mm.app.bench_lm import hf_generate, pairs_for
    from mm.lm import generate
    from mm.lm.decode import resolve_decode_mode

    ours, hf = (m.eval() for m in load_mllama_pair(path))
    batch = adapter_batch(bc, 1, bc.caption_prompt, seed=4)

    def run_ours(n: int, decode: str = "auto") -> list[list[int]]:
        media = ours.encode_media(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        image = {"media": {"image": MediaInput(media)}}
        return generate(ours, batch["input_ids"], n, model_kwargs=image, decode=decode)

    runs = {
        "ours": run_ours,
        "hf": lambda n: hf_generate(hf, False, n, **batch)[:, bc.caption_prompt :].tolist(),
    }
    if bc.best_caption:
        runs["ours_best"] = lambda n: run_ours(n, "compiled")
        runs["hf_best"] = lambda n: hf_generate(hf, True, n, **batch)[:, bc.caption_prompt :].tolist()
    out = time_generation(runs, bc.caption_new, bc.warmup, bc.repeats, bc.caption_new, pairs_for(runs))
    out["ours_decode"] = resolve_decode_mode("auto", ours)
    return out
