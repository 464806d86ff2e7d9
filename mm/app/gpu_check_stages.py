"""Checks 4 and 5 of `mm.app.gpu_check`: the image stage's memory at the 11B per-sample shape, and every stage
of the demo for a few steps in bf16.

The world: the shapes text, 64 images, 32 clips and (with espeak-ng) 32 spoken sentences, made in OUT/data.
The stages chain as in `mm demo`: lm-pretrain -> (its LM copied in bf16: the adapter stages keep a bf16
checkpoint's frozen LM in bf16) -> clip-pretrain, image-pretrain, image-anneal, video; bestrq-pretrain ->
speech. Each stage runs in its own error handling (its traceback is kept); a stage that needs a failed one
fails too. Per stage: steps, mean step time and tokens/s after the first step, MFU (stages that count their
FLOPs), peak CUDA memory, last loss (asserted finite), and the dtypes of the trainable and frozen parameters.

`image_memory`: image-pretrain with the 11B preset's image encoder (ViT-H/14, 560-px tiles, 4 tiles per image:
images of 1120 x 1120 px) over the LM the `fsdp` check trained, two steps each at (per-process batch 2,
micro-batch 1), (8, 1) and (4, 2). The peak allocated memory of (8, 1) is within 10% of (2, 1): micro-batches
wait in host memory (`Trainer._micro_batches`); (4, 2) is above (2, 1), so the measurement sees a micro-batch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mm.app.gpu_check import CheckContext, CheckResult

PRESETS = {
    "lm-pretrain": "lm/tiny.yaml",
    "clip-pretrain": "encoders/clip_tiny.yaml",
    "image-pretrain": "stages/image_pretrain_tiny.yaml",
    "image-anneal": "stages/image_anneal_tiny.yaml",
    "video": "stages/video_tiny.yaml",
    "bestrq-pretrain": "encoders/bestrq_tiny.yaml",
    "speech": "stages/speech_tiny.yaml",
}
SPEECH_STAGES = ("bestrq-pretrain", "speech")
BATCH_MEMORY_TOLERANCE = 0.10


def world(data: Path, speech: bool = True, n: int = 64) -> dict[str, Path]:
    """The tiny shapes world in `data` (made once; rank 0 writes, every rank reads): 2000 text lines, `n` images,
    `n` / 2 clips and spoken sentences (speech only with espeak-ng)."""
    from mm.training import distributed
    from mm.world import synth_motion, synth_shapes, synth_text

    paths = {
        "text": data / "text" / "train.txt",
        "heldout": data / "text" / "heldout.txt",
        "shapes": data / "shapes" / "train.jsonl",
        "motion": data / "motion" / "train.jsonl",
    }
    if speech:
        paths["speech"] = data / "speech" / "train.jsonl"
    if distributed.rank() == 0:
        if not paths["text"].is_file():
            synth_text(data, n=2000, seed=0, split="train")
            synth_text(data, n=100, seed=0, split="heldout")
        if not paths["shapes"].is_file():
            synth_shapes(data, n=n, seed=0, split="train")
        if not paths["motion"].is_file():
            synth_motion(data, n=n // 2, seed=0, split="train")
        if speech and not paths["speech"].is_file():
            from mm.world.speech import synth_speech

            synth_speech(data, n=n // 2, seed=0, split="train")
    distributed.barrier()
    return paths


def stage_configs(
    out: Path, data: dict[str, Path], steps: int, ctx: CheckContext, only: tuple[str, ...] = tuple(PRESETS)
) -> dict[str, Any]:
    """Each stage's demo preset, shrunk to `steps` steps in bf16 (CUDA) on the check's device, chained as in
    the demo (each adapter stage reads the one before it under `out`)."""
    from mm.app.demo_steps import load_preset
    from mm.training.stage import stage_class

    lm, lm_bf16 = out / "lm-pretrain" / "final", out / "lm-bf16"
    cfgs: dict[str, Any] = {}
    for name in only:
        cfg = load_preset(stage_class(name).config_class, PRESETS[name])
        tr = cfg.train
        tr.max_steps, tr.save_every, tr.eval_every, tr.log_every = steps, steps, 0, 1
        tr.device, tr.compile, tr.num_threads, tr.peak_flops = str(ctx.device), False, 0, 0.0
        tr.autocast = "bf16" if ctx.cuda else "none"
        tr.ramp = []  # one batch shape throughout
        for key in ("eval_samples", "curve_samples"):
            if hasattr(cfg, key):
                setattr(cfg, key, 0)
        cfg.out = str(out / name)
        if name != "lm-pretrain":  # no held-out captioning or transcription: the LM's perplexity only
            cfg.data.heldout = []
        cfgs[name] = cfg
    _chain(cfgs, data, out, lm, lm_bf16)
    return cfgs


def _chain(cfgs: dict[str, Any], data: dict[str, Path], out: Path, lm: Path, lm_bf16: Path) -> None:
    """Point each stage at the data and at the stage before it."""
    from mm.training.config import DataSourceConfig

    if c := cfgs.get("lm-pretrain"):
        c.data = [DataSourceConfig(paths=[str(data["text"])], name="shapes", doc_split="line")]
        c.heldout = [DataSourceConfig(paths=[str(data["heldout"])], name="heldout", doc_split="line")]
        c.anneal.steps, c.anneal.polyak_k, c.anneal.source = 0, 0, None
        c.train.eval_batches = 4
    if c := cfgs.get("clip-pretrain"):
        c.tokenizer, c.data.train = str(lm), [str(data["shapes"])]
    for name in ("image-pretrain", "image-anneal"):
        if c := cfgs.get(name):
            c.lm, c.data.train = str(lm_bf16), [str(data["shapes"])]
    if c := cfgs.get("image-pretrain"):
        c.encoder_weights, c.init_from = str(out / "clip-pretrain" / "final" / "encoder.safetensors"), None
    if c := cfgs.get("image-anneal"):
        c.encoder_weights, c.init_from = None, str(out / "image-pretrain" / "final")
    if c := cfgs.get("video"):
        c.init_from, c.data.train = str(out / "image-anneal" / "final"), [str(data["motion"])]
    if "speech" in data:
        if c := cfgs.get("bestrq-pretrain"):
            c.data.train = [str(data["speech"])]
        if c := cfgs.get("speech"):
            c.lm, c.data.train = str(lm_bf16), [str(data["speech"])]
            c.encoder_weights = str(out / "bestrq-pretrain" / "final" / "encoder.safetensors")


def bf16_copy(final: Path, out: Path, cuda: bool) -> None:
    """The trained LM saved again (in bf16 on CUDA: what a real Llama checkpoint is), with its tokenizer."""
    from mm.formats.hf_llama import load_hf, save_hf
    from mm.lm import Tokenizer
    from mm.training import distributed

    if distributed.rank() == 0:
        lm = load_hf(final)
        save_hf(lm.to(torch.bfloat16) if cuda else lm, out)
        Tokenizer.from_file(final).save(out)
    distributed.barrier()


def stage_figures(out: Path, stage: Any, seconds: float, cuda: bool) -> dict[str, Any]:
    """A stage's figures from its metrics.jsonl, and the dtypes of its trainable and frozen parameters."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    warm = recs[1:] or recs
    mfu = [r["mfu"] for r in warm if "mfu" in r]
    trained = {id(p) for _, p in stage.trainable()}
    kinds: dict[str, set[str]] = {"trainable": set(), "frozen": set()}
    for p in stage.model.parameters():
        kinds["trainable" if id(p) in trained else "frozen"].add(str(p.dtype).removeprefix("torch."))
    return {
        "steps": len(recs),
        "step_ms": 1000 * sum(r["step_time_s"] for r in warm) / len(warm),
        "tokens_per_s": sum(r["tokens_per_s"] for r in warm) / len(warm),
        "mfu": sum(mfu) / len(mfu) if mfu else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": recs[-1]["loss"],
        "seconds": seconds,
        **{f"{k}_dtypes": ",".join(sorted(v)) or "-" for k, v in kinds.items()},
    }


