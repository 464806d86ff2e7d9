"""Run stage configs one after another in this process (under torchrun: every process of the group).

    torchrun --standalone --nproc-per-node 2 tests/mm/stage_worker.py JOBS.json

JOBS.json lists {"config": YAML path, "resume": bool (optional)}; each config is run with
`mm.training.runner.run`. With MM_TEST_GATHERS=FILE set, every collective that gathers tensors (all-gathers,
`DTensor.full_tensor`) during a checkpoint save is counted, and the counts per process appended to FILE. With
MM_TEST_TRAINABLE=FILE set, each process appends, as training starts, the type of every trained parameter (by
name) and the types in each AdamW group.
"""

import json
import os
import sys

from mm.training import distributed
from mm.training.config import load_config
from mm.training.runner import run
from mm.training.stage import stage_class


def main() -> None:
    """Run every job of the JSON file named on the command line."""
    import yaml

    gathers = count_gathers_during_saves() if os.environ.get("MM_TEST_GATHERS") else None
    if os.environ.get("MM_TEST_TRAINABLE"):
        record_trainable(os.environ["MM_TEST_TRAINABLE"])
    for job in json.loads(open(sys.argv[1]).read()):
        name = yaml.safe_load(open(job["config"]).read())["stage"]
        run(load_config(stage_class(name).config_class, job["config"]), resume=job.get("resume", False))
    if gathers is not None:
        with open(os.environ["MM_TEST_GATHERS"], "a") as f:
            f.write(json.dumps({"rank": distributed.rank(), **gathers}) + "\n")
    distributed.shutdown()


def count_gathers_during_saves() -> dict[str, int]:
    """Count gathers of model data (every all-gather / gather op on floating-point tensors the dispatcher
    sees: c10d's and the functional collectives, hence FSDP2's and DTensor's) while `Trainer.save` runs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from mm.training.trainer import Trainer

    counts = {"saves": 0, "gathers": 0}

    class Gathers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [t for a in args for t in (a if isinstance(a, list | tuple) else [a])]
            floats = any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in flat)
            if "gather" in str(func.name()).lower() and floats:  # object collectives move uint8 bytes
                counts["gathers"] += 1
            return func(*args, **(kwargs or {}))

    real_save = Trainer.save

    def save(self):
        counts["saves"] += 1
        with Gathers():
            return real_save(self)

    Trainer.save = save
    return counts


def record_trainable(path: str) -> None:
    """Append this process's trained parameter types and AdamW group types to `path` as training starts."""
    from mm.training.trainer import Trainer

    real_fit = Trainer.fit

    def fit(self, resume=False):
        rec = {
            "rank": distributed.rank(),
            "params": {n: type(p).__name__ for n, p in self.params},
            "groups": [sorted({type(p).__name__ for p in g["params"]}) for g in self.optimizer.param_groups],
        }
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return real_fit(self, resume)

    Trainer.fit = fit


if __name__ == "__main__":
    main()
