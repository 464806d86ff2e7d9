"""The steps of `mm demo`, declared once (`STEPS`); `mm.app.demo` runs them, all the same way.

A `Step` says
- which stage folder it writes (`OUT/<name>`) and which report.json section it belongs to (`lm`, `image`,
  `video`, `speech`);
- what it needs: the parts of the shapes world it reads (`world`: synthesised first when missing), the files and
  folders of them whose content is part of its cache key (`inputs`, relative to `OUT/data`), and the earlier
  steps whose `OUT/<step>/final` folders it reads (`needs`: their content is part of its cache key too);
- how its config is built: a preset shipped in the package (`mm.configs`, read with `importlib.resources`, so an
  installed `mm` finds it as well as an editable one) with the demo's paths filled in (`configure`);
- what it contributes to its report.json section: its record under `stages.<name>` (the common figures plus the
  summary keys in `keep` and, with `loss_curve`, its loss averaged over windows of 20 steps), its held-out
  exact-match curve under `exact_match_curves.<name>` (`curve`), the frozen-LM check of its final folder
  (`verify`: `lm_frozen`, `lm_frozen_detail`, `checkpoint`) and the section's figures (`figures`).

The stage itself is run by `mm.training.runner.run`, like `mm train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from mm.datasets import shapes
from mm.training.checkpoint import write_json
from mm.training.config import DataSourceConfig, LMPretrainConfig, load_config

log = logging.getLogger("mm.app.demo")

T = TypeVar("T")

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


# ------------------------------------------------------------------------------------ presets, hashes
def content_hash(*parts: Any) -> str:
    """sha256 (16 hex digits) of strings and of the names and bytes of files (folders: every file in them)."""
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


def load_preset(cls: type[T], name: str) -> T:
    """Read a preset shipped in `mm.configs` (e.g. `lm/tiny.yaml`) as `cls`, installed or editable."""
    ref = resources.files("mm.configs").joinpath(*name.split("/"))
    with resources.as_file(ref) as path:
        return load_config(cls, path)


# ------------------------------------------------------------------------------------- the shapes world
def _synth_splits(
    done: Callable[[str], bool], make: Callable[[str], Any], splits: list[str]
) -> dict[str, float]:
    """Run `make(split)` for every split not `done`; seconds spent per split written."""
    spent = {}
    for split in splits:
        if not done(split):
            t0 = time.perf_counter()
            make(split)
            spent[split] = time.perf_counter() - t0
    return spent


def synth_text_world(data_dir: Path) -> dict[str, float]:
    """The LM's text corpus (`DATA/text/{train,heldout}.txt`) unless present; seconds per split."""
    return _synth_splits(
        lambda s: (data_dir / "text" / f"{s}.txt").is_file(),
        lambda s: shapes.synth_text(data_dir, split=s, seed=0),
        ["train", "heldout"],
    )


def synth_image_world(data_dir: Path) -> dict[str, float]:
    """The shapes images (`IMAGE_COUNTS`) and their robustness variants unless present; seconds per split."""
    sh = data_dir / "shapes"
    spent = _synth_splits(
        lambda s: (sh / f"{s}.jsonl").is_file(),
        lambda s: shapes.synth_shapes(data_dir, n=IMAGE_COUNTS[s], seed=0, split=s),
        list(IMAGE_COUNTS),
    )
    spent.update(
        _synth_splits(
            lambda s: (sh / f"{s}.jsonl").is_file(),
            lambda s: shapes.synth_shapes_variants(
                data_dir,
                n=VARIANT_COUNTS[s.removeprefix("variants_")],
                seed=0,
                kind=s.removeprefix("variants_"),
            ),
            [f"variants_{kind}" for kind in VARIANT_COUNTS],
        )
    )
    return spent


def synth_motion_world(data_dir: Path) -> dict[str, float]:
    """The moving-shapes clips (`MOTION_COUNTS`) unless present; seconds per split."""
    return _synth_splits(
        lambda s: (data_dir / "motion" / f"{s}.jsonl").is_file(),
        lambda s: shapes.synth_motion(data_dir, n=MOTION_COUNTS[s], seed=0, split=s),
        list(MOTION_COUNTS),
    )


def synth_speech_world(data_dir: Path) -> dict[str, float]:
    """The spoken shapes world's splits (espeak-ng) unless present; seconds per split."""
    from mm.datasets.spoken_shapes import DEFAULT_SPEECH_COUNTS, synth_speech

    return _synth_splits(
        lambda s: (data_dir / "speech" / f"{s}.jsonl").is_file(),
        lambda s: synth_speech(data_dir, n=DEFAULT_SPEECH_COUNTS[s], seed=0, split=s),
        list(DEFAULT_SPEECH_COUNTS),
    )


# The parts of the shapes world, by the names steps give in `Step.world`.
WORLD: dict[str, Callable[[Path], dict[str, float]]] = {
    "text": synth_text_world,
    "shapes": synth_image_world,
    "motion": synth_motion_world,
    "speech": synth_speech_world,
}


