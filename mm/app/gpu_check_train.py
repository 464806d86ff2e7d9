"""Checks 2 and 3 of `mm.app.gpu_check`: a real-shape LM step, and FSDP2 forced on a one-process group.

`lm_step`: LM layers at the 8B widths (dim 4096, 32 / 8 heads, FFN 14336), vocabulary 128256, one row of 8192
tokens, the loss in chunks of 1024 tokens (the preset's `train.loss_chunk`), activation checkpointing, FSDP2 over a one-process group with the run's mixed-precision policy (what
`mm plan` models at one GPU), fused AdamW; five steps on one batch with compile off, then on. It asserts that the
loss falls, that the peak allocated and reserved memory lie within 10% of `mm plan`'s total for the same shape,
that the steps after the first make no host sync (`torch.cuda.set_sync_debug_mode`) and that compile makes no
recompile after the first step; it records step time, tokens/s and MFU against the chip's data-sheet peak.

`fsdp`: the demo's lm-pretrain stage run by the runner with sharding forced (`MM_FSDP_FORCE=1`): parameters
are DTensor shards in float32, gathered in bf16 for compute (read inside a layer's forward), gradients
reduced in float32, AdamW fused on the shards; checkpoints saved asynchronously, and a run resumed from the
middle checkpoint gives the same losses as the uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mm.app.gpu_check import CheckContext, CheckResult

MEMORY_TOLERANCE = 0.10  # |measured - planned| / planned
LR = 3e-4


@contextmanager
def one_process_group() -> Any:
    """FSDP2 sharding forced over a one-process group (`MM_FSDP_FORCE`), left again afterwards."""
    from mm.training import distributed as dist_utils

    old = os.environ.get(dist_utils.FORCE_SHARDING_ENV)
    os.environ[dist_utils.FORCE_SHARDING_ENV] = "1"
    joined = not dist_utils.is_distributed() and dist_utils.init_distributed()
    try:
        yield
    finally:
        if joined:
            dist_utils.shutdown()
        if old is None:
            os.environ.pop(dist_utils.FORCE_SHARDING_ENV, None)
        else:
            os.environ[dist_utils.FORCE_SHARDING_ENV] = old


def config_path(name: str) -> str:
    """A preset of the project's configs folder (the source tree's or the installed `mm.configs`)."""
    import mm.configs

    return str(Path(mm.configs.__file__).parent / name)


def planned_gib(ctx: CheckContext) -> float:
    """`mm plan`'s per-GPU total for the lm_step shape at one GPU, micro-batch 1, full checkpointing."""
    from mm.app.plan import load_stage, plan

    s = ctx.sizes
    over = [f"model.preset={s.lm_preset}", f"model.overrides.n_layers={s.lm_layers}"]
    over += [f"model.overrides.{k}={v}" for k, v in s.lm_overrides]
    over += [
        f"tokenizer.vocab_size={dict(s.lm_overrides).get('vocab_size', 128256)}",
        f"train.seq_len={s.lm_seq}",
    ]
    stage = load_stage(config_path("lm/llama3-8b.yaml"), over)
    p = plan(stage, gpus=1, gpu_memory_gib=1e6, seq_len=s.lm_seq, batch=1, activation_checkpointing="full")
    return float(p["total_gib"])


def build_lm(ctx: CheckContext, compile_: bool) -> tuple[torch.nn.Module, Any]:
    """The lm_step model, parallelised as the runner does (checkpointing, compile, FSDP2), and its policy."""
    from mm.lm.config import preset
    from mm.lm.model import Transformer
    from mm.training import distributed as dist_utils
    from mm.training.config import TrainConfig
    from mm.training.parallelize import ParallelPlan, mixed_precision, parallelize_model

    s = ctx.sizes
    cfg = preset(
        s.lm_preset, n_layers=s.lm_layers, max_seq_len=s.lm_seq, rope_scaling=None, **dict(s.lm_overrides)
    )
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = Transformer(cfg)
    tr = TrainConfig(activation_checkpointing=True, compile=compile_, autocast="auto")
    policy = mixed_precision(tr, ctx.device)
    layers = list(model.layers)
    parallelize_model(
        ParallelPlan(model, blocks=layers, fsdp_units=layers),
        tr,
        dist_utils.device_mesh(ctx.device.type),
        policy,
    )
    return model, policy


