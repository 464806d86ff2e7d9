"""How a stage's model is parallelised, applied from outside the model code in torchtitan's order: activation
checkpointing of each block, then `compile` of each block, then FSDP2 `fully_shard` of each unit and the root
(`parallelize_model`, applying the `ParallelPlan` a stage declares in `Stage.parallel_plan`; `mm plan` reads
the same plan). The runner passes the device mesh and the mixed-precision policy.

Numerics: on CUDA with bf16 compute (`train.autocast` auto or bf16) FSDP2 gathers parameters in bf16 and
reduce-scatters gradients in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, torchtitan's
default) and a frozen LM whose weights are stored in bf16 stays in bf16; on the CPU every parameter stays in
float32 and no policy applies, so CPU runs compute exactly what they did before sharding existed.

Gradient accumulation under FSDP2 reduce-scatters every micro-step (torchtitan): each process accumulates into
its gradient shard. Skipping the reduce-scatter until the last micro-step (`set_requires_gradient_sync(False)`)
saves communication but keeps the unsharded gradients of every trainable parameter between micro-steps, a full
fp32 copy of the trainable model per process: what FSDP is there to avoid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm.training import distributed as dist_utils
from mm.training.config import TrainConfig
from mm.training.services import compute_dtype


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (applied from outside the model code)."""
    for block in blocks:
        fwd = block.forward
        block.forward = functools.partial(checkpoint, fwd, use_reentrant=False)  # type: ignore[method-assign]


def apply_compile(blocks: list[nn.Module], backend: str = "inductor") -> None:
    """`torch.compile` each block's forward (compiled on its first call), activation checkpointing included when
    it was applied first, as torchtitan compiles its checkpoint-wrapped blocks. The block's `forward` is
    compiled, not the module (`nn.Module.compile`): with checkpointing applied as an instance `forward`, the
    module's compiled call traced nothing and the block ran eagerly."""
    from mm.lm.decode import quiet_compile_logs

    quiet_compile_logs()  # no "No CUDA runtime is found" on a CPU machine
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)  # type: ignore[method-assign]


def apply_compile_loss(model: nn.Module, backend: str = "inductor") -> None:
    """`torch.compile` the LM's `head_loss` (final norm, output projection and cross-entropy in one graph, the
    float32 logits never a tensor of their own) on `model` or its `lm`; nothing when neither has one. Measured
    on `mm bench`'s bf16 training step (AMD EPYC, 2 threads): 1.524 -> 1.460 s with the blocks compiled."""
    lm = model if hasattr(model, "head_loss") else getattr(model, "lm", None)
    if lm is not None and hasattr(lm, "head_loss"):
        lm.head_loss = torch.compile(lm.head_loss, backend=backend)  # type: ignore[method-assign]


def mixed_precision(train: TrainConfig, device: torch.device) -> Any:
    """FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` for bf16 compute on CUDA, else None."""
    if device.type != "cuda" or compute_dtype(train.autocast, device) != torch.bfloat16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def frozen_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype a frozen LM may be kept in: bf16 for bf16 compute on CUDA, else float32 (a stage keeps an LM
    in bf16 only when its weights are stored in bf16, so nothing is rounded)."""
    return torch.bfloat16 if mixed_precision(train, device) is not None else torch.float32


def frozen_lm_dtype(path: str | Path, frozen: torch.dtype) -> torch.dtype:
    """The dtype a frozen HF LM directory is loaded in: `frozen` (`frozen_dtype`) when its weights are stored
    in that dtype, so nothing is rounded (and its fingerprint is its float32 load's); else float32."""
    if frozen == torch.float32:
        return frozen
    from mm.formats.hf_llama import stored_dtype

    return frozen if stored_dtype(path) == frozen else torch.float32


@dataclass(frozen=True)
class ParallelPlan:
    """How a stage's model is parallelised, declared by `Stage.parallel_plan` and read by both the runner and
    `mm plan`: `blocks` get activation checkpointing and `compile` (as `train` asks); under several processes
    FSDP2 shards each of `fsdp_units` (in forward order, the last LM layer last) and then `root` (what no unit
    holds), except the parameters of the `replicated` modules; `extra_forward_methods` names methods other than
    `forward` that use a unit's parameters (FSDP gathers around them too). `fsdp_units=None`: the model stays
    replicated and the trainer all-reduces its gradients."""

    root: nn.Module
    blocks: list[nn.Module] = field(default_factory=list)
    fsdp_units: list[nn.Module] | None = None
    replicated: list[nn.Module] = field(default_factory=list)
    extra_forward_methods: dict[str, list[nn.Module]] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards the model (several processes)."""
        return self.fsdp_units is not None

    def whole_parameters(self, params: list[nn.Parameter]) -> set[int]:
        """The ids of those of `params` that FSDP2 leaves whole (unsharded) under several processes: those of
        the `replicated` modules and those outside `root`; all of them when nothing is sharded. The same set in
        one process as in several (the trainer's AdamW groups keep them apart: `param_groups`)."""
        if not self.sharded:
            return {id(p) for p in params}
        in_root = {id(p) for p in self.root.parameters()}
        kept = {id(p) for m in self.replicated for p in m.parameters()}
        return {id(p) for p in params if id(p) in kept or id(p) not in in_root}


def parallelize_model(
    plan: ParallelPlan, train: TrainConfig, mesh: Any = None, mp_policy: Any = None
) -> None:
    """Activation checkpointing and `compile` on the plan's blocks and the LM's loss (as `train` asks), then FSDP2 on its units
    and root over `mesh` with `mp_policy` (`dist_utils.apply_fsdp`; `mesh` None: one process, nothing sharded)."""
    if train.activation_checkpointing:
        apply_activation_checkpointing(plan.blocks)
    if train.compile:
        apply_compile(plan.blocks)
        apply_compile_loss(plan.root)
    if plan.fsdp_units is None or mesh is None:
        return
    dist_utils.apply_fsdp(
        plan.root,
        plan.fsdp_units,
        mesh=mesh,
        mp_policy=mp_policy,
        extra_forward_methods=plan.extra_forward_methods,
        ignored=plan.replicated,
    )


__all__ = [
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_compile_loss",
    "frozen_dtype",
    "frozen_lm_dtype",
    "mixed_precision",
    "ParallelPlan",
    "parallelize_model",
]
