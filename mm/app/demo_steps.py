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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from mm.app.demo_figures import image_figures, lm_figures, video_figures
from mm.app.demo_speech import speech_figures
from mm.training.config import DataSourceConfig, load_config

log = logging.getLogger("mm.app.demo")

T = TypeVar("T")


# ------------------------------------------------------------------------------------ presets, hashes


def load_preset(cls: type[T], name: str) -> T:
    """Read a preset shipped in `mm.configs` (e.g. `lm/tiny.yaml`) as `cls`, installed or editable."""
    ref = resources.files("mm.configs").joinpath(*name.split("/"))
    with resources.as_file(ref) as path:
        return load_config(cls, path)


# ------------------------------------------------------------------------------------- the shapes world


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
        from mm.training.stage import stage_class

        cfg = load_preset(stage_class(self.name).config_class, self.preset)
        self.configure(cfg, out, data_dir)
        cfg.out = str(out / self.name)
        return cfg


def _final(out: Path, step: str) -> Path:
    return out / step / "final"


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


# The speech stage's held-out manifests (`mm.world.speech` splits), the first one also heard under each condition.
SPEECH_HELDOUT = (
    "heldout_sentences",
    "heldout_voices",
    "questions_heldout",
    "untrained_forms",
    "untrained_voices",
)


def _speech_config(cfg: Any, out: Path, data_dir: Path) -> None:
    sp = data_dir / "speech"
    cfg.lm = str(_final(out, "lm-pretrain"))
    cfg.encoder_weights = str(_final(out, "bestrq-pretrain") / "encoder.safetensors")
    cfg.data.train = [str(sp / "train_mix.jsonl")]  # sentences (ASR, AST) and spoken questions
    cfg.data.heldout = [str(sp / f"{s}.jsonl") for s in SPEECH_HELDOUT]
    cfg.data.ast_fraction = 0.3
    cfg.data.conditions = ["snr20", "snr10", "telephone", "quiet", "loud", "silences"]
    cfg.data.condition_prob = 0.5
    cfg.eval_conditions = ["clean", "snr10", "snr5", "telephone", "mp3", "ogg", "quiet", "loud", "silences"]


def lm_sft_figures(run: StepRun) -> dict[str, Any]:
    """The instruct LM's figures (`mm.app.demo_chat`)."""
    from mm.app.demo_chat import lm_sft_figures as figures

    return figures(run)


def chat_figures(run: StepRun) -> dict[str, Any]:
    """The chat model's figures (`mm.app.demo_chat`)."""
    from mm.app.demo_chat import chat_figures as figures

    return figures(run)


def _lm_sft_config(cfg: Any, out: Path, data_dir: Path) -> None:
    ch, text = data_dir / "chat", data_dir / "text"
    cfg.init_from = str(_final(out, "lm-pretrain"))
    cfg.data.train = [str(ch / "text_train.jsonl")]
    cfg.data.text = [str(text / "train.txt")]
    cfg.data.heldout_text = [str(text / "heldout.txt")]
    cfg.data.heldout_chat = [str(ch / "text_heldout.jsonl")]


def _vision_sft_config(cfg: Any, out: Path, data_dir: Path) -> None:
    ch = data_dir / "chat"
    cfg.init_from = str(_final(out, "video"))
    cfg.lm = str(_final(out, "lm-sft"))
    cfg.data.train = [str(ch / "train.jsonl")]
    cfg.data.heldout = [str(ch / f"{s}.jsonl") for s in ("heldout", "heldout_phrasings", "heldout_pairs")]
    cfg.caption_heldout = str(data_dir / "shapes" / "heldout.jsonl")


# -------------------------------------------------------------------------------- what steps contribute


_IMAGE_INPUTS = ("shapes/train.jsonl", "shapes/heldout.jsonl", "shapes/heldout_pairs.jsonl")

# The demo, in the order it runs. `mm demo --modality M` runs the `lm` section's steps, M's, and the sections
# of every step they need (video needs image-anneal: the whole image section runs first, cached).
STEPS: tuple[Step, ...] = (
    Step(
        "lm-pretrain",
        "lm",
        "lm/tiny.yaml",
        _lm_config,
        world=("text",),
        inputs=("text/train.txt", "text/heldout.txt"),
        figures=lm_figures,
    ),
    Step(
        "clip-pretrain",
        "image",
        "encoders/clip_tiny.yaml",
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
        _speech_config,
        world=("speech",),
        inputs=(
            "speech/train_mix.jsonl",
            "speech/train",
            "speech/questions_train",
            *(f"speech/{s}.jsonl" for s in SPEECH_HELDOUT),
        ),
        needs=("lm-pretrain", "bestrq-pretrain"),
        loss_curve="loss_curve",
        verify=True,
        figures=speech_figures,
    ),
    # The chat section (`mm demo --modality chat`, not part of `all`: it runs on top of the cached main stages).
    Step(
        "lm-sft",
        "chat",
        "lm/sft_tiny.yaml",
        _lm_sft_config,
        world=("text", "chat"),
        inputs=("chat/text_train.jsonl", "chat/text_heldout.jsonl", "text/train.txt", "text/heldout.txt"),
        needs=("lm-pretrain",),
        figures=lm_sft_figures,
    ),
    Step(
        "vision-sft",
        "chat",
        "stages/vision_sft_tiny.yaml",
        _vision_sft_config,
        world=("shapes", "chat"),
        inputs=(
            "chat/train.jsonl",
            "chat/heldout.jsonl",
            "chat/heldout_phrasings.jsonl",
            "chat/heldout_pairs.jsonl",
            "chat/images",
            "chat/clips",
            "shapes/heldout.jsonl",
        ),
        needs=("lm-sft", "video"),
        keep=("eval", "hot_swap"),
        curve=True,
        verify=True,
        figures=chat_figures,
    ),
)
