"""Checkpoints: sharded model and optimizer state through torch.distributed.checkpoint (`mm.training.dcp`),
resumable state beside them, written atomically, last k kept.

A checkpoint is a folder `OUT/checkpoints/step_00000100/` holding `dcp/` (each process's shards of the trained
modules' tensors and of the optimizer state; loading reshards to any number of processes), `rng.safetensors`
and `trainer.json` (step, tokens seen, data position, anything else the stage needs). It is first written under
a temporary name and renamed when complete, so a folder named `step_*` is always whole: a crash or a full disk
during the write leaves the previous checkpoint untouched. Bundles and exports stay single safetensors files
(`save_tensors`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm.lm.io import read_json, torch_load, write_json
from mm.training.dcp import DCP_DIR, load_state, read_full, save_state

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


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, torch.Tensor]:
    """This process's generator states: the CPU's and the current accelerator device's (not every device's)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted({f.parent for f in path.rglob("*")} | {path}):
        _fsync_dir(d)


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """Rename a complete temporary folder to its step name (replacing an older save of the same step)."""
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
        old = root / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)


def prune(root: Path, keep_last: int, protect: set[int] | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints (steps in `protect` stay)."""
    if keep_last <= 0:
        return
    keep = set(protect or ())
    for p in list_checkpoints(root)[:-keep_last]:
        if int(p.name[len(STEP_PREFIX) :]) not in keep:
            shutil.rmtree(p, ignore_errors=True)


class PendingSave:
    """An asynchronous checkpoint being written; `wait()` publishes it once every shard is on disk."""

    def __init__(self, future: Any, tmp: Path, final: Path, root: Path, finish: Any) -> None:
        self.future, self.tmp, self.final, self.root, self.finish = future, tmp, final, root, finish

    def wait(self) -> Path:
        """Block until the background write is done, then publish the folder (rank 0) and prune."""
        self.future.result()
        _barrier()
        if _rank() == 0:
            self.finish()
        _barrier()
        return self.final


def save_checkpoint(
    root: Path,
    step: int,
    *,
    state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 0,
    protect: set[int] | None = None,
    async_save: bool = False,
) -> Path | PendingSave:
    """Write one checkpoint (every process calls it: each writes its shards of `state` with DCP); the folder
    appears under its step name only when whole. Then all but the newest `keep_last` are deleted.

    `state` is {"model": tensors, "optimizer": state dict} as this process holds them (FSDP2 shards or
    replicas); nothing is gathered. With `async_save` the shards are written in the background and a
    `PendingSave` is returned: call its `wait()` before the next save and before exiting.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"  # the same name in every process: they write into one folder
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    rng = rng_state()
    trainer_state = copy.deepcopy(trainer_state)  # as at this step, even if published later (async)

    def finish() -> None:
        save_tensors(rng, tmp / "rng.safetensors")
        write_json({**trainer_state, "step": step}, tmp / "trainer.json")
        _publish(tmp, final, root)
        prune(root, keep_last, protect)

    try:
        future = save_state(state, tmp / DCP_DIR, async_save=async_save)
        if future is not None:
            return PendingSave(future, tmp, final, root, finish)
        _barrier()
        if _rank() == 0:
            finish()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder whole, in one process (tools and tests; training resumes with `load_state`):
    {'model': tensors, 'optimizer': {'state': {parameter: {slot: tensor}}} or None, 'trainer': dict,
    'rng': tensors}.

    Folders written before DCP (`model.safetensors` + `optimizer.pt`) are read too.
    """
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.json)")
    rng = load_tensors(path / "rng.safetensors") if (path / "rng.safetensors").is_file() else {}
    trainer = read_json(path / "trainer.json")
    if (path / DCP_DIR).is_dir():
        state: dict[str, dict[str, torch.Tensor]] = {}  # parameter name -> {"exp_avg": ..., "step": ...}
        for key, t in read_full(path / DCP_DIR, "optimizer.state.").items():
            name, _, slot = key.rpartition(".")
            state.setdefault(name, {})[slot] = t
        model = read_full(path / DCP_DIR)
        return {"model": model, "optimizer": {"state": state}, "trainer": trainer, "rng": rng}
    opt_file = path / "optimizer.pt"
    optimizer = None
    if opt_file.is_file():
        optimizer = torch_load(
            opt_file, map_location=map_location
        )  # objects beyond tensors and numbers: refused, never run
    return {
        "model": load_tensors(path / "model.safetensors"),
        "optimizer": optimizer,
        "trainer": trainer,
        "rng": rng,
    }


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Set the generator states saved by `save_checkpoint`, on any number of devices (the current one's)."""
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        state = rng.get("cuda", rng.get(f"cuda{torch.cuda.current_device()}", rng.get("cuda0")))
        if state is not None:  # older checkpoints kept one state per visible device
            torch.cuda.set_rng_state(state)


def polyak_average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Mean of the model weights of several checkpoints (the paper's final-model checkpoint average), whole;
    each checkpoint is read once. Training averages shard by shard with `polyak_average_into`."""
    if not paths:
        raise ValueError("polyak_average needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for p in paths:
        sd = load_checkpoint(Path(p))["model"]
        if total and set(sd) != set(total):
            raise ValueError(f"{p}: checkpoint holds different tensors than {paths[0]}")
        for k, v in sd.items():
            dtypes.setdefault(k, v.dtype)
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(paths)).to(dtypes[k]) for k, v in total.items()}


@torch.no_grad()
def polyak_average_into(tensors: dict[str, torch.Tensor], paths: list[Path]) -> None:
    """Set `tensors` (this process's shards of the checkpointed tensors) to their mean over the checkpoints
    `paths`, each read once, resharded to however `tensors` are held now; every process calls it."""
    if not paths:
        raise ValueError("polyak_average_into needs at least one checkpoint")
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in tensors.items()}
    for p in paths:
        one = {k: torch.empty_like(v) for k, v in tensors.items()}
        load_state({"model": one}, Path(p) / DCP_DIR)
        for k, v in one.items():
            total[k] += v.double()
    for k, v in tensors.items():
        v.copy_((total[k] / len(paths)).to(v.dtype))