def run_stage(cfg: Any, ctx: CheckContext) -> tuple[dict[str, Any], Any]:
    """Run one stage through the runner; its figures and its stage object."""
    import mm.training.runner as runner

    seen: list[Any] = []
    original = runner.prepare

    def prepare(stage: Any, init: Any, **kw: Any) -> None:  # keeps the run's stage, to report its dtypes
        original(stage, init, **kw)
        seen.append(stage)

    runner.prepare = prepare
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        runner.run(cfg)
    finally:
        runner.prepare = original
    return stage_figures(Path(cfg.out), seen[-1], time.perf_counter() - t0, ctx.cuda), seen[-1]


def check_stages(ctx: CheckContext, res: CheckResult) -> None:
    """Check 5: every demo stage for a few steps (bf16 on CUDA), each in its own error handling."""
    out = ctx.out / "stages"
    data = world(ctx.out / "data", speech=ctx.speech)
    cfgs = stage_configs(out, data, ctx.steps or ctx.sizes.stage_steps, ctx)
    for name, cfg in cfgs.items():
        if name in SPEECH_STAGES and not ctx.speech:
            res.figure(**{name: {"skipped": "espeak-ng is absent: no spoken world"}})
            continue
        try:
            if name == "clip-pretrain":
                bf16_copy(out / "lm-pretrain" / "final", out / "lm-bf16", ctx.cuda)
            figs, _ = run_stage(cfg, ctx)
            res.figure(**{name: figs})
            res.expect(f"{name}: loss finite", math.isfinite(figs["loss"]), figs["loss"], "finite")
        except Exception as e:
            res.figure(**{name: {"error": traceback.format_exc()}})
            res.expect(f"{name}: runs", False, f"{type(e).__name__}: {e}", "no exception")


