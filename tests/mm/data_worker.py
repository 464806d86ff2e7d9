"""Run stage configs one after another in this process (under torchrun: every process of the group), with
DataLoader options for stages whose config has no `data.num_workers` (lm-pretrain reads `cfg.loader`).

    torchrun --standalone --nproc-per-node 4 tests/mm/data_worker.py JOBS.json

JOBS.json lists {"config": YAML path, "loader": {LoaderOptions fields} (optional)}.
"""

import json
import sys

from mm.training import distributed
from mm.training.config import load_config
from mm.training.runner import run
from mm.training.stage import stage_class


def main() -> None:
    """Run every job of the JSON file named on the command line."""
    import yaml

    for job in json.loads(open(sys.argv[1]).read()):
        name = yaml.safe_load(open(job["config"]).read())["stage"]
        cfg = load_config(stage_class(name).config_class, job["config"])
        for key, value in job.get("loader", {}).items():  # the LM stage's `loader:` section
            setattr(cfg.loader, key, value)
        run(cfg)
    distributed.shutdown()


if __name__ == "__main__":
    main()
