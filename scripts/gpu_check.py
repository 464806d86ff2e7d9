"""Every stage for a few steps in bf16 on CUDA, with the real kernels, on a tiny shapes world; one line of figures
per stage. Run through `scripts/gpu_check.sh` (one GPU; `NPROC=N` runs each stage under torchrun on N GPUs,
where FSDP2 shards with `MixedPrecisionPolicy(bf16, fp32)`).

    python scripts/gpu_check.py OUT [--steps N] [--compile]

The world: the shapes text, 64 images, 32 clips and 32 spoken sentences (`mm.datasets`), made in OUT/data. The
stages chain as in `mm demo`: lm-pretrain -> (its LM copied in bf16: the adapter stages keep a bf16 checkpoint's
frozen LM in bf16) -> clip-pretrain, image-pretrain, image-anneal, video; bestrq-pretrain -> speech. Each line:
steps, mean step time and tokens/s over the steps after the first (compilation, allocator warm-up), MFU
against a bf16 matmul (stages that count their FLOPs), the peak CUDA memory allocated, the last loss, and the
dtypes of the trainable and frozen parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mm.app.report_figures import STAGE_ORDER as STAGES  # the order the demo runs the stages


def world(data: Path, rank: int) -> dict[str, Path]:
    """The tiny shapes world (made by rank 0, read by every rank)."""
    from mm.training import distributed
    from mm.world import synth_motion, synth_shapes, synth_text
    from mm.world.speech import synth_speech

    paths = {
        "text": data / "text" / "train.txt",
        "heldout": data / "text" / "heldout.txt",
        "shapes": data / "shapes" / "train.jsonl",
        "motion": data / "motion" / "train.jsonl",
        "speech": data / "speech" / "train.jsonl",
    }
    if rank == 0 and not all(p.is_file() for p in paths.values()):
        synth_text(data, n=2000, seed=0, split="train")
        synth_text(data, n=100, seed=0, split="heldout")
        synth_shapes(data, n=64, seed=0, split="train")
        synth_motion(data, n=32, seed=0, split="train")
        synth_speech(data, n=32, seed=0, split="train")
    distributed.barrier()
    return paths


def configs(out: Path, data: dict[str, Path], steps: int, compile_: bool, device: str) -> dict[str, Any]:
    """Each stage's demo preset, shrunk to `steps` steps in bf16 on `device` (auto: this process's GPU)."""
    from mm.app.demo_steps import load_preset
    from mm.training.config import DataSourceConfig
    from mm.training.stage import stage_class

    presets = {
        "lm-pretrain": "lm/tiny.yaml",
        "clip-pretrain": "encoders/clip_tiny.yaml",
        "image-pretrain": "stages/image_pretrain_tiny.yaml",
        "image-anneal": "stages/image_anneal_tiny.yaml",
        "video": "stages/video_tiny.yaml",
        "bestrq-pretrain": "encoders/bestrq_tiny.yaml",
        "speech": "stages/speech_tiny.yaml",
    }
    lm, lm_bf16 = out / "lm-pretrain" / "final", out / "lm-bf16"
    cfgs = {}
    for name, preset in presets.items():
        cfg = load_preset(stage_class(name).config_class, preset)
        tr = cfg.train
        tr.max_steps, tr.save_every, tr.eval_every, tr.log_every = steps, steps, 0, 1
        tr.device, tr.autocast, tr.compile, tr.num_threads, tr.peak_flops = device, "bf16", compile_, 0, 0.0
        tr.ramp = []  # one batch shape throughout
        for key in ("eval_samples", "curve_samples"):
            if hasattr(cfg, key):
                setattr(cfg, key, 0)
        cfg.out = str(out / name)
        cfgs[name] = cfg
    c = cfgs["lm-pretrain"]
    c.data = [DataSourceConfig(paths=[str(data["text"])], name="shapes", doc_split="line")]
    c.heldout = [DataSourceConfig(paths=[str(data["heldout"])], name="heldout", doc_split="line")]
    c.anneal.steps, c.anneal.polyak_k, c.anneal.source = 0, 0, None
    c.train.eval_batches = 4
    cfgs["clip-pretrain"].tokenizer = str(lm)
    cfgs["clip-pretrain"].data.train = [str(data["shapes"])]
    for name in ("image-pretrain", "image-anneal"):
        cfgs[name].lm, cfgs[name].data.train = str(lm_bf16), [str(data["shapes"])]
    cfgs["image-pretrain"].encoder_weights = str(out / "clip-pretrain" / "final" / "encoder.safetensors")
    cfgs["image-pretrain"].init_from = None
    cfgs["image-anneal"].encoder_weights = None
    cfgs["image-anneal"].init_from = str(out / "image-pretrain" / "final")
    cfgs["video"].init_from = str(out / "image-anneal" / "final")
    cfgs["video"].data.train = [str(data["motion"])]
    cfgs["bestrq-pretrain"].data.train = [str(data["speech"])]
    cfgs["speech"].lm = str(lm_bf16)
    cfgs["speech"].encoder_weights = str(out / "bestrq-pretrain" / "final" / "encoder.safetensors")
    cfgs["speech"].data.train = [str(data["speech"])]
    for name, cfg in cfgs.items():  # no held-out captioning or transcription: the LM's perplexity only
        if name != "lm-pretrain":
            cfg.data.heldout = []
    return cfgs


def bf16_copy(final: Path, out: Path, rank: int) -> None:
    """The trained LM saved again in bf16 (what a real Llama checkpoint is), with its tokenizer."""
    from mm.formats.hf_llama import load_hf, save_hf
    from mm.lm import Tokenizer
    from mm.training import distributed

    if rank == 0:
        save_hf(load_hf(final).to(torch.bfloat16), out)
        Tokenizer.from_file(final).save(out)
    distributed.barrier()


def figures(name: str, out: Path, stage_params: dict[str, str], seconds: float) -> str:
    """One line of figures from the stage's metrics.jsonl."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    warm = recs[1:] or recs
    step_s = sum(r["step_time_s"] for r in warm) / len(warm)
    tok_s = sum(r["tokens_per_s"] for r in warm) / len(warm)
    mfu = [r["mfu"] for r in warm if "mfu" in r]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    loss = recs[-1]["loss"]
    ok = "ok" if math.isfinite(loss) else "NOT FINITE"
    mfu_s = f"{100 * sum(mfu) / len(mfu):5.1f}%" if mfu else "    -"
    return (
        f"{name:16s} steps {len(recs):3d}  step {1000 * step_s:8.1f} ms  {tok_s:11,.0f} tok/s  MFU {mfu_s}  "
        f"peak {peak:6.2f} GiB  loss {loss:8.4f} {ok}  trainable {stage_params['trainable']}  "
        f"frozen {stage_params['frozen']}  ({seconds:.0f} s)"
    )


