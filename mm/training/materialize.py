"""Start on the meta device, shard, then materialise: a stage's model is built without memory, sharded by FSDP2
while still on the meta device, and only then given values, each process allocating and filling only its part.

Building (`record_init`): the stage's `build` runs under `torch.device("meta")` with a `TorchDispatchMode`
that writes down every operation giving a tensor its value: random draws (`normal_`, `uniform_`, ...), fills,
copies of tensors loaded from files (a bundle's adapter weights), arithmetic on buffers (RoPE frequencies).
Nothing is allocated and no random number is drawn.

Materialising (`materialize`, after `fully_shard`): each meta parameter and buffer is replaced by an empty tensor
of this process's shape on the real device (its shard under FSDP2), then the record is replayed on that device
in its original order, one tensor at a time. The random draws consume the generator exactly as the original
constructor did, so every tensor's full value is bit for bit the value a plain build under the same seed gives,
and the generator ends in the same state: the weights do not depend on the number of processes (the
multi-process runs equal one process) and a one-process run equals the eager build it replaces. Each full value
lives only while its operation runs (a draw later overwritten by the model's own `init_weights` is drawn, to
keep the generator in step, and dropped at once); a process copies its shard of each final value and frees it,
so the transient peak is one full tensor, not the model.

Tensors whose values live in files (`mm.formats.hf_llama.load_hf(..., device="meta")`: the frozen LM) carry a
`lazy_source` with `read(start, stop)`; each process reads only its rows of them (safetensors `get_slice`).

Limits: build code must not read values (`.item()`, `float(t)`, `.tolist()` fail on the meta device: move such
steps after materialisation), must not draw from the global generator with real tensors while recording
(refused: the draws would come out of order), and a meta tensor read by the record must be recorded or have a
`lazy_source`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mm.training.init_record import InitRecord


class _Recorder(TorchDispatchMode):
    """Records operations on meta tensors into an `InitRecord`; real operations run as usual."""

    def __init__(self, record: InitRecord) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        on_meta = any(isinstance(x, torch.Tensor) and x.is_meta for x in leaves) or any(
            isinstance(x, torch.device) and x.type == "meta" for x in leaves
        )
        out = func(*args, **kwargs)
        if on_meta:
            self.record.add(func, args, kwargs, out)
        elif torch.Tag.nondeterministic_seeded in func.tags and kwargs.get("generator") is None:
            raise RuntimeError(
                f"{func} drew from the global random generator on a real tensor while the model was being "
                "built on the meta device: its draws would come out of order (build it on the meta device)"
            )
        return out


class _ConstantsOnCPU(TorchFunctionMode):
    """`torch.tensor(data)` on the meta device would drop `data` before any dispatched operation sees it: build
    it on the CPU and move it to the meta device, an operation the record keeps (with the constant)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if func in (torch.tensor, torch.scalar_tensor) and (
            device is None or torch.device(device).type == "meta"
        ):
            grad = kwargs.pop("requires_grad", False)
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).to("meta").requires_grad_(grad)
        return func(*args, **kwargs)


@contextmanager
def record_init() -> Iterator[InitRecord]:
    """Build under this: on the meta device, every operation giving a tensor its value recorded."""
    rec = InitRecord()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        with torch.device("meta"), _ConstantsOnCPU(), _Recorder(rec):
            yield rec


# ---- materialising a (sharded) meta model ------------------------------------------------------------------
def _allocate(model: nn.Module, device: torch.device) -> None:
    """Replace every meta parameter and buffer by an empty tensor of the same (local) shape on `device`;
    tied parameters stay tied."""
    new: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(
                        torch.empty_like(p, device=device), requires_grad=p.requires_grad
                    )
                module._parameters[name] = new[id(p)]
            for name, b in list(module._buffers.items()):
                if b is None or not b.is_meta:
                    continue
                if id(b) not in new:
                    new[id(b)] = torch.empty_like(b, device=device)
                module._buffers[name] = new[id(b)]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, attr)


def local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset) of this process's part of `t` in the full tensor (all of it unless a DTensor)."""
    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(shape), tuple(offset)
    return tuple(t.shape), (0,) * t.dim()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _fill(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's part of the full value `full` into `target` (a DTensor shard or a whole tensor)."""
    shape, offset = local_box(target)
    part = full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
    _local(target).copy_(part)


def materialize(model: nn.Module, record: InitRecord, device: torch.device) -> None:
    """Give a meta-built (possibly FSDP2-sharded) model its values on `device`: this process's part of each
    tensor, from the replayed record or read from the tensor's lazy source (module docstring)."""
    if not record.bound:
        raise ValueError("bind the record to the model (InitRecord.bind) before sharding it")
    _allocate(model, device)
    by_key = record.finals

    def sink(key: int, st: torch.UntypedStorage) -> None:
        for name, r in by_key[key]:
            full = torch.empty(0, dtype=r.dtype, device=device).set_(st, r.offset, r.size, r.stride)
            _fill(_tensor(model, name), full)

    record.replay(device, sink)
    with torch.no_grad():
        for name, src in record.sources.items():
            target = _tensor(model, name)
            shape, offset = local_box(target)
            if shape and shape[0] == 0:
                continue
            rows = src.read(offset[0], offset[0] + shape[0]) if shape else src.read()
            rest = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
            _local(target).copy_(rows[(slice(None), *rest)] if rest else rows)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds (its shards under FSDP2), whether materialised or not."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


__all__ = ["local_box", "local_param_bytes", "materialize", "record_init"]
