"""The shapes world of `mm demo`: each part (text, images and their robustness variants, clips, speech) is
synthesised into `OUT/data` when missing."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm import world

IMAGE_COUNTS = {"train": 4000, "heldout": 200, "heldout_pairs": 200}
MOTION_COUNTS = {"train": 2000, "heldout": 200, "heldout_pairs": 120}
# Robustness variants of the image world (`world.synth_shapes_variants`), captioned by the image-anneal bundle.
VARIANT_COUNTS = {"jpeg": 100, "antialias": 100, "sizes": 100}


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
        lambda s: world.synth_text(
            data_dir,
            split=s,
            seed=0,
            translate_fraction=world.TRANSLATE_FRACTION,
            question_fraction=world.QUESTION_FRACTION,
            scramble_fraction=world.SCRAMBLE_FRACTION,
        ),
        ["train", "heldout"],
    )


def synth_image_world(data_dir: Path) -> dict[str, float]:
    """The shapes images (`IMAGE_COUNTS`) and their robustness variants unless present; seconds per split."""
    sh = data_dir / "shapes"
    spent = _synth_splits(
        lambda s: (sh / f"{s}.jsonl").is_file(),
        lambda s: world.synth_shapes(data_dir, n=IMAGE_COUNTS[s], seed=0, split=s),
        list(IMAGE_COUNTS),
    )
    spent.update(
        _synth_splits(
            lambda s: (sh / f"{s}.jsonl").is_file(),
            lambda s: world.synth_shapes_variants(
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
        lambda s: world.synth_motion(data_dir, n=MOTION_COUNTS[s], seed=0, split=s),
        list(MOTION_COUNTS),
    )


def synth_speech_world(data_dir: Path) -> dict[str, float]:
    """The spoken shapes world's splits (espeak-ng) unless present; seconds per split."""
    from mm.world.speech import (
        DEFAULT_SPEECH_COUNTS,
        merge_manifests,
        synth_long_recording,
        synth_speech,
    )

    spent = _synth_splits(
        lambda s: (data_dir / "speech" / f"{s}.jsonl").is_file(),
        lambda s: synth_speech(data_dir, n=DEFAULT_SPEECH_COUNTS[s], seed=0, split=s),
        [s for s in DEFAULT_SPEECH_COUNTS if s != "train_scrambled"],  # the demo does not train on it
    )
    spent.update(  # the speech stage's one training manifest: sentences and spoken questions
        _synth_splits(
            lambda s: (data_dir / "speech" / f"{s}.jsonl").is_file(),
            lambda s: merge_manifests(data_dir, ["train", "questions_train"], s),
            ["train_mix"],
        )
    )
    spent.update(  # the 60-s recording with pauses that the demo transcribes whole
        _synth_splits(
            lambda s: (data_dir / "speech" / "long_recording.json").is_file(),
            lambda s: synth_long_recording(data_dir, seconds=60.0, seed=0),
            ["long_recording"],
        )
    )
    return spent


def synth_chat_world(data_dir: Path) -> dict[str, float]:
    """The questions and answers about the world (`world.synth_chat`: text dialogues, images, two-image
    questions, clips) unless present; seconds."""
    return _synth_splits(
        lambda s: (data_dir / "chat" / "train.jsonl").is_file(),
        lambda s: world.synth_chat(data_dir, seed=0),
        ["chat"],
    )


# The parts of the shapes world, by the names steps give in `Step.world`.
WORLD: dict[str, Callable[[Path], dict[str, float]]] = {
    "text": synth_text_world,
    "shapes": synth_image_world,
    "motion": synth_motion_world,
    "speech": synth_speech_world,
    "chat": synth_chat_world,
}


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