# ------------------------------------------------------------------------------------------ the steps
@dataclass
class StepRun:
    """One step's outcome in this run, handed to its `figures`."""

    step: Step
    out: Path
    data_dir: Path
    summary: dict[str, Any]
    record: dict[str, Any]  # what went into `SECTION.stages.<name>`
    frozen: tuple[bool, str] | None  # `verify_frozen` of its final folder (steps with `verify`)
    curve: list[dict[str, Any]] | None  # its held-out exact-match curve (steps with `curve`)

    @property
    def final(self) -> Path:
        """The step's final folder, `OUT/<name>/final`."""
        return self.out / self.step.name / "final"


@dataclass(frozen=True)
class Step:
    """One stage of the demo: what it needs, how its config is built, what it contributes (module docstring)."""

    name: str
    section: str
    preset: str
    config_class: Callable[[], type]  # imported when the step runs
    configure: Callable[[Any, Path, Path], None]  # (config from the preset, OUT, DATA): fill in the paths
    world: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    loss_curve: str | None = None
    curve: bool = False
    verify: bool = False
    figures: Callable[[StepRun], dict[str, Any]] | None = None

    def config(self, out: Path, data_dir: Path) -> Any:
        """The step's config: its preset, the demo's paths filled in, output in `OUT/<name>`."""
        cfg = load_preset(self.config_class(), self.preset)
        self.configure(cfg, out, data_dir)
        cfg.out = str(out / self.name)
        return cfg


def _final(out: Path, step: str) -> Path:
    return out / step / "final"


def _lm_pretrain_class() -> type:
    return LMPretrainConfig


def _clip_class() -> type:
    from mm.stages.clip_pretrain import ClipPretrainConfig

    return ClipPretrainConfig


def _image_class() -> type:
    from mm.stages.image import ImageStageConfig

    return ImageStageConfig


def _video_class() -> type:
    from mm.stages.video import VideoStageConfig

    return VideoStageConfig


def _bestrq_class() -> type:
    from mm.stages.bestrq_pretrain import BestRQPretrainConfig

    return BestRQPretrainConfig


def _speech_class() -> type:
    from mm.stages.speech import SpeechStageConfig

    return SpeechStageConfig


def _lm_config(cfg: Any, out: Path, data_dir: Path) -> None:
    text = data_dir / "text"
    cfg.data = [DataSourceConfig(paths=[str(text / "train.txt")], name="shapes", doc_split="line")]
    cfg.heldout = [DataSourceConfig(paths=[str(text / "heldout.txt")], name="heldout", doc_split="line")]
    cfg.anneal.source = "shapes"


def _clip_config(cfg: Any, out: Path, data_dir: Path) -> None:
    sh = data_dir / "shapes"
    cfg.tokenizer = str(_final(out, "lm-pretrain"))
    cfg.data.train, cfg.data.heldout = [str(sh / "train.jsonl")], [str(sh / "heldout.jsonl")]


def _image_data(cfg: Any, out: Path, data_dir: Path) -> None:
    sh = data_dir / "shapes"
    cfg.lm = str(_final(out, "lm-pretrain"))
    cfg.data.train = [str(sh / "train.jsonl")]
    cfg.data.heldout = [str(sh / "heldout.jsonl"), str(sh / "heldout_pairs.jsonl")]


def _image_pretrain_config(cfg: Any, out: Path, data_dir: Path) -> None:
    _image_data(cfg, out, data_dir)
    cfg.encoder_weights = str(_final(out, "clip-pretrain") / "encoder.safetensors")
    cfg.init_from = None


def _image_anneal_config(cfg: Any, out: Path, data_dir: Path) -> None:
    _image_data(cfg, out, data_dir)
    cfg.encoder_weights = None
    cfg.init_from = str(_final(out, "image-pretrain"))


def _video_config(cfg: Any, out: Path, data_dir: Path) -> None:
    mo = data_dir / "motion"
    cfg.init_from = str(_final(out, "image-anneal"))
    cfg.data.train = [str(mo / "train.jsonl")]
    cfg.data.heldout = [str(mo / "heldout.jsonl"), str(mo / "heldout_pairs.jsonl")]


def _bestrq_config(cfg: Any, out: Path, data_dir: Path) -> None:
    sp = data_dir / "speech"
    cfg.data.train, cfg.data.heldout = [str(sp / "train.jsonl")], [str(sp / "heldout_voices.jsonl")]


def _speech_config(cfg: Any, out: Path, data_dir: Path) -> None:
    sp = data_dir / "speech"
    cfg.lm = str(_final(out, "lm-pretrain"))
    cfg.encoder_weights = str(_final(out, "bestrq-pretrain") / "encoder.safetensors")
    cfg.data.train = [str(sp / "train.jsonl")]
    cfg.data.heldout = [str(sp / "heldout_sentences.jsonl"), str(sp / "heldout_voices.jsonl")]