LOSS_CHUNK = 1024  # configs/lm/llama3-8b.yaml's train.loss_chunk (what `mm plan` reads for the same shape)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy of one packed row (one document), chunked as the 8B preset trains."""
    labels = tokens[:, 1:]
    return model(tokens[:, :-1], labels=labels, loss_chunk=chunk) / labels.numel()


def count_syncs(ctx: CheckContext, fn: Any) -> tuple[int, list[str]]:
    """Host syncs `fn` makes on CUDA (`set_sync_debug_mode("warn")`), and their distinct messages."""
    if not ctx.cuda:
        fn()
        return 0, []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()  # (itself not counted: set back below first)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return len(msgs), sorted(set(msgs))[:5]


def run_lm_steps(ctx: CheckContext, compile_: bool) -> dict[str, Any]:
    """Five steps of the lm_step model on one batch: losses, step times, syncs, recompiles, peak memory."""
    from torch._dynamo.utils import counters

    from mm.training.services import autocast_context

    s, dev = ctx.sizes, ctx.device
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch._dynamo.reset()
    counters.clear()
    model, policy = build_lm(ctx, compile_)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True if ctx.cuda else None)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, s.lm_seq + 1), generator=g).to(dev)
    autocast = autocast_context("auto", dev)
    losses: list[torch.Tensor] = []
    times: list[float] = []

    def step() -> None:
        with autocast:
            loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    syncs, messages, graphs = 0, [], 0
    for i in range(s.lm_steps):
        t0 = time.perf_counter()
        if i == 0:
            step()
            graphs = sum(counters["stats"].values()) if compile_ else 0
        else:
            n, m = count_syncs(ctx, step)
            syncs, messages = syncs + n, messages or m
        if ctx.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    recompiles = (sum(counters["stats"].values()) - graphs) if compile_ else 0
    step_s = statistics.median(times[1:])
    return {
        "losses": [float(x) for x in losses],
        "first_step_s": times[0],
        "step_s": step_s,
        "tokens_per_s": s.lm_seq / step_s,
        "flops_per_token": model.cfg.flops_per_token(s.lm_seq),
        "syncs_after_first": syncs,
        "sync_messages": messages,
        "recompiles": recompiles,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if ctx.cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30 if ctx.cuda else None,
        "param_dtype": str(getattr(policy, "param_dtype", None)),
        "sharded": hasattr(next(model.parameters()), "device_mesh"),
    }


def check_lm_step(ctx: CheckContext, res: CheckResult) -> None:
    """Check 2: a real-shape LM step, compile off then on."""
    from mm.training.services import compute_dtype, mfu_denominator

    peak_flops = mfu_denominator(ctx.device, compute_dtype("auto", ctx.device))
    planned = planned_gib(ctx)
    res.figure(planned_total_gib=planned, peak_flops=peak_flops)
    with one_process_group():
        for compile_ in (False, True):
            key = "compiled" if compile_ else "eager"
            r = run_lm_steps(ctx, compile_)
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak_flops
            res.figure(**{key: r})
            res.expect(f"{key}: loss falls over {len(r['losses'])} steps", r["losses"][-1] < r["losses"][0],
                       r["losses"], "last < first")  # fmt: skip
            res.expect(f"{key}: no host sync after the first step", r["syncs_after_first"] == 0 if ctx.cuda else None,
                       r["syncs_after_first"], 0)  # fmt: skip
            if compile_:
                res.expect(
                    "compiled: no recompile after the first step", r["recompiles"] == 0, r["recompiles"], 0
                )
            for what in ("peak_allocated_gib", "peak_reserved_gib"):
                v = r[what]
                ok = None if v is None else abs(v - planned) / planned <= MEMORY_TOLERANCE
                res.expect(f"{key}: {what} within 10% of mm plan", ok, v, f"{planned:.2f} GiB +- 10%")


