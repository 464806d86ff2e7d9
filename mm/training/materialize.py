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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

# Operations that give their target a value without reading the old one (when they cover the whole storage).
_OVERWRITE = {
    "normal_",
    "uniform_",
    "random_",
    "bernoulli_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
    "fill_",
    "zero_",
    "copy_",
}
# Allocations: their value is garbage, so they are only executed when something reads that garbage.
_ALLOC = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class _MetaDevice:
    """Stands for the meta device in a recorded operation (replayed on the real device)."""


_DEVICE = _MetaDevice()


@dataclass(frozen=True)
class _Ref:
    """A recorded tensor argument: a view (size, stride, offset, dtype) of storage `key`."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass
class _Entry:
    """One recorded operation."""

    func: Any
    leaves: list[Any]
    spec: Any
    outs: list[tuple[int, int]]  # (index among the flattened outputs, new storage key)
    writes: list[int]
    kills: set[int]  # written keys whose old value is not read
    reads: set[int]
    rng: bool
    alloc: bool


@dataclass
class _Event:
    entry: int
    needs: bool  # reads the old value
    write: bool


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _ref(t: torch.Tensor) -> _Ref:
    return _Ref(_key(t), tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)


def _covers_storage(t: torch.Tensor) -> bool:
    """Whether `t` is a dense, contiguous view of its whole storage."""
    return (
        t.storage_offset() == 0
        and t.is_contiguous()
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an operation writes (schema arguments marked `(a!)`)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if not (arg.alias_info is not None and arg.alias_info.is_write):
            continue
        v = args[i] if i < len(args) else kwargs.get(arg.name)
        vals = v if isinstance(v, list | tuple) else [v]
        out.extend(x for x in vals if isinstance(x, torch.Tensor))
    return out


class InitRecord:
    """The operations that gave a meta-built model its values, replayable on a real device (`materialize`)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.nbytes: dict[int, int] = {}  # storage key -> bytes, for storages the record gives their values
        self._alive: list[torch.Tensor] = []  # keeps meta storages (their keys) unique while recording
        self.finals: dict[int, list[tuple[str, _Ref]]] = {}  # storage key -> (name, view) in the model
        self.sources: dict[str, Any] = {}  # name -> lazy_source (values read from files)
        self.external: dict[int, Any] = {}  # storage key of a lazily loaded tensor the record reads -> source
        self.bound = False

    # ---- recording --------------------------------------------------------------------------------------
    def add(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Write down one operation on meta tensors."""
        name = func._opname
        written = [t for t in _written(func, args, kwargs) if t.is_meta]
        written_keys = [_key(t) for t in written]
        kills = {
            _key(t)
            for t in written
            if name in _OVERWRITE and _covers_storage(t) and not self._reads_self(t, args)
        }
        leaves, spec = tree_flatten((args, kwargs))
        reads: set[int] = set()
        rec_leaves: list[Any] = []
        for x in leaves:
            if isinstance(x, torch.Tensor) and x.is_meta:
                r = _ref(x)
                rec_leaves.append(r)
                if r.key not in written_keys:
                    reads.add(r.key)
                self._alive.append(x)
            elif isinstance(x, torch.device) and x.type == "meta":
                rec_leaves.append(_DEVICE)
            else:
                rec_leaves.append(x)
        reads |= {k for k in written_keys if k not in kills}
        outs = []
        out_leaves, _ = tree_flatten(out)
        known = {r.key for r in rec_leaves if isinstance(r, _Ref)}
        for i, t in enumerate(out_leaves):
            if isinstance(t, torch.Tensor) and t.is_meta and _key(t) not in known:
                k = _key(t)
                if k not in self.nbytes:
                    self.nbytes[k] = t.untyped_storage().nbytes()
                    outs.append((i, k))
                self._alive.append(t)
        if not outs and not written_keys:
            return  # a view or a query: later operations record the views they use
        for t in written:  # a tensor made outside the record (a loader's meta model) that it fills whole
            if _key(t) in kills and _key(t) not in self.nbytes:
                self.nbytes[_key(t)] = t.untyped_storage().nbytes()
        self.entries.append(
            _Entry(
                func=func,
                leaves=rec_leaves,
                spec=spec,
                outs=outs,
                writes=written_keys,
                kills=kills,
                reads=reads,
                rng=torch.Tag.nondeterministic_seeded in func.tags,
                alloc=name in _ALLOC,
            )
        )

    @staticmethod
    def _reads_self(t: torch.Tensor, args: tuple) -> bool:
        """copy_ from (a view of) its own storage reads the target."""
        return any(
            isinstance(a, torch.Tensor) and a is not t and a.is_meta and _key(a) == _key(t) for a in args
        )

    def bind(self, model: nn.Module) -> None:
        """Name the model's parameters and buffers in the record (after `build`, before sharding)."""
        tensors = [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        self.finals, self.sources, self.external = {}, {}, {}
        lazy: dict[int, Any] = {}
        for name, t in tensors:
            if not t.is_meta:
                continue
            k = _key(t)
            if k in self.nbytes:
                self.finals.setdefault(k, []).append((name, _ref(t)))
            elif getattr(t, "lazy_source", None) is not None:
                self.sources[name] = lazy[k] = t.lazy_source
            else:
                raise ValueError(
                    f"{name}: a meta tensor with no recorded value and no lazy_source (built outside the record?)"
                )
        for e in self.entries:
            for k in e.writes:
                if k not in self.nbytes:
                    raise ValueError(f"the recorded build writes into a tensor it did not create ({e.func})")
            for k in e.reads:
                if k not in self.nbytes and k not in lazy:
                    raise ValueError(f"the recorded build reads a meta tensor with no value ({e.func})")
                if k in lazy:
                    self.external[k] = lazy[k]
        written = {k for e in self.entries for k in (*e.writes, *(k for _, k in e.outs))}
        for k, names in self.finals.items():
            if k not in written:
                raise ValueError(f"{names[0][0]} is never given a value by the recorded build")
        self._alive = []
        self.bound = True

    # ---- replay -------------------------------------------------------------------------------------------
    def _events(self) -> dict[int, list[_Event]]:
        events: dict[int, list[_Event]] = {}
        for i, e in enumerate(self.entries):
            for _, k in e.outs:
                events.setdefault(k, []).append(_Event(i, needs=False, write=True))
            for k in e.writes:
                events.setdefault(k, []).append(_Event(i, needs=k in e.reads, write=True))
            for k in e.reads - set(e.writes):
                events.setdefault(k, []).append(_Event(i, needs=True, write=False))
        return events

    def replay(self, device: torch.device, sink: Any) -> None:
        """Run the record on `device`, calling `sink(key, storage)` once per named storage with its final value
        (a lazily loaded tensor the record reads is read whole while needed)."""
        events = self._events()
        nxt: dict[tuple[int, int], _Event | None] = {}
        last_write: dict[int, int] = {}
        for k, evs in events.items():
            for a, b in zip(evs, [*evs[1:], None], strict=True):
                nxt[(k, a.entry)] = b
            last_write[k] = max(ev.entry for ev in evs if ev.write)

        def kept(k: int, i: int) -> bool:
            n = nxt.get((k, i))
            return n is not None and n.needs

        def final_now(k: int, i: int) -> bool:
            return k in self.finals and last_write.get(k) == i

        bufs: dict[int, torch.UntypedStorage] = {}

        def storage(k: int) -> torch.UntypedStorage:
            if k in bufs:
                return bufs[k]
            if k in self.external:
                bufs[k] = self.external[k].read().to(device).contiguous().untyped_storage()
                return bufs[k]
            bufs[k] = torch.empty(self.nbytes[k], dtype=torch.uint8, device=device).untyped_storage()
            return bufs[k]

        with torch.no_grad():
            for i, e in enumerate(self.entries):
                touched = [*e.writes, *(k for _, k in e.outs)]
                wanted = any(kept(k, i) or final_now(k, i) for k in touched)
                if e.alloc:
                    for _, k in e.outs:
                        if wanted:
                            storage(k)
                        if final_now(k, i):
                            sink(k, bufs[k])
                    continue
                if wanted or e.rng:
                    # A draw from an explicit generator runs on the generator's device (a CPU generator's
                    # numbers on a GPU run), its results moved to `device`.
                    gen = next((x for x in e.leaves if isinstance(x, torch.Generator)), None)
                    run_on = gen.device if gen is not None and gen.device.type != device.type else device
                    views, leaves = [], []
                    for x in e.leaves:
                        if isinstance(x, _Ref):
                            t = torch.empty(0, dtype=x.dtype, device=device)
                            t = t.set_(storage(x.key), x.offset, x.size, x.stride)
                            views.append((x.key, t, t.to(run_on)))
                            leaves.append(views[-1][2])
                        elif x is _DEVICE:
                            leaves.append(run_on)
                        else:
                            leaves.append(x)
                    args, kwargs = tree_unflatten(leaves, e.spec)
                    out = e.func(*args, **kwargs)
                    if run_on != device:
                        for k, t, moved in views:
                            if k in e.writes:
                                t.copy_(moved)
                    out_leaves, _ = tree_flatten(out)
                    for j, k in e.outs:
                        bufs[k] = out_leaves[j].to(device).untyped_storage()
                for k in touched:
                    if final_now(k, i) and k in bufs:
                        sink(k, bufs[k])
                for k in {*touched, *e.reads}:
                    if not kept(k, i):
                        bufs.pop(k, None)


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


__all__ = ["InitRecord", "local_box", "local_param_bytes", "materialize", "record_init"]
