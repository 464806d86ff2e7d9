"""Text dialogues about the shapes world, for the instruct LM (`text_train.jsonl`, `text_heldout.jsonl`).

The user turn gives a scene in words, then asks: a caption sentence ("a large red circle and a small
blue square.\\nwhat colour is the circle?"), a motion sentence ("a red circle moves left.\\nwhich way does
the circle move?") or two scenes ("first image: ...\\nsecond image: ...\\nwhich image has more shapes?").
`describe` asks `describe the image.` (`describe the video.` after a motion sentence): the text stands for the
picture, so the instruct LM learns the same questions the image and video stages ask. Every colour-shape pair
occurs, the held-out ones too (as in the LM's text corpus); a scene whose text falls in CRC32 bucket 0 of 8 is
kept for `text_heldout.jsonl`, so its scenes are new.
"""

from __future__ import annotations

import random
import zlib

from .grammar import COLOR_SHAPE_PAIRS, DIRECTIONS, HELDOUT_PAIRS, SIZES
from .questions import (
    BALANCED_ANSWERS,
    FAMILIES,
    Question,
    balanced_answer,
    clip_questions,
    clip_text,
    conversation,
    draw_turns,
    pair_questions,
    pair_text,
    pick_question,
    scene_questions,
    scene_text,
)

__all__ = [
    "IMAGE_FAMILIES",
    "TRAIN_PHRASINGS",
    "VIDEO_FAMILIES",
    "chat_rng",
    "more_counts",
    "text_heldout_rows",
    "text_is_heldout",
    "text_train_rows",
]

IMAGE_FAMILIES: tuple[str, ...] = ("colour", "shape", "size", "count", "exists", "left", "describe")
VIDEO_FAMILIES: tuple[str, ...] = ("motion", "colour", "shape", "describe")
TRAIN_PHRASINGS: tuple[str, ...] = ("canonical", "train")
_FAMILIES_OF = {"scene": IMAGE_FAMILIES, "clip": VIDEO_FAMILIES, "pair": ("more",)}
_HELDOUT_BUCKETS = 8
_TRIES = 400


def chat_rng(seed: int, *parts: object) -> random.Random:
    """The random stream of one conversation (its own: the first k rows do not depend on how many follow)."""
    return random.Random("mm.chat/" + "/".join(str(p) for p in (seed, *parts)))


def text_is_heldout(text: str) -> bool:
    """True if a described scene is reserved for text_heldout.jsonl (CRC32 of its text, bucket 0 of 8)."""
    return zlib.crc32(text.encode("utf-8")) % _HELDOUT_BUCKETS == 0


def more_counts(answer: str, rng: random.Random) -> tuple[int, int]:
    """Object counts of two scenes whose `which image has more shapes?` answer is `answer`."""
    if answer not in BALANCED_ANSWERS["more"]:
        raise ValueError(f"unknown answer {answer!r}; expected one of {', '.join(BALANCED_ANSWERS['more'])}")
    return {"the first": (2, 1), "the second": (1, 2)}.get(answer) or rng.choice(((1, 1), (2, 2)))


def _objects(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """`count` (size, colour, shape) objects of any pair, left to right."""
    return [(rng.choice(SIZES), *rng.choice(COLOR_SHAPE_PAIRS)) for _ in range(count)]


def _text_world(
    rng: random.Random, kind: str, heldout: bool, more: str | None = None
) -> tuple[str, list[Question], bool]:
    """A described scene (`scene`, `clip` or `pair`; a pair with `more`'s answer) in the train or held-out
    bucket: its text, its questions, and whether a held-out colour-shape pair is in it."""
    for _ in range(_TRIES):
        if kind == "clip":
            colour, shape = rng.choice(COLOR_SHAPE_PAIRS)
            direction = rng.choice(DIRECTIONS)
            text, questions = clip_text(colour, shape, direction), clip_questions(colour, shape, direction)
            pairs = [(colour, shape)]
        elif kind == "pair":
            counts = more_counts(more or rng.choice(BALANCED_ANSWERS["more"]), rng)
            scenes = [_objects(rng, c) for c in counts]
            text, questions = pair_text(*scenes), pair_questions(*scenes)
            pairs = [(c, s) for objs in scenes for _, c, s in objs]
        else:
            objs = _objects(rng, rng.choice((1, 2)))
            text, questions = scene_text(objs), scene_questions(objs)
            pairs = [(c, s) for _, c, s in objs]
        if text_is_heldout(text) == heldout:
            return text, questions, any(p in HELDOUT_PAIRS for p in pairs)
    raise RuntimeError(f"no {kind} text in the {'held-out' if heldout else 'train'} bucket in {_TRIES} draws")


def _text_record(text: str, turns: list, heldout_pairs: bool) -> dict:
    """A text dialogue: the scene's text and the first question in the first user turn."""
    return conversation(lambda question: f"{text}\n{question}", turns, "text", heldout_pairs)


def text_train_rows(seed: int, count: int) -> list[dict]:
    """text_train.jsonl: 1-3 questions (canonical and training phrasings) about a described scene (75%), clip
    (15%) or pair of scenes (10%, one question)."""
    rows = []
    for i in range(count):
        rng = chat_rng(seed, "text/train", i)
        r = rng.random()
        kind = "scene" if r < 0.75 else "clip" if r < 0.9 else "pair"
        text, questions, held = _text_world(rng, kind, heldout=False)
        turns = draw_turns(questions, _FAMILIES_OF[kind], rng, rng.randint(1, 3), TRAIN_PHRASINGS)
        rows.append(_text_record(text, turns, held))
    return rows


def text_heldout_rows(seed: int, per_family: int) -> list[dict]:
    """text_heldout.jsonl: new described scenes, one canonical question each, `per_family` rows of every
    family (balanced answers for size, count, exists, motion and more; colour, shape and describe alternate
    scenes and clips)."""
    rows = []
    for f, family in enumerate(FAMILIES):
        for j in range(per_family):
            rng = chat_rng(seed, "text/heldout", f * per_family + j)
            kind = {"motion": "clip", "more": "pair"}.get(family, "scene")
            if family in ("colour", "shape", "describe") and j % 2:
                kind = "clip"
            answer = balanced_answer(family, j)
            for _ in range(_TRIES):
                text, questions, held = _text_world(rng, kind, True, answer if kind == "pair" else None)
                q = pick_question(questions, family, rng, answer=answer)
                if q is not None:
                    break
            else:
                raise RuntimeError(f"no held-out text scene for a {family} question answered {answer!r}")
            rows.append(_text_record(text, [(q, "canonical", q.text("canonical"))], held))
    return rows