def dtypes(stage: Any) -> dict[str, str]:
    """The dtypes of the trainable and of the frozen parameters."""
    trained = {id(p) for _, p in stage.trainable()}
    kinds: dict[str, set[str]] = {"trainable": set(), "frozen": set()}
    for p in stage.model.parameters():
        kinds["trainable" if id(p) in trained else "frozen"].add(str(p.dtype).removeprefix("torch."))
    return {k: ",".join(sorted(v)) or "-" for k, v in kinds.items()}


def main() -> int:
    """Run every stage; print one line per stage (rank 0); 1 if a stage failed or its loss is not finite."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile each block)")
    ap.add_argument(
        "--cpu", action="store_true", help="check the script itself without a GPU (figures meaningless)"
    )
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    import mm.training.runner as runner
    from mm.training import distributed

    distributed.init_distributed()
    rank = distributed.rank()
    data = world(args.out / "data", rank)
    cfgs = configs(args.out, data, args.steps, args.compile, "cpu" if args.cpu else "auto")
    if rank == 0:
        name = "CPU" if args.cpu else torch.cuda.get_device_name()
        print(
            f"gpu_check: {distributed.world_size()} x {name}, torch {torch.__version__}, bf16, {args.steps} steps"
        )
    stages: list[Any] = []
    original = runner.prepare

    def prepare(stage: Any, init: Any, **kw: Any) -> None:  # keeps the run's stage, to report its dtypes
        original(stage, init, **kw)
        stages.append(stage)

    runner.prepare = prepare
    failed = False
    for name in STAGES:
        if name == "clip-pretrain":
            bf16_copy(args.out / "lm-pretrain" / "final", args.out / "lm-bf16", rank)
        if not args.cpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            runner.run(cfgs[name])
            if rank == 0:  # (rank 0 writes metrics.jsonl)
                line = figures(name, Path(cfgs[name].out), dtypes(stages[-1]), time.perf_counter() - t0)
                failed |= "NOT FINITE" in line
        except Exception as e:  # report it and go on (later stages that need this one fail too)
            line, failed = f"{name:16s} FAILED: {type(e).__name__}: {e}", True
        if rank == 0:
            print(line, flush=True)
    runner.prepare = original
    distributed.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
