"""`mm demo`: the embedded end-to-end run on the shapes world, with no downloads.

Stages: synthesise the world, train the tokenizer and the tiny LM (`lm-pretrain`), pretrain the image
encoder contrastively (`clip-pretrain`), then `image-pretrain` -> `image-anneal` with the LM frozen, caption
the held-out splits and verify the LM fingerprint; `video` then trains the temporal aggregator and the video
cross-attention on the moving-shapes clips with the LM and the image path frozen. The image-anneal bundle
also captions robustness variants of the image world (JPEG, anti-aliased, unusual sizes; `report.json`
`image.robustness`). Each stage's output lands in `OUT/<stage>/final`; a stage
whose inputs (its config and the content of its inputs) did not change since the last run is reused (hash in
`OUT/<stage>/stage.json`), and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mm.app.report import stage_rows, write_report
from mm.datasets import shapes
from mm.lm import Tokenizer, generate, load_hf
from mm.training.checkpoint import write_json
from mm.training.config import DataSourceConfig, LMPretrainConfig, config_to_yaml, load_config
from mm.training.freeze import fingerprint

log = logging.getLogger("mm.app.demo")

REPO = Path(__file__).resolve().parents[2]
DEMO_PROMPTS = ["Caption: a large", "a small green", "Video: a purple", "there is a"]
IMAGE_COUNTS = {"train": 4000, "heldout": 200, "heldout_pairs": 200}
MOTION_COUNTS = {"train": 2000, "heldout": 200, "heldout_pairs": 120}
# Robustness variants of the image world (`shapes.synth_shapes_variants`), captioned by the image-anneal bundle.
VARIANT_COUNTS = {"jpeg": 100, "antialias": 100, "sizes": 100}
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


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(q for q in part.rglob("*") if q.is_file()) if part.is_dir() else [part]
            for f in files:
                h.update(f.name.encode())
                h.update(f.read_bytes())
        else:
            h.update(str(part).encode())
    return h.hexdigest()[:16]


def cached_stage(
    stage_dir: Path, key: str, run: Callable[[bool], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Run a stage unless a finished run with the same input hash exists; resume an unfinished one."""
    marker = stage_dir / "stage.json"
    prev = json.loads(marker.read_text()) if marker.is_file() else {}
    if prev.get("hash") == key and prev.get("complete") and (stage_dir / "summary.json").is_file():
        log.info("%s: inputs unchanged, reusing %s", stage_dir.name, stage_dir / "final")
        summary = json.loads((stage_dir / "summary.json").read_text())
        return {**summary, "stage_seconds": prev.get("seconds")}, True
    resume = prev.get("hash") == key
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json({"hash": key, "complete": False}, marker)
    t0 = time.perf_counter()
    summary = run(resume)
    if summary.get("stopped", "max_steps") != "max_steps":
        raise KeyboardInterrupt(
            f"{stage_dir.name} stopped by {summary['stopped']}; re-run `mm demo` to resume"
        )
    seconds = time.perf_counter() - t0  # the run that finished it (a resumed run: its own part only)
    write_json({"hash": key, "complete": True, "seconds": seconds}, marker)
    return {**summary, "stage_seconds": seconds}, False


def run_lm_stage(out: Path, data_dir: Path) -> dict[str, Any]:
    """Train (or reuse) the demo LM and report held-out perplexity and greedy completions."""
    from mm.stages.lm_pretrain import run_pretrain_lm

    cfg = load_config(LMPretrainConfig, REPO / "configs" / "lm" / "tiny.yaml")
    text = data_dir / "text"
    cfg.data = [DataSourceConfig(paths=[str(text / "train.txt")], name="shapes", doc_split="line")]
    cfg.heldout = [DataSourceConfig(paths=[str(text / "heldout.txt")], name="heldout", doc_split="line")]
    cfg.anneal.source = "shapes"
    cfg.out = str(out / "lm-pretrain")
    stage_dir = Path(cfg.out)
    key = _hash(config_to_yaml(cfg), text / "train.txt", text / "heldout.txt")
    summary, reused = cached_stage(stage_dir, key, lambda resume: run_pretrain_lm(cfg, resume=resume))
    final = stage_dir / "final"
    model = load_hf(final).eval()
    lm_fp = fingerprint(model)
    tok = Tokenizer.from_file(final)
    prompts = [tok.encode(p, bos=True) for p in DEMO_PROMPTS]
    outs = generate(model, prompts, max_new_tokens=16, stop_tokens=[tok.eos_id])
    completions = {p: p + tok.decode(o) for p, o in zip(DEMO_PROMPTS, outs, strict=True)}
    curve = _curve(stage_dir / "metrics.jsonl", "eval/heldout_ppl")
    curve.append({"step": summary["step"], "value": summary.get("heldout_ppl")})
    return {
        "heldout_ppl": summary.get("heldout_ppl"),
        "heldout_ppl_curve": curve,
        "final_loss": summary.get("final_loss"),
        "steps": summary["step"],
        "params": summary.get("params"),
        "wall_time_s": summary.get("wall_time_s"),
        "stage_seconds": summary.get("stage_seconds"),
        "reused": reused,
        "completions": completions,
        "checkpoint": str(final),
        "fingerprint": lm_fp,
    }


