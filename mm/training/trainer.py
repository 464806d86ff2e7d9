"""The one training loop of every stage (Llama 3 paper §2 recipe, §6 resumable checkpointing).

A stage is a `mm.training.stage.Stage`: the model, which of its parameters train, what stays frozen, where
batches come from and how the loss is computed. The loop does the rest, identically for every stage: it alone
sets `requires_grad` (on exactly the stage's trainable parameters) and proves that no parameter of a frozen
part reached the optimizer; AdamW over exactly the trainable parameters,
linear warmup -> cosine decay to a floor -> optional linear anneal to 0, gradient accumulation normalised by
the number of loss tokens of the whole optimizer step (not by micro-steps), clipping, autocast, checkpoints
(atomic, last k kept, SIGINT/SIGTERM save before exit), `--resume`, progress bar, `metrics.jsonl`,
TensorBoard and an MFU estimate.

Numerics on CPU: float32 by default (`autocast: auto` means bf16 autocast on CUDA only). bf16 autocast on
CPU is allowed (`autocast: bf16`) but is slower than float32 on CPUs without bf16 matrix units and makes
CPU runs harder to compare with the float32 references, hence not the default.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mm.training import distributed as dist_utils
from mm.training.checkpoint import latest_checkpoint
from mm.training.config import OptimConfig, TrainConfig
from mm.training.freeze import assert_not_in_optimizer
from mm.training.run_checkpoints import RunCheckpoints
from mm.training.services import (
    MetricsWriter,
    autocast_context,
    compute_dtype,
    lr_at,
    mfu_denominator,
    param_groups,
    resolve_device,
    set_seed,
    setup_run,
)
from mm.training.stage import Stage


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Trainer(RunCheckpoints):
    """Runs a `Stage` for `train.max_steps` optimizer steps, with checkpoints in `out/checkpoints`.

    Under torchrun each process runs the stage on its own rows of every global batch; the gradients are
    averaged over processes (by FSDP2 when the stage sharded its model, else by an all-reduce here)."""

    def __init__(
        self,
        stage: Stage,
        train: TrainConfig,
        optim: OptimConfig,
        out: str | Path,
        *,
        anneal_steps: int = 0,
        polyak_k: int = 0,
        config_record: dict[str, Any] | None = None,
        before_step: Callable[[int], None] | None = None,
    ) -> None:
        self.stage, self.train, self.optim = stage, train, optim
        self.before_step = before_step  # called with the step number before every optimizer step
        self.out = Path(out)
        self.ckpt_root = self.out / "checkpoints"
        self.anneal_steps, self.polyak_k = anneal_steps, polyak_k
        self.config_record = config_record or {}
        self.device = next(stage.model.parameters()).device
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.step, self.tokens_seen = 0, 0
        self._t_start: float | None = None  # when this run's loop started
        self._elapsed_before = 0.0  # training seconds of the runs this one resumed
        self._phase = {"forward": 0.0, "backward": 0.0}  # seconds of the last step's forwards and backwards
        self._stop_signal: int | None = None
        self._stop_seen = False  # some process had a stop signal at the last step's reduction
        if polyak_k > 0 and train.keep_last and train.keep_last < 1:
            raise ValueError("train.keep_last must be >= 1")
        self.params = stage.trainable()
        if not self.params:
            raise ValueError(f"stage {stage.name!r} has no trainable parameters")
        trainable_ids = {id(p) for _, p in self.params}
        for p in stage.model.parameters():  # the optimizer sees only what the stage trains
            p.requires_grad_(id(p) in trainable_ids)
        # What FSDP2 does not shard (a replicated model, or the replicated parts of a partly sharded one) starts
        # from rank 0's values and has its gradients all-reduced here; FSDP2 reduces the sharded ones.
        self.replicated = (
            [p for _, p in self.params if not hasattr(p, "device_mesh")] if self.world > 1 else []
        )
        if self.replicated:
            dist_utils.broadcast_module(stage.model)
        # AdamW's fused kernel (one pass over each parameter) on CUDA, and on CPU in one process (plain float32
        # tensors; FSDP2's DTensors keep the foreach path): measured on the image-pretrain step, 10.9 -> 6.5 ms.
        fused = self.device.type == "cuda" or (
            self.world == 1
            and all(p.dtype == torch.float32 and not hasattr(p, "device_mesh") for _, p in self.params)
        )
        # Parameters FSDP2 leaves whole get AdamW groups of their own (in any number of processes, so that a
        # checkpoint's groups are the same whichever number wrote it): a group never mixes them with DTensors.
        whole = stage.parallel_plan().whole_parameters([p for _, p in self.params])
        self.optimizer = torch.optim.AdamW(
            param_groups(self.params, optim, apart=whole),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            fused=fused or None,
            foreach=None if fused else True,
        )
        for name, part in stage.frozen().items():  # the proof: no frozen parameter is in the optimizer
            if isinstance(part, nn.Module):
                assert_not_in_optimizer(part, self.optimizer, what=name)

    # ---- signals ------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        print(f"\nmm: got signal {signum}; saving a checkpoint after this step", file=sys.stderr, flush=True)

    # ---- the loop -----------------------------------------------------------------------------------
    def _micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """This process's rows, split into micro-batches (still in host memory: `_on_device` moves each one
        when its turn comes, so at most two are on the device at once)."""
        per = next(iter(batch.values())).shape[0]
        mb = self.train.micro_batch_size or per
        return [{k: v[s : s + mb] for k, v in batch.items()} for s in range(0, per, mb)]

    def _on_device(self, micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One micro-batch moved to the device (asynchronously from pinned memory)."""
        return {k: v.to(self.device, non_blocking=True) for k, v in micro.items()}

    def local_rows(self, global_batch: int) -> int:
        """This process's rows of a global batch."""
        if global_batch % self.world != 0:
            raise ValueError(
                f"train.batch_size={global_batch} is not divisible by the {self.world} processes; use a "
                f"multiple of {self.world}"
            )
        return global_batch // self.world

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `max_steps`; returns a summary (final loss, steps, time, stop reason)."""
        tr = self.train
        if resume:
            self.resume()
        metrics = MetricsWriter(self.out, self.step, enabled=self.rank == 0)
        self.start_loop()
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        bar = tqdm(
            total=tr.max_steps,
            initial=self.step,
            desc=self.stage.name,
            file=sys.stderr,
            disable=self.rank != 0,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        summary: dict[str, Any] = {"stopped": "max_steps"}
        last_loss = float("nan")
        t_start = self._t_start = time.perf_counter()
        try:
            while self.step < tr.max_steps:
                if self.before_step is not None:
                    self.before_step(self.step)
                rec = self.train_step()
                rec["elapsed_s"] = (
                    self.elapsed()
                )  # the stage's seconds so far (evaluations and saves included)
                last_loss = rec["loss"]
                if tr.eval_every and self.step % tr.eval_every == 0 and self.step < tr.max_steps:
                    rec.update({f"eval/{k}": v for k, v in self.stage.evaluate().items()})
                if self.step % max(1, tr.log_every) == 0 or self.step == tr.max_steps:
                    metrics.write(rec)
                tps = rec["tokens_per_s"]
                bar.set_postfix(
                    loss=f"{last_loss:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tps:,.0f}", refresh=False
                )
                bar.update(1)
                stop = self._stop_seen  # any process signalled (reduced with the step's loss: no extra sync)
                if self._save_due() or stop:
                    self.save()
                if stop:
                    summary["stopped"] = f"signal {self._stop_signal}"
                    break
        finally:
            self.wait_for_save()
            bar.close()
            metrics.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        summary.update(
            step=self.step,
            tokens_seen=self.tokens_seen,
            final_loss=last_loss,
            wall_time_s=time.perf_counter() - t_start,
            elapsed_s=self.elapsed(),  # resumed runs included
            optimizer={
                "fused": bool(self.optimizer.defaults.get("fused")),
                "sharded_params": sum(hasattr(p, "device_mesh") for _, p in self.params),
                "params": len(self.params),
            },
        )
        return summary

    def _save_due(self) -> bool:
        tr = self.train
        every = tr.save_every and self.step % tr.save_every == 0
        return bool(every or self.step == tr.max_steps or self.step in self.polyak_steps())

    def start_loop(self) -> None:
        """What `train_step` needs before the first step: the autocast context and the MFU denominator."""
        tr = self.train
        self._autocast = autocast_context(tr.autocast, self.device)
        self._peak = tr.peak_flops or mfu_denominator(self.device, compute_dtype(tr.autocast, self.device))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over this process's rows of the next global batch; its metrics record, with the
        seconds of its phases (`data_s`, `forward_s`, `backward_s`, `optimizer_s`: `mm profile` reads them)."""
        t0 = time.perf_counter()
        self.stage.on_step(self.step, self.tokens_seen)
        bsz, seq = self.stage.batch_shape(self.step, self.tokens_seen)
        batch = self.stage.next_batch(self.local_rows(bsz), seq)
        micro = self._micro_batches(batch)
        t_data = time.perf_counter()
        loss = self._accumulate(micro)
        t_opt = time.perf_counter()
        grad_norm = dist_utils.clip_grad_norm([p for _, p in self.params], self.optim.grad_clip)
        lr = lr_at(self.step, self.optim, self.train.max_steps, self.anneal_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        optimizer_s = time.perf_counter() - t_opt
        local = float(self.stage.batch_tokens(batch, self.local_rows(bsz), seq))
        step_tokens = int(dist_utils.all_reduce_sum(torch.tensor(local)))  # a CPU tensor: no device sync
        self.tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        rec = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": step_tokens / dt,
            "tokens_seen": self.tokens_seen,
            "grad_norm": grad_norm,
            "batch_size": bsz,
            "seq_len": seq,
            "step_time_s": dt,
            "data_s": t_data - t0,
            "forward_s": self._phase["forward"],
            "backward_s": self._phase["backward"],
            "optimizer_s": optimizer_s,  # clipping and AdamW
        }
        fpt = self.stage.flops_per_token(seq)
        if fpt:
            rec["mfu"] = fpt * rec["tokens_per_s"] / (self._peak * self.world)
        return rec

    def _accumulate(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """Forward and backward over the micro-batches: the gradients of the whole global batch, averaged
        over processes; returns the step's loss (the sum over every process / all loss tokens)."""
        # Counted on the host and reduced as a CPU tensor (gloo beside nccl): no device sync.
        n_tok = float(
            dist_utils.all_reduce_sum(
                torch.tensor(float(sum(self.stage.count_loss_tokens(m) for m in micro)))
            )
        )
        if n_tok == 0:
            raise ValueError(f"step {self.step + 1}: the batch has no loss tokens")
        loss_sum = torch.zeros((), device=self.device)
        self.stage.model.train()
        self._phase = {"forward": 0.0, "backward": 0.0}  # seconds of this step's forwards and backwards
        # Under FSDP2 every micro-step reduce-scatters into the gradient shards (mm.training.parallelize).
        ahead = self._on_device(micro[0])
        for i in range(len(micro)):
            mb, t0 = ahead, time.perf_counter()
            with self._autocast:
                ls, _ = self.stage.loss(mb)
            t1 = time.perf_counter()
            if i + 1 < len(micro):  # the next one's copy overlaps this backward
                ahead = self._on_device(micro[i + 1])
            del mb
            # Gradients are averaged over processes, so scale by world size: sum / all loss tokens.
            (ls * self.world / n_tok).backward()
            loss_sum += ls.detach().float()
            self._phase["forward"] += t1 - t0
            self._phase["backward"] += time.perf_counter() - t1
        if self.replicated:  # FSDP2 reduces its own gradients
            dist_utils.average_gradients(self.replicated)
        # One reduction (and one host sync) per step: the loss sum and whether any process was signalled to stop.
        stop = torch.tensor(float(self._stop_signal is not None), device=self.device)
        total, stopped = dist_utils.all_reduce_sum(torch.stack([loss_sum, stop])).tolist()
        self._stop_seen = stopped > 0
        loss = total / n_tok
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {loss} at step {self.step + 1}; stopping. The last good checkpoint is "
                f"{latest_checkpoint(self.ckpt_root) or 'none (no checkpoint was saved yet)'}"
            )
        return loss


__all__ = [
    "Trainer",
    "TrainingDiverged",
    "autocast_context",
    "lr_at",
    "param_groups",
    "resolve_device",
    "set_seed",
    "setup_run",
]
