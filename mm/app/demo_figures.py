"""What each demo step adds to report.json besides its stage record: learning curves, per-attribute figures,
the LM's completions, the image robustness captions, the speech table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm import world
from mm.app.demo_world import VARIANT_COUNTS, content_hash
from mm.lm.io import write_json

if TYPE_CHECKING:
    from mm.app.demo_steps import StepRun

log = logging.getLogger("mm.app.demo")

DEMO_PROMPTS = ["Caption: a large", "a small green", "Video: a purple", "there is a"]
# Per-attribute figures copied from the stages' evaluations into report.json.
IMAGE_ATTRIBUTE_KEYS = (
    "exact_match",
    "color_accuracy",
    "shape_accuracy",
    "size_accuracy",
    "count_accuracy",
    "order_accuracy",
    "order_n",
    "well_formed",
    "n",
)
VIDEO_ATTRIBUTE_KEYS = ("exact_match", "color_accuracy", "shape_accuracy", "direction_accuracy", "n")


def metric_curve(metrics: Path, key: str) -> list[dict[str, Any]]:
    """(step, seconds, value) of every record of `metrics.jsonl` that holds `key`; seconds: the stage's
    training seconds before that evaluation (earlier evaluations and checkpoints included; None in records
    written before they were logged)."""
    out = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if key in r:
                    out.append({"step": r["step"], "seconds": r.get("elapsed_s"), "value": r[key]})
    return out


def windowed_curve(metrics: Path, key: str, every: int) -> list[dict[str, Any]]:
    """(step, value) of `key` in metrics.jsonl, averaged over windows of `every` records."""
    if not metrics.is_file():
        return []
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = []
    for s in range(0, len(recs), every):
        win = [r[key] for r in recs[s : s + every] if key in r]
        if win:
            out.append({"step": recs[min(s + every, len(recs)) - 1]["step"], "value": sum(win) / len(win)})
    return out


def attributes(ev: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The per-attribute figures (`keys`) of each held-out split of a stage's evaluation."""
    return {split: {k: r[k] for k in keys if k in r} for split, r in ev.items() if isinstance(r, dict)}


def exact_match_curve(run: StepRun) -> list[dict[str, Any]]:
    """A stage's logged held-out exact match (metrics.jsonl) ending with its final evaluation."""
    curve = metric_curve(run.out / run.step.name / "metrics.jsonl", "eval/heldout_exact_match")
    final = run.summary.get("eval", {}).get("heldout", {}).get("exact_match")
    seconds = run.summary.get("elapsed_s", run.summary.get("wall_time_s"))  # the stage's training seconds
    curve.append({"step": run.summary.get("step"), "seconds": seconds, "value": final})
    return curve


def lm_figures(run: StepRun) -> dict[str, Any]:
    """Held-out perplexity (curve and final), greedy completions of `DEMO_PROMPTS` and the LM's fingerprint."""
    from mm.formats.hf_llama import load_hf
    from mm.lm import Tokenizer, generate
    from mm.training.freeze import fingerprint

    s = run.summary
    model = load_hf(run.final).eval()
    tok = Tokenizer.from_file(run.final)
    outs = generate(
        model, [tok.encode(p, bos=True) for p in DEMO_PROMPTS], max_new_tokens=16, stop_tokens=[tok.eos_id]
    )
    curve = metric_curve(run.out / run.step.name / "metrics.jsonl", "eval/heldout_ppl")
    curve.append({"step": s["step"], "value": s.get("heldout_ppl")})
    return {
        "heldout_ppl": s.get("heldout_ppl"),
        "heldout_ppl_curve": curve,
        "final_loss": s.get("final_loss"),
        "steps": s["step"],
        "params": s.get("params"),
        "wall_time_s": s.get(
            "wall_time_s"
        ),  # the training run's own time (the stage's, when it was computed)
        "stage_seconds": s.get("stage_seconds"),
        "reused": run.record["reused"],
        "completions": {p: p + tok.decode(o) for p, o in zip(DEMO_PROMPTS, outs, strict=True)},
        "checkpoint": str(run.final),
        "fingerprint": fingerprint(model),
    }


