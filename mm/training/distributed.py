"""Distributed set-up, applied from outside the model code: torchrun process groups (gloo on CPU, nccl on
CUDA), FSDP2 `fully_shard` per block with the run's mixed-precision policy, and full (unsharded) state dicts
for checkpoints, so that a checkpoint written by N processes loads in one. Every helper is a no-op in a single
process.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mm.training import rank_failure


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_group_backend(cuda: bool) -> str:
    """The process group's backends: with CUDA, nccl for GPU tensors and gloo for CPU tensors (asynchronous
    checkpoints stage to CPU memory and coordinate over CPU tensors); without, gloo."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


FORCE_SHARDING_ENV = "MM_FSDP_FORCE"


def sharding_forced() -> bool:
    """`MM_FSDP_FORCE=1`: FSDP2 shards even a one-process run, over a one-process group (`init_distributed`
    makes it): what the GPU check runs to exercise the sharded path, its dtypes and checkpoints on one GPU."""
    return os.environ.get(FORCE_SHARDING_ENV) == "1"


def init_distributed() -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 (`process_group_backend`), or a one-process group
    when sharding is forced (`sharding_forced`); True if joined."""
    if is_distributed():
        return True
    forced = sharding_forced()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not forced:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    if "MASTER_ADDR" in os.environ or not forced:
        dist.init_process_group(backend=process_group_backend(cuda))
        rank_failure.start_watch(dist.get_rank())  # a failing process ends the group (`rank_failure`)
    else:  # one process outside torchrun: an in-memory store (no peer to watch)
        dist.init_process_group(
            backend=process_group_backend(cuda), store=dist.HashStore(), rank=0, world_size=1
        )
    return True


def shards() -> bool:
    """Whether FSDP2 shards here: several processes, or a one-process group with sharding forced."""
    return world_size() > 1 or (sharding_forced() and is_distributed())


def shutdown() -> None:
    """Leave the process group."""
    rank_failure.stop_watch()
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (returns a new tensor)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every process's (picklable, small) object, in rank order; [obj] in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (a replicated model starts identical); sharded
    (DTensor) parameters are left alone."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if not hasattr(t, "device_mesh"):
                dist.broadcast(t.data, src=0)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of a replicated model over processes (one flat all-reduce per dtype); a
    parameter without a gradient on some process counts as a zero gradient there (one without a gradient on
    every process keeps none, as in one process: the optimizer skips it)."""
    if not is_distributed():
        return
    world = world_size()
    device = params[0].device if params else torch.device("cpu")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p, h in zip(params, has.tolist(), strict=True):
        if not h:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def is_fsdp(model: nn.Module) -> bool:
    """Whether FSDP2 has been applied to the model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def device_mesh(device_type: str) -> Any:
    """A one-dimensional device mesh over every process (FSDP2 shards over it); None in one process (unless
    sharding is forced, `shards`)."""
    if not shards():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size(),))


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    *,
    mesh: Any,
    mp_policy: Any = None,
    extra_forward_methods: dict[str, list[nn.Module]] | None = None,
    ignored: list[nn.Module] | None = None,
) -> nn.Module:
    """Shard each block with FSDP2 `fully_shard`, then the root (what no block holds: embeddings, norm,
    output); a no-op in one process. Works on a meta-device model (`mm.training.materialize` fills it after).

    As torchtitan: every block frees its gathered parameters after its forward except the last one (its
    backward comes first, FSDP would gather it straight back), so list the blocks in forward order, the last
    LM layer last; the root keeps its parameters gathered between forward and backward (FSDP2's root rule).
    `extra_forward_methods` names methods other than `forward` that use a block's parameters (e.g. the
    cross-attention blocks' `media_kv`), so FSDP gathers the parameters around them too. The parameters of
    the `ignored` modules stay whole on every process (replicated: the trainer all-reduces their gradients), e.g.
    a part called outside the model's forward or one with a scalar parameter. `mesh` is the processes' device
    mesh (`device_mesh`), `mp_policy` the mixed-precision policy (None: parameters keep their own dtype).
    """
    if not shards():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kw)
    skip = {p for m in ignored or [] for p in m.parameters()}
    fully_shard(model, ignored_params=skip or None, **kw)
    for method, modules in (extra_forward_methods or {}).items():
        for m in modules:
            register_fsdp_forward_method(m, method)
    return model


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients only when `sync` (FSDP2). The trainer does not use it: skipping the reduce-scatter keeps
    every micro-step's unsharded gradients until the last, as much memory as the trainable parameters in fp32
    per process; the trainer reduce-scatters every micro-step into sharded gradients instead (torchtitan)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (0 = measure only); works on sharded (DTensor) gradients, and on a mix of
    sharded and replicated ones (the two norms combined: one foreach kernel cannot take both)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [p for p in grads if hasattr(p.grad, "device_mesh")]
    plain = [p for p in grads if not hasattr(p.grad, "device_mesh")]
    if not sharded or not plain:
        limit = max_norm if max_norm > 0 else float("inf")
        return _full_float(torch.nn.utils.clip_grad_norm_(grads, limit, foreach=True))
    norms = [
        _full_float(torch.nn.utils.get_total_norm([p.grad for p in ps], foreach=True))
        for ps in (sharded, plain)
    ]
    total = math.sqrt(sum(n * n for n in norms))
    coef = max_norm / (total + 1e-6)  # as `clip_grad_norm_`
    if max_norm > 0 and coef < 1:
        for ps in (sharded, plain):
            torch._foreach_mul_([p.grad for p in ps], coef)
    return total


def _full_float(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unsharded copies of (possibly FSDP-sharded, DTensor) tensors; a collective under FSDP."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in tensors.items()}


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(stage: Any) -> dict[str, torch.Tensor]:
    """The stage's checkpoint tensors, unsharded (gathered from every process under FSDP)."""
    wanted = stage.checkpoint_state()
    if not is_fsdp(stage.model):
        return {k: v.detach().cpu() for k, v in wanted.items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # With cpu_offload, only rank 0 receives the gathered tensors (the others get an empty dict).
    full = get_model_state_dict(stage.model, options=_options(cpu_offload=True))
    if rank() != 0:
        return {}
    missing = sorted(set(wanted) - set(full))
    if missing:
        raise KeyError(f"gathered state lacks {missing[:5]}")
    return {k: full[k] for k in wanted}


def load_full_state(stage: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Load unsharded checkpoint tensors into the (possibly sharded) model."""
    if not is_fsdp(stage.model):
        stage.load_checkpoint_state(tensors)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(stage.model, tensors, options=_options(strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, unsharded: loadable by any number of processes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Inverse of `full_optimizer_state`."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options())
