"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP): every process writes its own shards, and
loading reshards (saved by 4 processes, resumed by 2 or 1).

A checkpoint folder `step_NNNNNNNN/` holds:

    dcp/          DCP files: `model.<name>` (the tensors `Stage.checkpoint_state` names: the trained parts'
                  parameters and persistent buffers, as this process holds them: FSDP2 shards or replicas) and
                  `optimizer.*` (the optimizer state, sharded the same way; frozen parameters have none)
    rng.safetensors   CPU and current-device generator states (restored on any device count)
    trainer.json      step, tokens seen, data position (world-size independent), config record

Nothing is gathered: no process ever holds the whole model, and frozen parts (the LM of an adapter stage) are
neither gathered nor written. The folder is written under a temporary name and renamed when complete, so a crash
leaves only whole checkpoints. Untrusted folders: DCP reads its `.metadata` with `pickle` and non-tensor items with
`torch.load(weights_only=False)`; here both go through restricted loaders (`SafeReader`, `SafePlanner`) that
refuse anything needing code.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

DCP_DIR = "dcp"
# What a DCP `.metadata` pickle may name (module prefix -> allowed); anything else is refused.
_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.", "torch.distributed._shard.")
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "slice"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"),
}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that needs code to load; it is refused, never run."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        """Only DCP's metadata classes, torch dtypes/layouts/sizes and plain containers."""
        is_torch_const = module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        )
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_GLOBALS or is_torch_const:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"refused: the checkpoint metadata names {module}.{name}, which is not data")


class SafeReader(FileSystemReader):
    """`FileSystemReader` whose `.metadata` is unpickled with an allow-list (no code runs)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, refused when it names anything but DCP's data classes."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _RestrictedUnpickler(f).load()
            except UnsafeCheckpoint as e:
                raise UnsafeCheckpoint(f"{path}: {e}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path}: not a DCP metadata file ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor items with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """Load one non-tensor item (numbers, strings, lists) without running code."""
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(
                f"refused: checkpoint item {read_item.dest_index.fqn} needs code to load "
                f"({str(e).splitlines()[0][:120]})"
            ) from None
        super().load_bytes(read_item, _as_stream(obj))


def _as_stream(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def save_state(state: Mapping[str, Any], path: Path, *, async_save: bool = False) -> Future | None:
    """Write `state` (nested dicts of tensors/DTensors and numbers) as a DCP folder; every process takes part.

    With `async_save` the tensors are staged to CPU memory and written in a background thread; the returned
    future completes when the folder is whole.
    """
    kw = {"checkpoint_id": str(path), "no_dist": _no_dist()}
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process, which it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if async_save:
            return dcp.async_save(dict(state), **kw)
        dcp.save(dict(state), **kw)
    return None


def _load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """dcp.load through the safe reader and planner; a refused item surfaces as `UnsafeCheckpoint`."""
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes one process, which it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, UnsafeCheckpoint):
                raise UnsafeCheckpoint(f"{path}: {exc}") from None
        raise


def load_state(state: dict[str, Any], path: Path) -> None:
    """Load a DCP folder into `state` in place, resharded to however `state`'s tensors are sharded now."""
    _load(state, path, _no_dist())


def read_full(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` of a DCP folder, whole, in this one process (tools, tests, exports)."""
    reader = SafeReader(str(path))
    md = reader.read_metadata()
    out = {
        k[len(prefix) :]: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in md.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if out:
        _load({prefix.rstrip("."): out} if prefix else out, path, no_dist=True)
    return out


__all__ = [
    "DCP_DIR",
    "SafePlanner",
    "SafeReader",
    "UnsafeCheckpoint",
    "load_state",
    "read_full",
    "save_state",
]
