"""`mm profile`: where one training step of a stage spends its time, on the stage's real step.

The stage is built exactly as `mm train` builds it (`mm.training.runner`: build, parallelize, materialise, open
the data, the `Trainer`), then, after `warmup` steps, `steps` optimizer steps of `Trainer.train_step` are timed
phase by phase (the phases it records: the data path, forward + loss, backward, clipping + AdamW) and once under `torch.profiler` (operator self time: matrix
products, convolutions, attention, everything else; what the operators leave of the wall time is Python and
dispatch overhead). FLOPs of one forward + backward are counted by `torch.utils.flop_counter.FlopCounterMode`
and set against a large float32 matmul timed on this machine (`measure_peak_flops`, the MFU denominator).
One evaluation (`train.eval_every`'s learning curve) and one checkpoint are timed too, since a stage pays for
them every `eval_every` / `save_every` steps.

Nothing is written to the stage's output folder except one checkpoint under a temporary folder.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mm.training.runner import build, context, prepare, stage_for
from mm.training.services import autocast_context, measure_peak_flops, setup_run
from mm.training.trainer import Trainer

# operator families of the profile (matched on the aten name)
FAMILIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "conv": ("convolution", "mkldnn_convolution", "conv2d", "conv1d", "max_pool", "max_pool2d"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "optimizer": ("_foreach_", "_fused_adam"),
}


def _family(name: str) -> str:
    """The operator family of an aten name (`FAMILIES`), else "other"."""
    for fam, keys in FAMILIES.items():
        if any(k in name for k in keys):
            return fam
    return "other"


def _timed_step(trainer: Trainer) -> dict[str, float]:
    """One optimizer step of `trainer` (`Trainer.train_step` itself), its phases in seconds."""
    rec = trainer.train_step()
    return {k: rec[f"{k}_s"] for k in ("data", "forward", "backward", "optimizer")} | {
        "step": rec["step_time_s"]
    }


def _flops(trainer: Trainer) -> float:
    """FLOPs of one forward + backward of the next batch (the optimizer's few FLOPs are not counted)."""
    stage = trainer.stage
    bsz, seq = stage.batch_shape(trainer.step, trainer.tokens_seen)
    micro = trainer._micro_batches(stage.next_batch(trainer.local_rows(bsz), seq))
    counter = FlopCounterMode(display=False)
    with counter:
        for mb in micro:
            with trainer._autocast:
                ls, _ = stage.loss(mb)
            ls.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _operator_profile(trainer: Trainer, steps: int) -> dict[str, Any]:
    """Self CPU time per operator family over `steps` steps under torch.profiler, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            _timed_step(trainer)
        wall = time.perf_counter() - t0
    fam: dict[str, float] = defaultdict(float)
    ops = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        self_s = ev.self_cpu_time_total / 1e6
        fam[_family(ev.key)] += self_s
        ops.append((ev.key, self_s, ev.count))
    ops.sort(key=lambda o: -o[1])
    total_ops = sum(fam.values())
    return {
        "profiled_wall_s_per_step": wall / steps,
        "operator_s_per_step": {k: v / steps for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
        "operators_total_s_per_step": total_ops / steps,
        # what the aten operators leave of the wall time (profiler overhead included: an upper bound)
        "python_dispatch_s_per_step": max(0.0, wall - total_ops) / steps,
        "top_operators": [
            {"name": n, "self_s_per_step": s / steps, "calls_per_step": c / steps} for n, s, c in ops[:12]
        ],
    }


def profile_stage(cfg: Any, *, steps: int = 20, warmup: int = 5, profiled_steps: int = 5) -> dict[str, Any]:
    """Build the stage of `cfg` as `mm train` does and measure its step (module docstring); a JSON record."""
    device = setup_run(cfg.train)
    stage = stage_for(cfg, context(cfg, device))
    stage.check_common()
    stage.check()
    prepare(stage, build(stage))
    stage.open_data(0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(stage, cfg.train, cfg.optim, tmp)
        trainer.start_loop()
        try:
            t0 = time.perf_counter()
            first = _timed_step(trainer)["step"]  # includes one-off work (compilation, caches)
            for _ in range(max(0, warmup - 1)):
                _timed_step(trainer)
            warm_s = time.perf_counter() - t0
            timed = [_timed_step(trainer) for _ in range(steps)]
            flops = _flops(trainer)
            ops = _operator_profile(trainer, profiled_steps)
            t = time.perf_counter()
            with autocast_context(cfg.train.autocast, device):
                ev = stage.evaluate()
            eval_s = time.perf_counter() - t if ev else 0.0
            t = time.perf_counter()
            trainer.save()
            trainer.wait_for_save()
            save_s = time.perf_counter() - t
        finally:
            stage.close_data()
    med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    peak = measure_peak_flops(device, torch.float32)
    tr = cfg.train
    per_step_extra = (eval_s / tr.eval_every if tr.eval_every else 0.0) + (
        save_s / tr.save_every if tr.save_every else 0.0
    )
    return {
        "stage": stage.name,
        "threads": torch.get_num_threads(),
        "batch_size": tr.batch_size,
        "max_steps": tr.max_steps,
        "first_step_s": first,
        "warmup_s": warm_s,
        "median_s": med,
        "flops_per_step": flops,
        "achieved_flop_s": flops / med["step"],
        "matmul_peak_flop_s": peak,
        "fraction_of_peak": flops / med["step"] / peak,
        "eval_s": eval_s,
        "eval_every": tr.eval_every,
        "checkpoint_s": save_s,
        "save_every": tr.save_every,
        "amortised_eval_and_checkpoint_s_per_step": per_step_extra,
        "estimated_stage_train_s": tr.max_steps * (med["step"] + per_step_extra),
        **ops,
    }


def format_profile(rec: dict[str, Any]) -> str:
    """A human-readable summary of `profile_stage`'s record."""
    m = rec["median_s"]
    lines = [
        f"{rec['stage']}: {m['step'] * 1e3:.1f} ms/step (median, {rec['threads']} threads, batch "
        f"{rec['batch_size']}): data {m['data'] * 1e3:.1f}, forward {m['forward'] * 1e3:.1f}, backward "
        f"{m['backward'] * 1e3:.1f}, optimizer {m['optimizer'] * 1e3:.1f}",
        f"  {rec['flops_per_step'] / 1e9:.2f} GFLOP/step, {rec['achieved_flop_s'] / 1e9:.1f} GFLOP/s = "
        f"{rec['fraction_of_peak']:.2f} of the float32 matmul peak ({rec['matmul_peak_flop_s'] / 1e9:.0f} GFLOP/s)",
        "  operators (self, ms/step): "
        + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in rec["operator_s_per_step"].items())
        + f"; Python + dispatch {rec['python_dispatch_s_per_step'] * 1e3:.1f}",
        f"  evaluation {rec['eval_s']:.2f} s every {rec['eval_every']} steps, checkpoint {rec['checkpoint_s']:.2f} s "
        f"every {rec['save_every']}: {rec['amortised_eval_and_checkpoint_s_per_step'] * 1e3:.1f} ms/step; first "
        f"step {rec['first_step_s']:.2f} s; {rec['max_steps']} steps ~ {rec['estimated_stage_train_s']:.0f} s",
        "  top operators: "
        + ", ".join(
            f"{o['name'].removeprefix('aten::')} {o['self_s_per_step'] * 1e3:.1f}"
            for o in rec["top_operators"][:8]
        ),
    ]
    return "\n".join(lines)