# ---- check 3 ---------------------------------------------------------------------------------------------------
def forward_param_dtype(stage: Any) -> list[str]:
    """Records the dtype of the first LM layer's weights as its forward sees them (FSDP2 gathers them)."""
    seen: list[str] = []
    layer = stage.model.layers[0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        seen.append(str(next(module.parameters()).dtype).removeprefix("torch."))

    layer.attention.register_forward_pre_hook(hook)
    return seen


def check_fsdp(ctx: CheckContext, res: CheckResult) -> None:
    """Check 3: the lm-pretrain stage under FSDP2 forced on one process: dtypes, fused AdamW, save and resume."""
    import mm.training.runner as runner
    from mm.app.gpu_check_stages import stage_configs, world

    steps = 6
    out = ctx.out / "fsdp"
    shutil.rmtree(out, ignore_errors=True)
    data = world(ctx.out / "data", speech=False)
    seen: dict[str, Any] = {}
    original = runner.prepare

    def prepare(stage: Any, init: Any, **kw: Any) -> None:
        original(stage, init, **kw)
        seen["stage"], seen["dtypes"] = stage, forward_param_dtype(stage)

    def cfg_for(name: str) -> Any:
        cfg = stage_configs(out, data, steps, ctx, only=("lm-pretrain",))["lm-pretrain"]
        cfg.train.save_every, cfg.train.async_checkpoint, cfg.train.keep_last = 3, True, 0
        cfg.out = str(out / name)
        return cfg

    runner.prepare = prepare
    try:
        with one_process_group():
            runner.run(cfg_for("whole"))
            stage = seen["stage"]
            p = next(stage.model.layers[0].parameters())
            opt_fused = _optimizer_fused(out / "whole")
            res.figure(
                sharded_param_type=type(p).__name__,
                shard_dtype=str(p.dtype),
                forward_dtypes=seen["dtypes"][:2],
            )
            res.expect(
                "parameters are DTensor shards", hasattr(p, "device_mesh"), type(p).__name__, "DTensor"
            )
            res.expect(
                "shards are float32 (the master weights)", p.dtype == torch.float32, str(p.dtype), "float32"
            )
            want = "bfloat16" if ctx.cuda else "float32"
            res.expect(
                "forward sees the compute dtype",
                set(seen["dtypes"]) == {want},
                sorted(set(seen["dtypes"])),
                want,
            )
            res.expect("AdamW fused on the shards", opt_fused if ctx.cuda else None, opt_fused, True)
            half = out / "half"
            shutil.copytree(out / "whole", half, ignore=shutil.ignore_patterns("final", "step_00000006"))
            _mark_copied(half / "metrics.jsonl", upto=3)
            cfg = cfg_for("half")
            runner.run(cfg, resume=True)
    finally:
        runner.prepare = original
    whole, resumed = _losses(out / "whole"), _losses(out / "half")
    res.figure(losses_whole=whole, losses_resumed=resumed)
    tail = {k: v for k, v in whole.items() if k > 3}
    same = bool(tail) and all(
        abs(resumed.get(k, float("nan")) - v) <= 1e-4 * max(1.0, abs(v)) for k, v in tail.items()
    )
    res.expect(
        "resumed at step 3 (async save) gives the same losses", same, {k: resumed.get(k) for k in tail}, tail
    )
    kept = _copied_steps(out / "half" / "metrics.jsonl")
    res.expect(
        "the resumed run started after step 3 (its first 3 records kept)", kept == [1, 2, 3], kept, [1, 2, 3]
    )


def _mark_copied(path: Path, upto: int) -> None:
    """Keep a run's records up to `upto`, each marked as copied (a resumed run keeps them; a restart drops them)."""
    import json

    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    path.write_text(
        "".join(json.dumps({**r, "copied": True}) + "\n" for r in recs if r.get("step", 0) <= upto)
    )


def _copied_steps(path: Path) -> list[int]:
    """The steps of the records marked as copied."""
    import json

    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip() and '"copied"' in x]


def _optimizer_fused(run: Path) -> bool:
    """Whether the run's AdamW was fused (the trainer records its optimizer in summary.json)."""
    import json

    summary = json.loads((run / "summary.json").read_text())
    return bool(summary.get("optimizer", {}).get("fused"))


def _losses(run: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl (the last record of each step)."""
    import json

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {int(r["step"]): float(r["loss"]) for r in recs if "loss" in r}
