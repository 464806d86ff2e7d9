"""The shapes world's instruction data: conversations about images, clips and described scenes.

`synth_chat(out_dir)` writes `out_dir/chat/` (the chat JSONL format: one conversation per line, `messages`
with user content items `{"type": "image"|"video"|"text", ...}`, and the meta fields `family`, `phrasing`,
`media` (image, images, video or text), `captions` (the captions of the row's images or clip, in order) and,
for held-out colour-shape pairs, `pairs: "heldout"`):

- `text_train.jsonl`: text dialogues for the instruct LM: the user turn gives a scene in words (a caption
  sentence, a motion sentence, or two scenes as "first image: ...\\nsecond image: ...") then asks; 1-3 Q/A
  turns; canonical and training phrasings; every colour-shape pair, the held-out ones too. `describe` asks
  `describe the image.` (`describe the video.` for a motion sentence), the answer is the caption.
- `text_heldout.jsonl`: scenes never in `text_train.jsonl` (a caption's CRC32 bucket reserves them), one
  canonical question each, every family.
- `train.jsonl`: image QA (1-4 turns about one image, the image in the first user turn), two-image
  `which image has more shapes?` (answers the first / the second / neither equally often), video QA (1-3
  turns); training pairs only; canonical and training phrasings; shuffled.
- `heldout.jsonl`, `heldout_phrasings.jsonl`, `heldout_pairs.jsonl`: new images and clips, one question each,
  per family: canonical phrasings; held-out phrasings; images/clips of the held-out pairs.
- `images/*.png`, `clips/*.mp4` (8-frame H.264 clips); paths in the JSONL are relative to `out_dir/chat`.

Every file is a function of the seed (each conversation has its own random stream).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .chat_text import (
    IMAGE_FAMILIES,
    TRAIN_PHRASINGS,
    VIDEO_FAMILIES,
    chat_rng,
    more_counts,
    text_heldout_rows,
    text_train_rows,
)
from .files import write_lines
from .grammar import COLOR_SHAPE_PAIRS, DIRECTIONS, HELDOUT_PAIRS, TRAIN_PAIRS
from .images import Scene, random_scene, render_scene
from .questions import (
    BALANCED_ANSWERS,
    balanced_answer,
    clip_questions,
    conversation,
    draw_turns,
    pair_questions,
    pick_question,
    scene_questions,
)
from .video import MotionClip, encode_mp4, motion_clip

__all__ = [
    "CHAT_FILES",
    "CLIP_FRAMES",
    "DEFAULT_CHAT_COUNTS",
    "IMAGE_FAMILIES",
    "MORE_ANSWERS",
    "VIDEO_FAMILIES",
    "chat_counts",
    "synth_chat",
]

CHAT_FILES: tuple[str, ...] = (
    "text_train.jsonl",
    "text_heldout.jsonl",
    "train.jsonl",
    "heldout.jsonl",
    "heldout_phrasings.jsonl",
    "heldout_pairs.jsonl",
)
# Training rows per kind, and evaluation rows per family (two-image: in all) of each evaluation file.
DEFAULT_CHAT_COUNTS: dict[str, int] = {
    "image": 3000,
    "two_image": 800,
    "video": 600,
    "text": 8000,
    "eval_image": 40,
    "eval_video": 40,
    "eval_two_image": 60,
    "eval_text": 40,
}
MORE_ANSWERS: tuple[str, ...] = BALANCED_ANSWERS["more"]
CLIP_FRAMES = 8
_TRIES = 400
_BEFORE = 0.2  # share of training rows whose first question comes before the media


def chat_counts(n: int | None = None) -> dict[str, int]:
    """Row counts: the defaults, or scaled so that `n` image QA training rows are written (minimums kept)."""
    if n is None:
        return dict(DEFAULT_CHAT_COUNTS)
    if n < 1:
        raise ValueError(f"n (image QA training rows) must be at least 1, got {n}")
    scale = n / DEFAULT_CHAT_COUNTS["image"]
    least = {"two_image": 3, "eval_two_image": 3}
    return {k: max(least.get(k, 1), round(v * scale)) for k, v in DEFAULT_CHAT_COUNTS.items()}


class _Media:
    """Writes the conversations' images and clips under the chat folder; removes stale ones at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: set[str] = set()
        for sub in ("images", "clips"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def image(self, name: str, scene: Scene) -> dict:
        """Render a scene to images/{name}.png; the content item."""
        path = f"images/{name}.png"
        render_scene(scene).save(self.root / path, format="PNG")
        self.written.add(path)
        return {"type": "image", "path": path}

    def clip(self, name: str, clip: MotionClip) -> dict:
        """Encode a clip to clips/{name}.mp4; the content item."""
        path = f"clips/{name}.mp4"
        (self.root / path).write_bytes(encode_mp4(clip.frames()))
        self.written.add(path)
        return {"type": "video", "path": path}

    def prune(self) -> None:
        """Delete media of an earlier run that this run did not write."""
        for sub, ext in (("images", "png"), ("clips", "mp4")):
            for p in (self.root / sub).iterdir():
                name = f"{sub}/{p.name}"
                if re.fullmatch(rf"[a-z0-9]+_\d{{6}}(_[ab])?\.{ext}", p.name) and name not in self.written:
                    p.unlink()


def _with_text(items: list[dict], before: bool) -> Callable[[str], list]:
    """First user turn: the media items, then the question (or the question first)."""
    return lambda text: (
        [{"type": "text", "text": text}, *items] if before else [*items, {"type": "text", "text": text}]
    )


def _scene(rng: random.Random, bucket: int, heldout_pairs: bool, count: int | None = None) -> Scene:
    """A scene of training pairs, or (heldout_pairs) one holding a held-out pair; `count` objects if given."""
    for _ in range(_TRIES):
        if heldout_pairs:
            scene = random_scene(rng, bucket, COLOR_SHAPE_PAIRS, forced=rng.choice(HELDOUT_PAIRS))
        else:
            scene = random_scene(rng, bucket, TRAIN_PAIRS)
        if count is None or len(scene.objects) == count:
            return scene
    raise RuntimeError(f"no scene with {count} objects in {_TRIES} draws")


def _clip(rng: random.Random, i: int, heldout_pairs: bool) -> MotionClip:
    """An 8-frame clip of a training pair (or held-out pair i % 3) moving DIRECTIONS[i % 4]."""
    pair = HELDOUT_PAIRS[i % len(HELDOUT_PAIRS)] if heldout_pairs else rng.choice(TRAIN_PAIRS)
    clip = motion_clip(rng, pair, DIRECTIONS[i % len(DIRECTIONS)])
    return dataclasses.replace(clip, n_frames=CLIP_FRAMES)


def _train_image(media: _Media, seed: int, i: int) -> dict:
    """Image QA for training: a new image of training pairs, 1-4 questions about it."""
    rng = chat_rng(seed, "train/image", i)
    scene = _scene(rng, i % 8, False)
    turns = draw_turns(scene_questions(scene), IMAGE_FAMILIES, rng, rng.randint(1, 4), TRAIN_PHRASINGS)
    first = _with_text([media.image(f"train_{i:06d}", scene)], rng.random() < _BEFORE)
    return {**conversation(first, turns, "image", False), "captions": [scene.caption]}


def _train_video(media: _Media, seed: int, i: int) -> dict:
    """Video QA for training: a new clip of a training pair, 1-3 questions about it."""
    rng = chat_rng(seed, "train/video", i)
    clip = _clip(rng, i, False)
    questions = clip_questions(clip.color, clip.shape, clip.direction)
    turns = draw_turns(questions, VIDEO_FAMILIES, rng, rng.randint(1, 3), TRAIN_PHRASINGS)
    first = _with_text([media.clip(f"train_{i:06d}", clip)], rng.random() < _BEFORE)
    return {**conversation(first, turns, "video", False), "captions": [clip.caption]}


def _two_images(
    media: _Media, name: str, rng: random.Random, i: int, phrasing: str, heldout_pairs: bool, before: bool
) -> dict:
    """Two images in order and `which image has more shapes?`; the answer is MORE_ANSWERS[i % 3]."""
    counts = more_counts(MORE_ANSWERS[i % len(MORE_ANSWERS)], rng)
    held = rng.randrange(2) if heldout_pairs else -1  # which image holds a held-out pair
    scenes = [_scene(rng, rng.randrange(8), k == held, counts[k]) for k in range(2)]
    q = pair_questions(*scenes)[0]
    items = [media.image(f"{name}_{ab}", s) for ab, s in zip("ab", scenes)]
    turn = (q, phrasing, q.text(phrasing, rng.randrange(16)))
    record = conversation(_with_text(items, before), [turn], "images", heldout_pairs)
    return {**record, "captions": [s.caption for s in scenes]}


def _train_rows(media: _Media, seed: int, counts: dict[str, int]) -> list[dict]:
    """train.jsonl: image QA, two-image and video QA rows of training pairs, shuffled."""
    rows = [_train_image(media, seed, i) for i in range(counts["image"])]
    for i in range(counts["two_image"]):
        rng = chat_rng(seed, "train/two", i)
        phrasing = rng.choice(TRAIN_PHRASINGS)
        rows.append(_two_images(media, f"train2_{i:06d}", rng, i, phrasing, False, rng.random() < _BEFORE))
    rows += [_train_video(media, seed, i) for i in range(counts["video"])]
    chat_rng(seed, "train/shuffle").shuffle(rows)
    return rows


def _eval_image(
    media: _Media, name: str, rng: random.Random, i: int, ask: tuple[str, str, bool, int]
) -> dict:
    """One question of a family about a new image (held-out pair images ask about the held-out object)."""
    family, phrasing, heldout_pairs, j = ask
    answer = balanced_answer(family, j)
    prefer = HELDOUT_PAIRS if heldout_pairs else ()
    for _ in range(_TRIES):
        scene = _scene(rng, i % 8, heldout_pairs)
        q = pick_question(scene_questions(scene), family, rng, prefer=prefer, answer=answer)
        if q is not None:
            break
    else:
        raise RuntimeError(f"no scene for a {family} question answered {answer!r} in {_TRIES} draws")
    first = _with_text([media.image(name, scene)], False)
    record = conversation(first, [(q, phrasing, q.text(phrasing, rng.randrange(16)))], "image", heldout_pairs)
    return {**record, "captions": [scene.caption]}


def _eval_video(
    media: _Media, name: str, rng: random.Random, i: int, ask: tuple[str, str, bool, int]
) -> dict:
    """One question of a family about a new clip (moving DIRECTIONS[i % 4])."""
    family, phrasing, heldout_pairs, _ = ask
    clip = _clip(rng, i, heldout_pairs)
    q = pick_question(clip_questions(clip.color, clip.shape, clip.direction), family, rng)
    if q is None:
        raise ValueError(
            f"{family} is not a video question family; expected one of {', '.join(VIDEO_FAMILIES)}"
        )
    first = _with_text([media.clip(name, clip)], False)
    record = conversation(first, [(q, phrasing, q.text(phrasing, rng.randrange(16)))], "video", heldout_pairs)
    return {**record, "captions": [clip.caption]}


def _eval_rows(media: _Media, seed: int, counts: dict[str, int], tag: str, phrasing: str) -> list[dict]:
    """An evaluation file: one question per new image / clip / image pair, per family; `tag` names media."""
    heldout_pairs = tag == "pairs"
    rows = []
    for kind, families, make in (
        ("image", IMAGE_FAMILIES, _eval_image),
        ("video", VIDEO_FAMILIES, _eval_video),
    ):
        k = counts[f"eval_{kind}"]
        for f, family in enumerate(families):
            for j in range(k):
                i = f * k + j
                rng = chat_rng(seed, tag, kind, i)
                rows.append(make(media, f"{tag}_{i:06d}", rng, i, (family, phrasing, heldout_pairs, j)))
    for i in range(counts["eval_two_image"]):
        rng = chat_rng(seed, tag, "two", i)
        rows.append(_two_images(media, f"{tag}2_{i:06d}", rng, i, phrasing, heldout_pairs, False))
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_lines(path, [json.dumps(r, ensure_ascii=False) for r in rows])


def synth_chat(out_dir: str | os.PathLike[str], n: int | None = None, seed: int = 0) -> Path:
    """Write the chat files (CHAT_FILES) and their media under `out_dir/chat`; return that folder.

    `n` is the number of image QA training rows (default 3000); the other counts scale with it
    (`chat_counts`). The same (n, seed) gives the same files.
    """
    counts = chat_counts(n)
    root = Path(out_dir) / "chat"
    root.mkdir(parents=True, exist_ok=True)
    media = _Media(root)
    _write_jsonl(root / "text_train.jsonl", text_train_rows(seed, counts["text"]))
    _write_jsonl(root / "text_heldout.jsonl", text_heldout_rows(seed, counts["eval_text"]))
    _write_jsonl(root / "train.jsonl", _train_rows(media, seed, counts))
    _write_jsonl(root / "heldout.jsonl", _eval_rows(media, seed, counts, "heldout", "canonical"))
    _write_jsonl(root / "heldout_phrasings.jsonl", _eval_rows(media, seed, counts, "phrasings", "heldout"))
    _write_jsonl(root / "heldout_pairs.jsonl", _eval_rows(media, seed, counts, "pairs", "canonical"))
    media.prune()
    return root
