"""`mm train --config CFG` runs any stage's config (the stage is named by the config's `stage:` key);
`mm pretrain-lm` and `mm pretrain-encoder` remain as aliases that pick the stage for older configs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Summary keys printed (one JSON line on stdout) at the end of a run.
SUMMARY_KEYS = ("step", "final_loss", "heldout_ppl", "wall_time_s", "final", "retrieval", "heldout", "eval")


def stage_name(config: str, overrides: list[str], default: str) -> str:
    """The stage a config runs: `stage:` (overrides win); older configs: `kind: bestrq`, an LM `model:`. A
    `stage_file:` (a path, relative to the config's folder) is imported first: it registers a stage defined
    outside `mm`."""
    import yaml

    from mm.training.stage import import_stage_file

    path = Path(config)
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    if raw is None:
        raise FileNotFoundError(f"config file {config} does not exist or is empty")
    if not isinstance(raw, dict):
        raise ValueError(f"{config}: expected a mapping of config keys, got {type(raw).__name__}")
    name = raw.get("stage")
    if name is None and raw.get("kind") == "bestrq":
        name = "bestrq-pretrain"
    elif name is None and raw.get("kind") == "clip":
        name = "clip-pretrain"
    elif name is None and "model" in raw:
        name = "lm-pretrain"
    stage_file = raw.get("stage_file") or ""
    for o in overrides:
        if o.startswith("stage="):
            name = o.split("=", 1)[1]
        if o.startswith("stage_file="):
            stage_file = o.split("=", 1)[1]
    if stage_file:
        import_stage_file(path.parent / stage_file)
    return str(name or default)


def set_data(cfg: Any, paths: list[str]) -> None:
    """`--data PATH ...`: the training data of any stage (the LM's text sources, else `data.train`)."""
    from mm.training.config import DataSourceConfig, LMPretrainConfig

    if isinstance(cfg, LMPretrainConfig):
        cfg.data = [DataSourceConfig(paths=list(paths), name="data")]
    else:
        cfg.data.train = list(paths)


def run_command(command: str, args: argparse.Namespace, default_stage: str) -> int:
    """Load the config of the stage it names, apply --data/--out/--max-steps/--save-every, run it, report a
    stop by signal (exit 130) or divergence (exit 3), print the summary."""
    import logging

    from mm.training import distributed
    from mm.training.config import load_config
    from mm.training.runner import run
    from mm.training.stage import stage_class
    from mm.training.trainer import TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    name = stage_name(args.config, args.overrides, default_stage)
    cls = stage_class(name)
    overrides = [o for o in args.overrides if not o.startswith("kind=")]
    cfg = load_config(cls.config_class, args.config, overrides + [f"stage={name}"])
    if args.data:
        set_data(cfg, list(args.data))
    if args.out:
        cfg.out = args.out
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.save_every is not None:
        cfg.train.save_every = args.save_every
    try:
        summary = run(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"mm {command}: {e}", file=sys.stderr)
        return 3
    finally:
        distributed.shutdown()
    if summary["stopped"] != "max_steps":
        print(
            f"mm {command}: stopped by {summary['stopped']} at step {summary['step']}; checkpoint saved, "
            f"continue with --resume",
            file=sys.stderr,
        )
        return 130
    print(json.dumps({k: summary[k] for k in SUMMARY_KEYS if k in summary}, default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`mm train`: any stage's config (default stage image-pretrain, as before `stage:` was required)."""
    return run_command("train", args, "image-pretrain")


def cmd_pretrain_lm(args: argparse.Namespace) -> int:
    """`mm pretrain-lm`: an LM config."""
    return run_command("pretrain-lm", args, "lm-pretrain")


def cmd_pretrain_encoder(args: argparse.Namespace) -> int:
    """`mm pretrain-encoder`: a CLIP (default) or BEST-RQ (`kind: bestrq`) config."""
    return run_command("pretrain-encoder", args, "clip-pretrain")
