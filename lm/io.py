"""The IO helpers every checkpoint format, the tokenizer and the training checkpoints share.

- Atomic writes: a temporary file in the destination folder, flushed to disk, then renamed over the target, so
  a reader never sees a half-written file and a crash leaves the previous file in place.
- JSON: read with a clear error naming the file; written atomically (indent 2, sorted keys).
- Tensors: safetensors files, or torch files read with `weights_only=True`: a pickle that needs code to load is
  refused, never run.
- A strict state-dict load that names every unexpected, missing or misshapen key.

This module is the bottom layer: it imports nothing from mm.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp)` on a temporary file in the same folder, fsync it, then rename it."""
    path = Path(path)
    # a fresh name, not mkstemp: `write` creates the file, so it gets the usual permissions (umask), not 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (its folder is created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as JSON (indent 2, sorted keys) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON value in `path`; invalid JSON raises `error` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from e


def torch_load(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Any:
    """A torch file read with `weights_only=True`: a file that needs code to load is refused, never run."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # arbitrary objects (code) in the pickle: refused, never run
        raise ValueError(
            f"{path}: refused to load, the file needs code to load (a pickle beyond tensors and numbers; "
            f"weights_only=True rejected it: {str(e).splitlines()[0][:120]}); convert it to .safetensors"
        ) from None


def read_tensors(
    path: str | os.PathLike, *, wrappers: Sequence[str] = (), mmap: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch file (`torch_load`); `wrappers` are keys of a dict that
    holds the tensors (a training checkpoint's "state_dict"), taken in turn when present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch_load(path, mmap=mmap)
    for wrapper in wrappers:
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return sd


def load_checked(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(sd, strict=True)` after naming every unexpected, missing or misshapen key."""
    expected = module.state_dict()
    errors = [f"unexpected key {k!r} (shape {tuple(sd[k].shape)})" for k in sorted(set(sd) - set(expected))]
    errors += [
        f"missing key {k!r} (expected shape {tuple(expected[k].shape)})"
        for k in sorted(set(expected) - set(sd))
    ]
    errors += [
        f"key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if sd[k].shape != expected[k].shape
    ]
    errors += [
        f"key {k!r} has dtype {sd[k].dtype}, expected a floating dtype like {expected[k].dtype}"
        for k in sorted(set(sd) & set(expected))
        if expected[k].is_floating_point() and not sd[k].is_floating_point()
    ]
    if errors:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(errors))
    module.load_state_dict(sd, strict=True)


__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "load_checked",
    "read_json",
    "read_tensors",
    "torch_load",
    "write_json",
]