def demo_configs(out: str, names: list[str] | None) -> list[Any]:
    """The configs `mm demo --out OUT` runs its stages with (paths filled in), for the stages named."""
    from pathlib import Path

    from mm.app.demo_steps import STEPS

    known = [s.name for s in STEPS]
    bad = [n for n in names or [] if n not in known]
    if bad:
        raise ValueError(f"--stage {bad[0]}: not a demo stage; available: {', '.join(known)}")
    root = Path(out)
    return [s.config(root, root / "data") for s in STEPS if not names or s.name in names]


def cmd_profile(args: Any) -> int:
    """`mm profile`: the step profile of a stage config, or of the demo's stages; one summary per stage."""
    import json
    import logging
    import sys
    from pathlib import Path

    from mm.app.train_commands import set_data, stage_name
    from mm.training.config import load_config
    from mm.training.stage import stage_class

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    if bool(args.config) == bool(args.demo):
        raise ValueError("give either --config CFG or --demo OUT")
    if args.config:
        name = stage_name(args.config, args.overrides, "image-pretrain")
        cfg = load_config(stage_class(name).config_class, args.config, [*args.overrides, f"stage={name}"])
        if args.data:
            set_data(cfg, list(args.data))
        cfgs = [cfg]
    else:
        cfgs = demo_configs(args.demo, args.stage)
        if args.overrides or args.data:
            raise ValueError("--data and KEY=VALUE overrides apply to --config only")
    records = []
    for cfg in cfgs:
        rec = profile_stage(cfg, steps=args.steps, warmup=args.warmup)
        records.append(rec)
        print(format_profile(rec), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0
