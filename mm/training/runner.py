"""The one runner of every stage (`mm train --config CFG`): set-up, freeze guard, resume, the loop,
verification, evaluation, export and summary, done once here for whatever `Stage` the config names.

    check -> threads, process group, device, seed -> build -> fingerprint the frozen parts -> (resume check)
    -> activation checkpointing, parallelize (FSDP2 or replicate), compile -> open this process's data
    -> Trainer.fit -> fingerprints again (refuse a change) -> finish -> final evaluation -> export -> summary

Multi-process runs (torchrun): every process builds the same model and reads only its share of the data; the
trainer averages gradients (FSDP2 for the stages that shard their model, an all-reduce for replicated ones).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm.training import distributed as dist_utils
from mm.training.checkpoint import latest_checkpoint, write_json
from mm.training.config import config_to_yaml
from mm.training.freeze import FrozenLMChanged, fingerprint, fingerprint_tensors
from mm.training.stage import Stage, stage_class
from mm.training.trainer import Trainer, setup_run


class FrozenPartChanged(FrozenLMChanged):
    """A frozen part's fingerprint differs from the one recorded."""


def stage_for(cfg: Any) -> Stage:
    """The `Stage` object for a stage config (by its `stage:` name)."""
    cls = stage_class(cfg.stage)
    if not isinstance(cfg, cls.config_class):
        raise TypeError(f"stage {cfg.stage!r} takes a {cls.config_class.__name__}, got {type(cfg).__name__}")
    return cls(cfg)


def part_fingerprint(part: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 fingerprint of a frozen part (a module's state dict, or named tensors)."""
    return fingerprint(part) if isinstance(part, nn.Module) else fingerprint_tensors(part)


def fingerprints(stage: Stage) -> dict[str, str]:
    """The fingerprint of every frozen part of the stage, by name."""
    return {name: part_fingerprint(part) for name, part in stage.frozen().items()}


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (applied from outside the model code)."""
    for block in blocks:
        fwd = block.forward
        block.forward = functools.partial(checkpoint, fwd, use_reentrant=False)  # type: ignore[method-assign]


def prepare(stage: Stage) -> None:
    """Activation checkpointing, multi-process set-up and compilation, in that order (from outside)."""
    tr = stage.cfg.train
    blocks = stage.blocks()
    for flag in ("activation_checkpointing", "compile"):
        if getattr(tr, flag) and not blocks:
            raise ValueError(f"train.{flag}: the {stage.name} stage has no repeated blocks to apply it to")
    if tr.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if stage.world > 1:
        stage.parallelize()
    if tr.compile:
        for block in blocks:
            block.compile()


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


def run(cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """Train the stage `cfg` describes; write OUT/final and OUT/summary.json; return the summary."""
    stage = stage_for(cfg)
    stage.check_common()  # before any weights or data are read
    stage.check()
    tr = cfg.train
    device = setup_run(tr)
    stage.rank, stage.world = dist_utils.rank(), dist_utils.world_size()
    stage.resume = resume
    out = Path(cfg.out)
    stage.build(device)
    fp_start = fingerprints(stage)
    record = {
        "stage": stage.name,
        "yaml": config_to_yaml(cfg),
        **{f"{k}_fingerprint": v for k, v in fp_start.items()},
        **stage.record(),
    }
    if resume:
        check_resume(out, record, fp_start)
    prepare(stage)
    stage.open_data(stage.rank, stage.world)
    trainer = Trainer(
        stage,
        tr,
        cfg.optim,
        out,
        anneal_steps=stage.anneal_steps,
        polyak_k=stage.polyak_k,
        config_record=record,
    )
    if stage.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    summary = trainer.fit(resume=resume)
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