def big_images(data: Path, n: int, size: int) -> Path:
    """n images of size x size px (4 tiles of 560 px at 1120) with captions: a manifest for `image_memory`."""
    from PIL import Image

    folder = data / "big"
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    lines = []
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        Image.new("RGB", (size, size), rgb).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"big/{i:03d}.png", "text": f"a {name} picture"}))
    manifest = data / "big.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def check_image_memory(ctx: CheckContext, res: CheckResult) -> None:
    """Check 4: image-pretrain at the 11B per-sample shape; peak memory follows the micro-batch."""
    from mm.app.demo_steps import load_preset
    from mm.training.stage import stage_class

    lm = ctx.out / "fsdp" / "whole" / "final"
    if not (lm / "config.json").is_file():
        res.skip(f"needs the LM the fsdp check trains ({lm} is missing: run the fsdp check first)")
        return
    tile = 560 if ctx.cuda else 56
    manifest = big_images(ctx.out / "data", 8, 2 * tile)
    peaks: dict[str, float] = {}
    for batch, micro in ((2, 1), (8, 1), (4, 2)):
        cfg = load_preset(stage_class("image-pretrain").config_class, ctx.sizes.image_config)
        cfg.lm, cfg.data.train, cfg.data.heldout = str(lm), [str(manifest)], []
        cfg.encoder_weights, cfg.init_from = None, None
        if not ctx.cuda:  # the tiny preset's encoder, at its own tile size
            cfg.data.max_tiles = 4
        tr = cfg.train
        tr.max_steps, tr.save_every, tr.eval_every, tr.log_every, tr.ramp = 2, 0, 0, 1, []
        tr.batch_size, tr.micro_batch_size, tr.device = batch, micro, str(ctx.device)
        tr.autocast, tr.compile, tr.num_threads = ("bf16" if ctx.cuda else "none"), False, 0
        cfg.eval_samples = cfg.curve_samples = 0
        cfg.out = str(ctx.out / "image_memory" / f"b{batch}_m{micro}")
        shutil.rmtree(cfg.out, ignore_errors=True)
        figs, _ = run_stage(cfg, ctx)
        peaks[f"batch{batch}_micro{micro}"] = figs["peak_gib"] if ctx.cuda else 0.0
        res.figure(**{f"batch{batch}_micro{micro}": figs})
    base, big, two = peaks["batch2_micro1"], peaks["batch8_micro1"], peaks["batch4_micro2"]
    cuda = ctx.cuda or None
    res.expect("per-process batch 8 peak within 10% of batch 2 (micro-batch 1)",
               cuda and big <= base * (1 + BATCH_MEMORY_TOLERANCE), big, f"{base:.2f} GiB + 10%")  # fmt: skip
    res.expect("micro-batch 2 peak above micro-batch 1", cuda and two > base, two, f"> {base:.2f} GiB")
