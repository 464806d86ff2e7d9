"""A training run's checkpoints: what one holds, saving it (asynchronously if asked), resuming resharded, and
the run's training seconds they carry over.

`Trainer` takes these methods from `RunCheckpoints`; they read the trainer's stage, optimizer, step counters
and `out/checkpoints` folder. The Polyak steps (evenly spaced in the anneal) are protected from rotation and
averaged into the final model by the stage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mm.training import distributed as dist_utils
from mm.training.checkpoint import (
    PendingSave,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_tensors,
    restore_rng,
    save_checkpoint,
)
from mm.training.config import TrainConfig
from mm.training.dcp import DCP_DIR, load_state
from mm.training.stage import Stage

log = logging.getLogger("mm.training.trainer")

__all__ = ["RunCheckpoints"]


class RunCheckpoints:
    """Checkpoint methods of `Trainer` (saving, resuming, the Polyak steps) over the attributes it sets."""

    stage: Stage
    train: TrainConfig
    optimizer: torch.optim.Optimizer
    ckpt_root: Path
    step: int
    tokens_seen: int
    world: int
    anneal_steps: int
    polyak_k: int
    config_record: dict[str, Any]
    _t_start: float | None  # when this run's loop started
    _elapsed_before: float  # training seconds of the runs this one resumed

    def elapsed(self) -> float:
        """Seconds of training so far: this run's (steps, evaluations, checkpoints) plus those of the runs it
        resumed."""
        now = time.perf_counter() - self._t_start if self._t_start is not None else 0.0
        return self._elapsed_before + now

    def polyak_steps(self) -> set[int]:
        """Steps whose checkpoints make up the final Polyak average (evenly spaced in the anneal)."""
        if self.polyak_k <= 0:
            return set()
        span = self.anneal_steps if self.anneal_steps > 0 else self.train.max_steps
        start = self.train.max_steps - span
        return {start + round(span * (i + 1) / self.polyak_k) for i in range(self.polyak_k)}

    def sharded_state(self) -> dict[str, Any]:
        """What a checkpoint holds, as this process holds it (FSDP2 shards or replicas; nothing gathered):
        the trained parts' tensors and the optimizer state. Frozen parts are not in it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim = get_optimizer_state_dict(
            self.stage.model, self.optimizer, options=StateDictOptions(full_state_dict=False)
        )
        return {"model": self.stage.checkpoint_state(), "optimizer": optim}

    def save(self) -> Path | None:
        """Checkpoint the current step: every process writes its own shards (torch.distributed.checkpoint)."""
        self.wait_for_save()
        saved = save_checkpoint(
            self.ckpt_root,
            self.step,
            state=self.sharded_state(),
            trainer_state={
                "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed(),
                "data": self.stage.data_state(),
                "stage": self.stage.name,
                "config": self.config_record,
                "world_size": self.world,
            },
            keep_last=self.train.keep_last,
            protect=self.polyak_steps(),
            async_save=self.train.async_checkpoint,
        )
        if isinstance(saved, PendingSave):
            self._pending = saved
            return None
        return saved

    def wait_for_save(self) -> Path | None:
        """Finish an asynchronous checkpoint still being written (before the next one, and before exiting)."""
        pending, self._pending = getattr(self, "_pending", None), None
        return pending.wait() if pending is not None else None

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in `out/checkpoints`, resharded to this run's
        processes (it may have been written by any number); False if there is none."""
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            return False
        if (path / DCP_DIR).is_dir():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state = self.sharded_state()
            load_state(state, path / DCP_DIR)  # the model's tensors are loaded in place
            set_optimizer_state_dict(
                self.stage.model,
                self.optimizer,
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=False),
            )
            trainer = json.loads((path / "trainer.json").read_text())
            rng = load_tensors(path / "rng.safetensors") if (path / "rng.safetensors").is_file() else {}
        else:  # a checkpoint written before sharded checkpoints: whole tensors
            ck = load_checkpoint(path)
            dist_utils.load_full_state(self.stage, ck["model"])
            if ck["optimizer"] is not None:
                dist_utils.load_full_optimizer_state(self.stage.model, self.optimizer, ck["optimizer"])
            trainer, rng = ck["trainer"], ck["rng"]
        self.step = int(trainer["step"])
        self.tokens_seen = int(trainer.get("tokens_seen", 0))
        self._elapsed_before = float(trainer.get("elapsed_s", 0.0))
        self.stage.load_data_state(trainer.get("data", {}))
        restore_rng(rng)
        log.info("resumed from %s (step %d)", path, self.step)
        return True

    def polyak_checkpoints(self) -> list[Path]:
        """The checkpoints to average for the final model (those at `polyak_steps`)."""
        want = self.polyak_steps()
        return [p for p in list_checkpoints(self.ckpt_root) if int(p.name.split("_")[1]) in want]
