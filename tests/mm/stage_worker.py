"""Run stage configs one after another in this process (under torchrun: every process of the group).

    torchrun --standalone --nproc-per-node 2 tests/mm/stage_worker.py JOBS.json

JOBS.json lists {"config": YAML path}; each config is run with `mm.training.runner.run`.
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
        run(load_config(stage_class(name).config_class, job["config"]))
    distributed.shutdown()


if __name__ == "__main__":
    main()
