"""Checkpoints: weights as safetensors, resumable state beside them, written atomically, last k kept.

A checkpoint is a folder `OUT/checkpoints/step_00000100/` holding `model.safetensors` (the trainable modules'
weights), `optimizer.pt` (plain tensors and numbers: loaded with `torch.load(weights_only=True)`),
`rng.safetensors` and `trainer.json` (step, tokens seen, data position, anything else the stage needs).
It is first written under a temporary name and renamed when complete, so a folder named `step_*` is always
whole: a crash or a full disk during the write leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STEP_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as safetensors; tensors sharing storage (tied weights) are stored once, aliases noted."""
    seen: dict[tuple[int, int, tuple], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    meta = dict(metadata or {})
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    save_file(out, str(path), metadata=meta)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `save_tensors` (aliases restored)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
        meta = f.metadata() or {}
    for alias, src in json.loads(meta.get("aliases", "{}")).items():
        out[alias] = out[src]
    return out


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dir(root: Path, step: int) -> Path:
    """Folder of the checkpoint at `step`."""
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "trainer.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep_last: int = 0,
    protect: set[int] | None = None,
) -> Path:
    """Write one checkpoint atomically; then delete all but the newest `keep_last` (steps in `protect` stay)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_tensors(model_state, tmp / "model.safetensors")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_tensors(rng, tmp / "rng.safetensors")
        write_json({**trainer_state, "step": step}, tmp / "trainer.json")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
            old = root / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        keep = set(protect or ())
        ckpts = list_checkpoints(root)
        for p in ckpts[:-keep_last]:
            if int(p.name[len(STEP_PREFIX) :]) not in keep:
                shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: {'model': tensors, 'optimizer': state or None, 'trainer': dict, 'rng': tensors}."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.json)")
    opt_file = path / "optimizer.pt"
    optimizer = None
    if opt_file.is_file():
        try:
            optimizer = torch.load(opt_file, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:  # objects beyond tensors and numbers: refused, never run
            raise ValueError(
                f"{opt_file}: refused to load, it holds more than tensors and numbers ({str(e).splitlines()[0]})"
            ) from None
    return {
        "model": load_tensors(path / "model.safetensors"),
        "optimizer": optimizer,
        "trainer": json.loads((path / "trainer.json").read_text()),
        "rng": load_tensors(path / "rng.safetensors") if (path / "rng.safetensors").is_file() else {},
    }


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Set the torch RNG states saved by `save_checkpoint`."""
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)


def polyak_average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Mean of the model weights of several checkpoints (the paper's final-model checkpoint average)."""
    if not paths:
        raise ValueError("polyak_average needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    for p in paths:
        sd = load_tensors(Path(p) / "model.safetensors")
        if total and set(sd) != set(total):
            raise ValueError(f"{p}: checkpoint holds different tensors than {paths[0]}")
        for k, v in sd.items():
            total[k] = total[k] + v.double() if k in total else v.double()
    return {
        k: (v / len(paths)).to(load_tensors(Path(paths[0]) / "model.safetensors")[k].dtype)
        for k, v in total.items()
    }