# -------------------------------------------------------------------------------- what steps contribute
def metric_curve(metrics: Path, key: str) -> list[dict[str, Any]]:
    """(step, value) of every record of `metrics.jsonl` that holds `key`."""
    out = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if key in r:
                    out.append({"step": r["step"], "value": r[key]})
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
    curve.append({"step": run.summary.get("step"), "value": final})
    return curve


def lm_figures(run: StepRun) -> dict[str, Any]:
    """Held-out perplexity (curve and final), greedy completions of `DEMO_PROMPTS` and the LM's fingerprint."""
    from mm.lm import Tokenizer, generate, load_hf
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
    from mm.datasets.images import read_manifest
    from mm.models.caption import caption_images, load_rgb
    from mm.models.loading import load_image_bundle

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


def speech_figures(run: StepRun) -> dict[str, Any]:
    """WER and exact match on held-out sentences and voices, where the errors come from, examples."""
    ev = run.summary.get("eval", {})
    sent, voices = ev.get("heldout_sentences", {}), ev.get("heldout_voices", {})
    return {
        "wer_heldout_sentences": sent.get("wer"),
        "wer_heldout_voices": voices.get("wer"),
        "wer_per_voice": voices.get("wer_per_voice"),
        "exact_match_heldout_sentences": sent.get("exact_match"),
        "exact_match_heldout_voices": voices.get("exact_match"),
        # Where the errors come from: the audio side alone (the adapter's CTC head, greedy) and the frozen LM
        # repeating the same sentences given as text (the ceiling of transcripts that the LM writes).
        "ctc_wer_heldout_sentences": sent.get("ctc_wer"),
        "ctc_wer_heldout_voices": voices.get("ctc_wer"),
        "lm_copy_wer_heldout_sentences": sent.get("lm_copy_wer"),
        "lm_copy_wer_heldout_voices": voices.get("lm_copy_wer"),
        "examples": {k: v.get("examples") for k, v in ev.items() if isinstance(v, dict)},
    }


_IMAGE_INPUTS = ("shapes/train.jsonl", "shapes/heldout.jsonl", "shapes/heldout_pairs.jsonl")

# The demo, in the order it runs. `mm demo --modality M` runs the `lm` section's steps, M's, and the sections
# of every step they need (video needs image-anneal: the whole image section runs first, cached).
STEPS: tuple[Step, ...] = (
    Step(
        "lm-pretrain",
        "lm",
        "lm/tiny.yaml",
        _lm_pretrain_class,
        _lm_config,
        world=("text",),
        inputs=("text/train.txt", "text/heldout.txt"),
        figures=lm_figures,
    ),
    Step(
        "clip-pretrain",
        "image",
        "encoders/clip_tiny.yaml",
        _clip_class,
        _clip_config,
        world=("shapes",),
        inputs=("shapes/train.jsonl",),
        needs=("lm-pretrain",),
        keep=("eval", "retrieval"),
    ),
    Step(
        "image-pretrain",
        "image",
        "stages/image_pretrain_tiny.yaml",
        _image_class,
        _image_pretrain_config,
        world=("shapes",),
        inputs=_IMAGE_INPUTS,
        needs=("lm-pretrain", "clip-pretrain"),
        keep=("eval", "retrieval"),
        curve=True,
    ),
    Step(
        "image-anneal",
        "image",
        "stages/image_anneal_tiny.yaml",
        _image_class,
        _image_anneal_config,
        world=("shapes",),
        inputs=_IMAGE_INPUTS,
        needs=("lm-pretrain", "image-pretrain"),
        keep=("eval", "retrieval"),
        curve=True,
        verify=True,
        figures=image_figures,
    ),
    Step(
        "video",
        "video",
        "stages/video_tiny.yaml",
        _video_class,
        _video_config,
        world=("motion",),
        inputs=("motion/train.jsonl", "motion/heldout.jsonl", "motion/heldout_pairs.jsonl"),
        needs=("lm-pretrain", "image-anneal"),
        keep=("eval", "retrieval"),
        curve=True,
        verify=True,
        figures=video_figures,
    ),
    Step(
        "bestrq-pretrain",
        "speech",
        "encoders/bestrq_tiny.yaml",
        _bestrq_class,
        _bestrq_config,
        world=("speech",),
        inputs=("speech/train.jsonl", "speech/train"),
        keep=("heldout",),
        loss_curve="masked_loss_curve",
    ),
    Step(
        "speech",
        "speech",
        "stages/speech_tiny.yaml",
        _speech_class,
        _speech_config,
        world=("speech",),
        inputs=(
            "speech/train.jsonl",
            "speech/train",
            "speech/heldout_sentences.jsonl",
            "speech/heldout_voices.jsonl",
        ),
        needs=("lm-pretrain", "bestrq-pretrain"),
        loss_curve="loss_curve",
        verify=True,
        figures=speech_figures,
    ),
)