def run_image_robustness(bundle: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    """Caption the robustness variants with an image bundle: `caption_attribute_report` per variant kind.

    The first `VARIANT_COUNTS[kind]` images of `DATA/shapes/variants_{kind}.jsonl`; the result is kept in
    `bundle/../robustness.json` with a hash of the bundle and the variants, and reused while both are unchanged.
    """
    from mm.datasets.media import read_manifest
    from mm.models.caption import caption_images, load_rgb
    from mm.stages.image_model import load_image_bundle

    sh = data_dir / "shapes"
    manifests = {kind: sh / f"variants_{kind}.jsonl" for kind in VARIANT_COUNTS}
    for m in manifests.values():
        if not m.is_file():
            raise FileNotFoundError(f"robustness variants {m} do not exist (written by `synth_image_world`)")
    variant_dirs = [sh / f"variants_{kind}" for kind in VARIANT_COUNTS]
    key = content_hash(
        "robustness", sorted(VARIANT_COUNTS.items()), bundle, *manifests.values(), *variant_dirs
    )
    cache = bundle.parent / "robustness.json"
    if cache.is_file():
        prev = json.loads(cache.read_text())
        if prev.get("hash") == key and isinstance(prev.get("result"), dict):
            log.info("image robustness: bundle and variants unchanged, reusing %s", cache)
            return prev["result"]
    t0 = time.perf_counter()
    model, tok, transform, meta = load_image_bundle(bundle)
    result = {}
    for kind, m in manifests.items():
        recs = read_manifest(m, "image")[: VARIANT_COUNTS[kind]]
        images = [load_rgb(r.media) for r in recs]
        preds = caption_images(
            model, tok, transform, images, prompt=meta["prompt"], max_tiles=meta["max_tiles"]
        )
        result[kind] = world.caption_attribute_report(preds, [r.text for r in recs])
        log.info(
            "image robustness: %s exact match %.3f (%d images)", kind, result[kind]["exact_match"], len(recs)
        )
    write_json({"hash": key, "result": result, "seconds": time.perf_counter() - t0}, cache)
    return result


def image_figures(run: StepRun) -> dict[str, Any]:
    """Held-out captions of the image-anneal bundle: exact match, attributes, examples, robustness variants."""
    ev = run.summary.get("eval", {})
    heldout, pairs = ev.get("heldout", {}), ev.get("heldout_pairs", {})
    ok = bool(run.frozen and run.frozen[0])
    return {
        "caption_exact_match": heldout.get("exact_match"),
        "heldout_pair_exact_match": pairs.get("exact_match"),
        "attribute_accuracy": heldout.get("attribute_accuracy"),
        "heldout_pair_attribute_accuracy": pairs.get("attribute_accuracy"),
        "attributes": attributes(ev, IMAGE_ATTRIBUTE_KEYS),
        # The bundle refuses a changed LM: captions of the variants only while it is untouched.
        "robustness": run_image_robustness(run.final, run.data_dir) if ok else {},
        "examples": heldout.get("examples", []),
    }


def video_figures(run: StepRun) -> dict[str, Any]:
    """Held-out captions of the video bundle: exact match, colour, shape, direction, attributes, examples."""
    ev = run.summary.get("eval", {})
    heldout, pairs = ev.get("heldout", {}), ev.get("heldout_pairs", {})
    ok, detail = run.frozen or (False, "not verified")
    return {
        "caption_exact_match": heldout.get("exact_match"),
        "heldout_pair_exact_match": pairs.get("exact_match"),
        "direction_accuracy": heldout.get("direction_accuracy"),
        "color_accuracy": heldout.get("color_accuracy"),
        "shape_accuracy": heldout.get("shape_accuracy"),
        "heldout_pair_direction_accuracy": pairs.get("direction_accuracy"),
        "attributes": attributes(ev, VIDEO_ATTRIBUTE_KEYS),
        "examples": heldout.get("examples", []),
        # The names `mm demo` prints (mm.app.cli) from before every section had `stages` and `lm_frozen`.
        "exact_match_curve": run.curve,
        "stage": run.record,
        "frozen": ok,
        "frozen_detail": detail,
    }