def _curve(metrics: Path, key: str) -> list[dict[str, Any]]:
    out = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if key in r:
                out.append({"step": r["step"], "value": r[key]})
    return out


def _attributes(ev: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The per-attribute figures (`keys`) of each held-out split of a stage's evaluation."""
    return {split: {k: r[k] for k in keys if k in r} for split, r in ev.items() if isinstance(r, dict)}


def _final_curve(metrics: Path, key: str, step: Any, final: Any) -> list[dict[str, Any]]:
    """A stage's logged eval curve (`key` in its metrics.jsonl) ending with its final evaluation at `step`."""
    curve = _curve(metrics, key)
    curve.append({"step": step, "value": final})
    return curve


def run_image_robustness(bundle: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    """Caption the robustness variants with an image bundle: `caption_attribute_report` per variant kind.

    The first `VARIANT_COUNTS[kind]` images of `DATA/shapes/variants_{kind}.jsonl`; the result is kept in
    `bundle/../robustness.json` with a hash of the bundle and the variants, and reused while both are unchanged.
    """
    from mm.datasets.images import read_manifest
    from mm.models.caption import caption_images, load_rgb
    from mm.stages.image import load_image_bundle

    sh = data_dir / "shapes"
    manifests = {kind: sh / f"variants_{kind}.jsonl" for kind in VARIANT_COUNTS}
    for m in manifests.values():
        if not m.is_file():
            raise FileNotFoundError(f"robustness variants {m} do not exist (written by `synth_world`)")
    variant_dirs = [sh / f"variants_{kind}" for kind in VARIANT_COUNTS]
    key = _hash("robustness", sorted(VARIANT_COUNTS.items()), bundle, *manifests.values(), *variant_dirs)
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
        recs = read_manifest(m)[: VARIANT_COUNTS[kind]]
        images = [load_rgb(r.image) for r in recs]
        preds = caption_images(
            model, tok, transform, images, prompt=meta["prompt"], max_tiles=meta["max_tiles"]
        )
        result[kind] = shapes.caption_attribute_report(preds, [r.text for r in recs])
        log.info(
            "image robustness: %s exact match %.3f (%d images)", kind, result[kind]["exact_match"], len(recs)
        )
    write_json({"hash": key, "result": result, "seconds": time.perf_counter() - t0}, cache)
    return result


def run_image_stages(out: Path, data_dir: Path) -> dict[str, Any]:
    """clip-pretrain -> image-pretrain -> image-anneal; held-out captions, attributes, curves, robustness."""
    from mm.stages.clip_pretrain import ClipPretrainConfig, run_encoder_pretrain
    from mm.stages.image import ImageStageConfig, run_image_stage
    from mm.training.bundle import verify_frozen

    lm_dir = out / "lm-pretrain" / "final"
    sh = data_dir / "shapes"
    train, heldout, pairs = sh / "train.jsonl", sh / "heldout.jsonl", sh / "heldout_pairs.jsonl"
    lm_key = _hash(lm_dir)
    report: dict[str, Any] = {"stages": {}}

    clip = load_config(ClipPretrainConfig, REPO / "configs" / "encoders" / "clip_tiny.yaml")
    clip.tokenizer, clip.out = str(lm_dir), str(out / "clip-pretrain")
    clip.data.train, clip.data.heldout = [str(train)], [str(heldout)]
    key = _hash(config_to_yaml(clip), lm_key, train)
    t0 = time.perf_counter()
    s, reused = cached_stage(Path(clip.out), key, lambda r: run_encoder_pretrain(clip, resume=r))
    report["stages"]["clip-pretrain"] = {
        "reused": reused,
        "wall_time_s": time.perf_counter() - t0,
        **_pick(s),
    }
    enc = Path(clip.out) / "final" / "encoder.safetensors"

    prev_key = key
    init_from = None
    for stage, preset in (("image-pretrain", "image_pretrain_tiny"), ("image-anneal", "image_anneal_tiny")):
        cfg = load_config(ImageStageConfig, REPO / "configs" / "stages" / f"{preset}.yaml")
        cfg.lm, cfg.out = str(lm_dir), str(out / stage)
        cfg.data.train, cfg.data.heldout = [str(train)], [str(heldout), str(pairs)]
        cfg.encoder_weights = str(enc) if init_from is None else None
        cfg.init_from = init_from
        key = _hash(config_to_yaml(cfg), lm_key, prev_key, train, heldout, pairs)
        t0 = time.perf_counter()
        s, reused = cached_stage(Path(cfg.out), key, lambda r, cfg=cfg: run_image_stage(cfg, resume=r))
        report["stages"][stage] = {"reused": reused, "wall_time_s": time.perf_counter() - t0, **_pick(s)}
        prev_key, init_from = key, str(Path(cfg.out) / "final")

    ev = report["stages"]["image-anneal"].get("eval", {})
    report["caption_exact_match"] = ev.get("heldout", {}).get("exact_match")
    report["heldout_pair_exact_match"] = ev.get("heldout_pairs", {}).get("exact_match")
    report["attribute_accuracy"] = ev.get("heldout", {}).get("attribute_accuracy")
    report["heldout_pair_attribute_accuracy"] = ev.get("heldout_pairs", {}).get("attribute_accuracy")
    report["attributes"] = _attributes(ev, IMAGE_ATTRIBUTE_KEYS)
    report["exact_match_curves"] = {
        stage: _final_curve(
            out / stage / "metrics.jsonl",
            "eval/heldout_exact_match",
            rec.get("step"),
            rec.get("eval", {}).get("heldout", {}).get("exact_match"),
        )
        for stage, rec in report["stages"].items()
        if stage != "clip-pretrain"
    }
    ok, msg = verify_frozen(Path(init_from))
    # The bundle refuses a changed LM: captions of the variants only while it is untouched.
    report["robustness"] = run_image_robustness(Path(init_from), data_dir) if ok else {}
    report["lm_frozen"] = ok
    report["lm_frozen_detail"] = msg
    report["checkpoint"] = init_from
    return report


def run_video_stage_demo(out: Path, data_dir: Path) -> dict[str, Any]:
    """The video stage on the moving-shapes clips, from the demo's image-anneal bundle; held-out figures."""
    from mm.stages.video import VideoStageConfig, run_video_stage
    from mm.training.bundle import verify_frozen

    image_dir = out / "image-anneal" / "final"
    mo = data_dir / "motion"
    train, heldout, pairs = mo / "train.jsonl", mo / "heldout.jsonl", mo / "heldout_pairs.jsonl"
    cfg = load_config(VideoStageConfig, REPO / "configs" / "stages" / "video_tiny.yaml")
    cfg.init_from, cfg.out = str(image_dir), str(out / "video")
    cfg.data.train, cfg.data.heldout = [str(train)], [str(heldout), str(pairs)]
    key = _hash(config_to_yaml(cfg), image_dir, out / "lm-pretrain" / "final", train, heldout, pairs)
    t0 = time.perf_counter()
    s, reused = cached_stage(Path(cfg.out), key, lambda r: run_video_stage(cfg, resume=r))
    stage = {"reused": reused, "wall_time_s": time.perf_counter() - t0, **_pick(s)}
    if not reused:
        stage["train_wall_time_s"] = s.get("wall_time_s")
    ev = s.get("eval", {})
    final = Path(cfg.out) / "final"
    ok, msg = verify_frozen(final)
    curve = _final_curve(
        Path(cfg.out) / "metrics.jsonl",
        "eval/heldout_exact_match",
        s.get("step"),
        ev.get("heldout", {}).get("exact_match"),
    )
    return {
        "stage": stage,
        "caption_exact_match": ev.get("heldout", {}).get("exact_match"),
        "heldout_pair_exact_match": ev.get("heldout_pairs", {}).get("exact_match"),
        "direction_accuracy": ev.get("heldout", {}).get("direction_accuracy"),
        "color_accuracy": ev.get("heldout", {}).get("color_accuracy"),
        "shape_accuracy": ev.get("heldout", {}).get("shape_accuracy"),
        "heldout_pair_direction_accuracy": ev.get("heldout_pairs", {}).get("direction_accuracy"),
        "attributes": _attributes(ev, VIDEO_ATTRIBUTE_KEYS),
        "exact_match_curve": curve,
        "examples": ev.get("heldout", {}).get("examples", []),
        "frozen": ok,
        "frozen_detail": msg,
        "checkpoint": str(final),
    }


def _pick(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("step", "final_loss", "eval", "retrieval", "data_skips", "stage_seconds")
    return {k: summary[k] for k in keys if k in summary}


def synth_world(data_dir: Path, image: bool, video: bool = False) -> None:
    """Write the parts of the shapes world the demo needs (kept if already there)."""
    for split in ("train", "heldout"):
        if not (data_dir / "text" / f"{split}.txt").is_file():
            shapes.synth_text(data_dir, split=split, seed=0)
    if image:
        for split, n in IMAGE_COUNTS.items():
            if not (data_dir / "shapes" / f"{split}.jsonl").is_file():
                shapes.synth_shapes(data_dir, n=n, seed=0, split=split)
        for kind, n in VARIANT_COUNTS.items():
            if not (data_dir / "shapes" / f"variants_{kind}.jsonl").is_file():
                shapes.synth_shapes_variants(data_dir, n=n, seed=0, kind=kind)
    if video:
        for split, n in MOTION_COUNTS.items():
            if not (data_dir / "motion" / f"{split}.jsonl").is_file():
                shapes.synth_motion(data_dir, n=n, seed=0, split=split)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_demo(out: Path, modality: str = "all") -> dict[str, Any]:
    """Run the demo stages for `modality` and write OUT/report.json."""
    if modality not in ("lm", "image", "video", "speech", "all"):
        raise ValueError(f"--modality {modality}: available now: lm, image, video, speech, all")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    want_video = modality in ("video", "all")
    want_image = modality == "image" or want_video  # the video stage starts from the image stages (cached)
    synth_world(data_dir, want_image, want_video)
    report_file = out / "report.json"
    report: dict[str, Any] = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }
    report["lm"] = run_lm_stage(out, data_dir)
    if want_image:
        report["image"] = run_image_stages(out, data_dir)
        report["lm_frozen"] = report["image"]["lm_frozen"]
    if want_video:
        report["video"] = run_video_stage_demo(out, data_dir)
        report["lm_frozen"] = report["lm_frozen"] and report["video"]["frozen"]
    if modality in ("speech", "all"):  # encoder + adapter spliced into the cached LM's input
        from mm.app.speech_demo import run_speech_stages

        report["speech"] = run_speech_stages(out, data_dir)
        report["lm_frozen"] = report.get("lm_frozen", True) and report["speech"]["lm_frozen"]
    if want_image:
        ev = report["image"].get("stages", {}).get("image-anneal", {}).get("eval", {})
        report["image"]["examples"] = ev.get("heldout", {}).get("examples", [])
    lm_final = out / "lm-pretrain" / "final"
    report["lm_fingerprint"] = {
        "before": report["lm"].get("fingerprint"),  # right after LM pretraining
        "after": fingerprint(load_hf(lm_final)),  # now, after every multimodal stage
    }
    report["lm_frozen"] = report.get("lm_frozen", True) and (
        report["lm_fingerprint"]["before"] == report["lm_fingerprint"]["after"]
    )
    rows = stage_rows(report)
    # seconds each stage took when it was computed (kept when it is reused), and in this run
    report["wall_seconds"] = {stage: computed for stage, _, computed, _ in rows}
    report["this_run_seconds"] = {stage: this_run for stage, this_run, _, _ in rows}
    report["wall_time_s"] = time.perf_counter() - t0
    write_json(report, report_file)
    write_report(out, report)
    return report
