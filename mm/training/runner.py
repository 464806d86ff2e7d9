"""The one runner of every stage (`mm train --config CFG`): set-up, freeze guard, resume, the loop,
verification, evaluation, export and summary, done once here for whatever `Stage` the config names.

    threads, process group, device, seed -> the stage, given its `StageContext` -> check -> build (on the meta
    device, its initialisation recorded) -> parallelize (activation checkpointing, compile, FSDP2 or replicate:
    the stage's `ParallelPlan`, over the run's device mesh with its mixed-precision policy) -> materialise
    (each process allocates and fills only its shard) -> fingerprint the frozen parts -> (resume check)
    -> open this process's data -> Trainer.fit -> fingerprints again (refuse a change) -> finish
    -> final evaluation -> export -> summary

Multi-process runs (torchrun): every process builds the same model on the meta device, keeps only its shard of
it (`mm.training.materialize`: the same values as a one-process build under the same seed) and reads only its
share of the data; the trainer averages gradients (FSDP2 for the stages that shard their model, an all-reduce
for replicated ones). An exception on one process ends them all at once, with its traceback prefixed by its
rank (`mm.training.rank_failure`), rather than leaving the others in a collective until the backend's timeout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.lm.io import write_json
from mm.training import distributed as dist_utils
from mm.training.checkpoint import latest_checkpoint
from mm.training.config import config_to_yaml
from mm.training.freeze import FrozenLMChanged, fingerprint, fingerprint_tensors
from mm.training.materialize import InitRecord, materialize, record_init
from mm.training.parallelize import frozen_dtype, mixed_precision, parallelize_model
from mm.training.rank_failure import end_group_on_failure
from mm.training.services import autocast_context
from mm.training.stage import Stage, StageContext, stage_class
from mm.training.trainer import Trainer, TrainingDiverged, setup_run


class FrozenPartChanged(FrozenLMChanged):
    """A frozen part's fingerprint differs from the one recorded."""


def stage_for(cfg: Any, ctx: StageContext | None = None) -> Stage[Any]:
    """The `Stage` object for a stage config (by its `stage:` name), given what the run supplies."""
    cls = stage_class(cfg.stage)
    if not isinstance(cfg, cls.config_class):
        raise TypeError(f"stage {cfg.stage!r} takes a {cls.config_class.__name__}, got {type(cfg).__name__}")
    return cls(cfg, ctx)


def context(cfg: Any, device: torch.device, *, resume: bool = False) -> StageContext:
    """This process's `StageContext` for a run of `cfg` on `device` (after `setup_run`)."""
    return StageContext(
        rank=dist_utils.rank(),
        world=dist_utils.world_size(),
        device=device,
        resume=resume,
        frozen_dtype=frozen_dtype(cfg.train, device),
        mp_policy=mixed_precision(cfg.train, device),
    )


