"""Build a stage on the meta device, shard it, and (optionally) materialise it; report this process's figures.

    torchrun --standalone --nproc-per-node 4 tests/mm/meta_start_worker.py CONFIG OUT_DIR {shard|materialise}
        [KEY=VALUE ...]

Writes OUT_DIR/rank{R}.json: parameter bytes this process holds (its FSDP2 shards), whether every parameter is
still on the meta device, the resident memory (VmRSS) before and after, and with `materialise` the peak resident
memory while materialising (VmHWM, reset before) and a checksum of each parameter's local shard.
"""

import json
import sys
from pathlib import Path

import torch


def rss_kib(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    """Build, shard, maybe materialise; write this rank's report."""
    from mm.training import distributed
    from mm.training.config import load_config
    from mm.training.materialize import local_box, local_param_bytes
    from mm.training.runner import build, prepare
    from mm.training.stage import stage_class
    from mm.training.trainer import setup_run

    config, out, mode, *overrides = sys.argv[1:]
    import yaml

    name = yaml.safe_load(Path(config).read_text())["stage"]
    cfg = load_config(stage_class(name).config_class, config, overrides)
    device = setup_run(cfg.train)
    from mm.training.runner import context, stage_for

    stage = stage_for(cfg, context(cfg, device))
    stage.check_common()
    stage.check()
    rss0 = rss_kib("VmRSS")
    init = build(stage)
    prepare(stage, init, materialise=False)
    report = {
        "rank": stage.rank,
        "world": stage.world,
        "param_bytes": local_param_bytes(stage.model),
        "all_meta": all(p.is_meta for p in stage.model.parameters()),
        "sharded": all(hasattr(p, "device_mesh") for p in stage.model.parameters()),
        "rss_start_kib": rss0,
        "rss_built_kib": rss_kib("VmRSS"),
    }
    if mode == "materialise":
        from mm.training.materialize import materialize

        distributed.barrier()
        before = rss_kib("VmRSS")
        report["peak_reset"] = reset_peak()
        materialize(stage.model, init, device)
        report["rss_before_kib"], report["peak_kib"] = before, rss_kib("VmHWM")
        report["all_meta"] = any(p.is_meta for p in stage.model.parameters())
        sums = {}
        with torch.no_grad():
            for n, p in stage.model.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                shape, offset = local_box(p)
                sums[n] = [float(local.double().sum()), list(offset), list(shape)]
        report["sums"] = sums
    Path(out, f"rank{stage.rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


if __name__ == "__main__":
    main()
