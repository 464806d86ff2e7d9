"""`mm demo`: the embedded end-to-end run on the shapes world, with no downloads.

Stages so far: synthesise the text corpus, train the tokenizer and the tiny LM (`lm-pretrain`), report the
held-out perplexity and a few greedy completions in `OUT/report.json`. A stage whose inputs (config and
data) did not change since the last run is reused (content hash in `OUT/<stage>/stage.json`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mm.checkpoint import write_json
from mm.config import DataSourceConfig, LMPretrainConfig, config_to_yaml, load_config
from mm.datasets import shapes
from mm.lm import Tokenizer, generate, load_hf

log = logging.getLogger("mm.demo")

REPO = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ["Caption: a large", "a small green", "Video: a purple", "there is a"]


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(str(part).encode())
    return h.hexdigest()[:16]


def _demo_lm_config(out: Path, data_dir: Path) -> LMPretrainConfig:
    cfg = load_config(LMPretrainConfig, REPO / "configs" / "lm" / "tiny.yaml")
    cfg.data = [
        DataSourceConfig(paths=[str(data_dir / "text" / "train.txt")], name="shapes", doc_split="line")
    ]
    cfg.heldout = [
        DataSourceConfig(paths=[str(data_dir / "text" / "heldout.txt")], name="heldout", doc_split="line")
    ]
    cfg.anneal.source = "shapes"
    cfg.out = str(out / "lm-pretrain")
    return cfg


def run_lm_stage(out: Path, data_dir: Path) -> dict[str, Any]:
    """Train (or reuse) the demo LM and report held-out perplexity and greedy completions."""
    from mm.pretrain_lm import run_pretrain_lm

    cfg = _demo_lm_config(out, data_dir)
    stage_dir = Path(cfg.out)
    key = _hash(config_to_yaml(cfg), data_dir / "text" / "train.txt", data_dir / "text" / "heldout.txt")
    marker = stage_dir / "stage.json"
    if (
        marker.is_file()
        and json.loads(marker.read_text()).get("hash") == key
        and (stage_dir / "final").is_dir()
    ):
        log.info("lm-pretrain: inputs unchanged, reusing %s", stage_dir / "final")
        summary = json.loads((stage_dir / "summary.json").read_text())
        reused = True
    else:
        resume = marker.is_file() and json.loads(marker.read_text()).get("hash") == key
        write_json({"hash": key, "complete": False}, _ensure(marker))
        summary = run_pretrain_lm(cfg, resume=resume or (stage_dir / "checkpoints").is_dir())
        if summary["stopped"] != "max_steps":
            raise KeyboardInterrupt(
                f"lm-pretrain stopped by {summary['stopped']}; re-run `mm demo` to resume"
            )
        write_json({"hash": key, "complete": True}, marker)
        reused = False
    final = stage_dir / "final"
    model = load_hf(final).eval()
    tok = Tokenizer.from_file(final)
    prompts = [tok.encode(p, bos=True) for p in DEMO_PROMPTS]
    outs = generate(model, prompts, max_new_tokens=16, stop_tokens=[tok.eos_id])
    completions = {p: p + tok.decode(o) for p, o in zip(DEMO_PROMPTS, outs, strict=True)}
    curve = []
    metrics = stage_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if "eval/heldout_ppl" in r:
                curve.append({"step": r["step"], "heldout_ppl": r["eval/heldout_ppl"]})
    curve.append({"step": summary["step"], "heldout_ppl": summary.get("heldout_ppl")})
    return {
        "heldout_ppl": summary.get("heldout_ppl"),
        "heldout_ppl_curve": curve,
        "final_loss": summary.get("final_loss"),
        "steps": summary["step"],
        "params": summary.get("params"),
        "wall_time_s": summary.get("wall_time_s"),
        "reused": reused,
        "completions": completions,
        "checkpoint": str(final),
    }


def _ensure(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_demo(out: Path, modality: str = "all") -> dict[str, Any]:
    """Run the demo stages for `modality` and write OUT/report.json."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    for split in ("train", "heldout"):
        path = data_dir / "text" / f"{split}.txt"
        if not path.is_file():
            shapes.synth_text(data_dir, split=split, seed=0)
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    }
    report["lm"] = run_lm_stage(out, data_dir)
    report["wall_time_s"] = time.perf_counter() - t0
    write_json(report, out / "report.json")
    return report