def part_fingerprint(part: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 fingerprint of a frozen part (a module's state dict, or named tensors)."""
    return fingerprint(part) if isinstance(part, nn.Module) else fingerprint_tensors(part)


def fingerprints(stage: Stage[Any]) -> dict[str, str]:
    """The fingerprint of every frozen part of the stage, by name."""
    return {name: part_fingerprint(part) for name, part in stage.frozen().items()}


def build(stage: Stage[Any]) -> InitRecord | None:
    """`stage.build`: on the meta device with its initialisation recorded (`Stage.meta_init`; the record is
    returned), else on the context's device (None)."""
    if not stage.meta_init():
        stage.build(stage.ctx.device)
        return None
    with record_init() as rec:
        stage.build(torch.device("meta"))
    rec.bind(stage.model)
    return rec


def prepare(stage: Stage[Any], init: InitRecord | None, *, materialise: bool = True) -> None:
    """Apply the stage's `ParallelPlan` (activation checkpointing, compile, FSDP2 in several processes, over the
    run's mesh with its mixed-precision policy), then, for a meta-built model (`init`: its recorded
    initialisation), each process's part of every tensor (`materialise` False leaves it on the meta device:
    e.g. to measure a model too big to hold)."""
    tr, ctx = stage.cfg.train, stage.ctx
    plan = stage.parallel_plan()
    for flag in ("activation_checkpointing", "compile"):
        if getattr(tr, flag) and not plan.blocks:
            raise ValueError(f"train.{flag}: the {stage.name} stage has no repeated blocks to apply it to")
    mesh = dist_utils.device_mesh(ctx.device.type) if plan.sharded else None
    parallelize_model(plan, tr, mesh, ctx.mp_policy)
    if materialise and init is not None:
        materialize(stage.model, init, ctx.device)
        stage.materialized()


def check_resume(out: Path, record: dict[str, Any], frozen: dict[str, str]) -> None:
    """Refuse to resume a checkpoint written against other frozen parts than this run's."""
    ck = latest_checkpoint(out / "checkpoints")
    if ck is None:
        return
    rec = json.loads((ck / "trainer.json").read_text()).get("config", {})
    for name, fp in frozen.items():
        if rec.get(f"{name}_fingerprint", fp) != fp:
            raise FrozenPartChanged(
                f"{ck} belongs to another {name} (fingerprint {rec[f'{name}_fingerprint']})"
            )
    if rec.get("stage", record["stage"]) != record["stage"]:
        raise ValueError(f"{ck} is a checkpoint of the {rec['stage']} stage, not {record['stage']}")


def run(
    cfg: Any, *, resume: bool = False, before_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the stage `cfg` describes; write OUT/final and OUT/summary.json; return the summary.
    `before_step(step)` runs before every optimizer step (e.g. the demo's thread budget). Under several
    processes an exception on one ends every process of the group at once, with that process's traceback
    (`rank_failure`; a divergence exits with status 3, as `mm train` does in one process)."""
    with end_group_on_failure({TrainingDiverged: 3}):
        return _run(cfg, resume=resume, before_step=before_step)


def _run(cfg: Any, *, resume: bool, before_step: Callable[[int], None] | None) -> dict[str, Any]:
    tr = cfg.train
    device = setup_run(tr)
    stage = stage_for(cfg, context(cfg, device, resume=resume))
    stage.check_common()  # before any weights or data are read
    stage.check()
    out = Path(cfg.out)
    prepare(stage, build(stage))
    fp_start = fingerprints(stage)
    stage.check_frozen(fp_start)
    record = {
        "stage": stage.name,
        "yaml": config_to_yaml(cfg),
        **{f"{k}_fingerprint": v for k, v in fp_start.items()},
        **stage.record(),
    }
    if resume:
        check_resume(out, record, fp_start)
    stage.open_data(stage.rank, stage.world)
    trainer = Trainer(
        stage,
        tr,
        cfg.optim,
        out,
        anneal_steps=stage.anneal_steps,
        polyak_k=stage.polyak_k,
        config_record=record,
        before_step=before_step,
    )
    if stage.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    try:
        summary = trainer.fit(resume=resume)
    finally:
        stage.close_data()  # the DataLoader workers end with training, also when it fails
    fp_end = fingerprints(stage)
    for name, fp in fp_start.items():
        if fp_end[name] != fp:
            raise FrozenPartChanged(
                f"the {name} changed during {stage.name}: {fp[:16]}... -> {fp_end[name][:16]}..."
            )
        summary[f"{name}_fingerprint_start"], summary[f"{name}_fingerprint_end"] = fp, fp_end[name]
    summary["data_skips"] = stage.data_stats()
    if stage.world > 1:  # what each process read (its own share)
        summary["data_per_process"] = dist_utils.gather_objects(summary["data_skips"])
    if summary["stopped"] != "max_steps":
        return summary
    stage.finish(trainer, summary)
    with autocast_context(tr.autocast, device):  # as the training forwards (bf16 on CUDA)
        summary.update(stage.final_evaluation())
    meta = {"stage": stage.name, **stage.bundle_meta()}
    for name, fp in fp_start.items():
        meta.update(
            {
                f"{name}_fingerprint": fp,
                f"{name}_fingerprint_start": fp,
                f"{name}_fingerprint_end": fp_end[name],
            }
        )
    stage.export(out / "final", meta)
    summary.setdefault("final", str(out / "final"))
    if stage.rank == 0:
        write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    dist_utils.barrier()
    return summary


__all__ = ["build", "context", "fingerprints", "prepare", "run", "stage_for"]
