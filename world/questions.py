"""Questions about the shapes world (design.md, "Questions about the world"): phrasings and answers.

Each question family has a canonical phrasing (the design table's wording), other phrasings used in training
(`train`) and phrasings held out of every training file (`heldout`, to measure how the model generalises to
new wordings). `scene_questions` lists every question that may be asked about a scene (one or two objects),
`clip_questions` those about a moving-object clip, `pair_questions` the question about two scenes; each
`Question` carries its family, its answer (short, lower case, no final full stop) and the colour-shape pairs
its answer is about. `scene_text` / `clip_text` / `pair_text` give a scene in words for text dialogues;
`pick_question` / `draw_turns` choose questions (answers balanced) and `conversation` makes a chat record.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .grammar import COLORS, DIRECTIONS, SHAPES, SIZES, caption, check_word, motion_caption

__all__ = [
    "BALANCED_ANSWERS",
    "FAMILIES",
    "PHRASINGS",
    "TEMPLATES",
    "Question",
    "Template",
    "Turn",
    "balanced_answer",
    "clip_questions",
    "clip_text",
    "conversation",
    "draw_turns",
    "pair_questions",
    "pair_text",
    "pick_question",
    "scene_objects",
    "scene_questions",
    "scene_text",
]

FAMILIES: tuple[str, ...] = (
    "colour",
    "shape",
    "size",
    "count",
    "exists",
    "left",
    "motion",
    "more",
    "describe",
)
PHRASINGS: tuple[str, ...] = ("canonical", "train", "heldout")
_NUMBERS = {1: "one", 2: "two"}
# Answers that evaluation files give in turn (equally often) per family.
BALANCED_ANSWERS: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "count": ("one", "two"),
    "exists": ("yes", "no"),
    "motion": DIRECTIONS,
    "more": ("the first", "the second", "neither"),
}


@dataclass(frozen=True)
class Template:
    """One kind of question: its family, the canonical wording, training wordings and held-out wordings."""

    key: str
    family: str
    canonical: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def wordings(self, phrasing: str) -> tuple[str, ...]:
        """The wordings of a phrasing kind (`canonical`, `train` or `heldout`)."""
        check_word(phrasing, PHRASINGS, "phrasing")
        return (self.canonical,) if phrasing == "canonical" else getattr(self, phrasing)


def _t(key: str, family: str, canonical: str, train: Sequence[str], heldout: Sequence[str]) -> Template:
    return Template(key, family, canonical, tuple(train), tuple(heldout))


# Slots: {shape}, {shape2}, {colour}. "a" before a vowel becomes "an" ("is there an orange object?").
TEMPLATES: dict[str, Template] = {
    t.key: t
    for t in (
        _t(
            "colour",
            "colour",
            "what colour is the {shape}?",
            ["what is the colour of the {shape}?", "which colour is the {shape}?"],
            ["tell me the colour of the {shape}.", "the {shape} has which colour?"],
        ),
        _t(
            "shape",
            "shape",
            "what shape is the {colour} object?",
            ["what is the shape of the {colour} object?", "which shape is the {colour} object?"],
            ["tell me the shape of the {colour} object.", "the {colour} object has which shape?"],
        ),
        _t(
            "size",
            "size",
            "what size is the {colour} {shape}?",
            ["is the {colour} {shape} small or large?", "how big is the {colour} {shape}?"],
            ["tell me the size of the {colour} {shape}.", "the {colour} {shape} has which size?"],
        ),
        _t(
            "count",
            "count",
            "how many shapes are there?",
            ["how many objects are there?", "what is the number of shapes?"],
            ["tell me how many shapes there are.", "count the shapes."],
        ),
        _t(
            "exists_shape",
            "exists",
            "is there a {shape}?",
            ["can you see a {shape}?", "is any {shape} there?"],
            ["tell me whether there is a {shape}.", "does a {shape} appear?"],
        ),
        _t(
            "exists_colour",
            "exists",
            "is there a {colour} object?",
            ["can you see a {colour} object?", "is any object {colour}?"],
            ["tell me whether there is a {colour} object.", "does a {colour} object appear?"],
        ),
        _t(
            "left",
            "left",
            "which is on the left, the {shape} or the {shape2}?",
            [
                "which is further left, the {shape} or the {shape2}?",
                "which one is on the left: the {shape} or the {shape2}?",
            ],
            [
                "tell me which is on the left, the {shape} or the {shape2}.",
                "of the {shape} and the {shape2}, which is on the left?",
            ],
        ),
        _t(
            "motion",
            "motion",
            "which way does the {shape} move?",
            ["which direction does the {shape} move in?", "where does the {shape} move?"],
            ["tell me which way the {shape} moves.", "in what direction is the {shape} moving?"],
        ),
        _t(
            "more",
            "more",
            "which image has more shapes?",
            ["which image has more objects?", "which image shows more shapes?"],
            ["tell me which image has more shapes.", "which picture has more shapes?"],
        ),
        _t(
            "describe_image",
            "describe",
            "describe the image.",
            ["what is in the image?", "what does the image show?"],
            ["tell me what is in the image.", "give a description of the image."],
        ),
        _t(
            "describe_video",
            "describe",
            "describe the video.",
            ["what happens in the video?", "what does the video show?"],
            ["tell me what happens in the video.", "give a description of the video."],
        ),
    )
}


def _fill(wording: str, slots: dict[str, str]) -> str:
    """Fill a wording's slots; "a" before a vowel becomes "an"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", wording.format(**slots))


@dataclass(frozen=True)
class Question:
    """A question that may be asked: template key, slot values, answer, the colour-shape pairs it is about."""

    key: str
    slots: tuple[tuple[str, str], ...]
    answer: str
    about: tuple[tuple[str, str], ...] = ()

    @property
    def family(self) -> str:
        """The question family (FAMILIES)."""
        return TEMPLATES[self.key].family

    def wordings(self, phrasing: str) -> list[str]:
        """Every wording of this question in a phrasing kind."""
        return [_fill(w, dict(self.slots)) for w in TEMPLATES[self.key].wordings(phrasing)]

    def text(self, phrasing: str = "canonical", variant: int = 0) -> str:
        """The question in a phrasing kind; `variant` picks one of the kind's wordings (modulo)."""
        options = self.wordings(phrasing)
        return options[variant % len(options)]


def _q(key: str, answer: str, about: Sequence[tuple[str, str]] = (), **slots: str) -> Question:
    return Question(key, tuple(sorted(slots.items())), answer, tuple(about))


def scene_objects(scene: object) -> list[tuple[str, str, str]]:
    """(size, colour, shape) of a scene's objects left to right (a `Scene` or a list of triples)."""
    objects = getattr(scene, "objects", scene)
    out = []
    for obj in objects:  # type: ignore[union-attr]
        triple = (obj.size, obj.color, obj.shape) if hasattr(obj, "shape") else tuple(obj)
        if len(triple) != 3:
            raise ValueError(f"a scene object must be (size, colour, shape), got {obj!r}")
        out.append(triple)
    if not 1 <= len(out) <= 2:
        raise ValueError(f"a scene holds one or two objects, got {len(out)}")
    return out


def scene_questions(scene: object) -> list[Question]:
    """Every question that may be asked about a scene (`Scene`, or (size, colour, shape) left to right)."""
    objs = scene_objects(scene)
    pairs = [(c, s) for _, c, s in objs]
    out: list[Question] = []
    for size, colour, shape in objs:
        if sum(s == shape for _, s in pairs) == 1:
            out.append(_q("colour", colour, [(colour, shape)], shape=shape))
        if sum(c == colour for c, _ in pairs) == 1:
            out.append(_q("shape", shape, [(colour, shape)], colour=colour))
        if pairs.count((colour, shape)) == 1:
            out.append(_q("size", size, [(colour, shape)], colour=colour, shape=shape))
    out.append(_q("count", _NUMBERS[len(objs)], pairs))
    for shape in SHAPES:
        present = [p for p in pairs if p[1] == shape]
        out.append(_q("exists_shape", "yes" if present else "no", present, shape=shape))
    for colour in COLORS:
        present = [p for p in pairs if p[0] == colour]
        out.append(_q("exists_colour", "yes" if present else "no", present, colour=colour))
    if len(objs) == 2 and pairs[0][1] != pairs[1][1]:
        first, second = pairs[0][1], pairs[1][1]
        out.append(_q("left", f"the {first}", pairs, shape=first, shape2=second))
        out.append(_q("left", f"the {first}", pairs, shape=second, shape2=first))
    out.append(_q("describe_image", caption(objs), pairs))
    return out


def clip_questions(colour: str, shape: str, direction: str) -> list[Question]:
    """Every question that may be asked about a clip of a (colour, shape) object moving in `direction`."""
    about = [(colour, shape)]
    return [
        _q("motion", direction, about, shape=shape),
        _q("colour", colour, about, shape=shape),
        _q("shape", shape, about, colour=colour),
        _q("describe_video", motion_caption(colour, shape, direction), about),
    ]


def pair_questions(first: object, second: object) -> list[Question]:
    """The questions about two scenes in order: `which image has more shapes?`."""
    a, b = scene_objects(first), scene_objects(second)
    answer = "the first" if len(a) > len(b) else "the second" if len(b) > len(a) else "neither"
    return [_q("more", answer, [(c, s) for _, c, s in a + b])]


def scene_text(scene: object) -> str:
    """A scene in words for a text dialogue: its caption as a sentence ("a large red circle.")."""
    return caption(scene_objects(scene)) + "."


def clip_text(colour: str, shape: str, direction: str) -> str:
    """A clip in words for a text dialogue: "a red circle moves left."."""
    return motion_caption(colour, shape, direction) + "."


def pair_text(first: object, second: object) -> str:
    """Two scenes in words: "first image: a large red circle.\\nsecond image: a small blue square."."""
    return f"first image: {scene_text(first)}\nsecond image: {scene_text(second)}"


def pick_question(
    questions: Sequence[Question],
    family: str,
    rng: random.Random,
    prefer: Sequence[tuple[str, str]] = (),
    answer: str | None = None,
) -> Question | None:
    """A question of a family, its answer drawn uniformly first (exists: yes and no alike); None if none.

    With `prefer`, questions about one of those colour-shape pairs are chosen when the family has any (not for
    exists, count, describe and more, whose answers must stay balanced); with `answer`, only that answer.
    """
    pool = [q for q in questions if q.family == family and (answer is None or q.answer == answer)]
    preferred = [q for q in pool if set(q.about) & set(prefer)]
    if preferred and family not in ("exists", "count", "describe", "more"):
        pool = preferred
    if not pool:
        return None
    answers = sorted({q.answer for q in pool})
    chosen = rng.choice(answers)
    return rng.choice([q for q in pool if q.answer == chosen])


def balanced_answer(family: str, j: int) -> str | None:
    """The answer the j-th evaluation question of a family should have (answers in turn), or None if open."""
    answers = BALANCED_ANSWERS.get(family)
    return answers[j % len(answers)] if answers else None


Turn = tuple[Question, str, str]  # the question, its phrasing kind, its text


def draw_turns(
    questions: Sequence[Question],
    families: Sequence[str],
    rng: random.Random,
    n_turns: int,
    phrasings: Sequence[str],
) -> list[Turn]:
    """Up to n_turns distinct questions: family drawn among those the scene has (left twice as often, being
    rarer), phrasing kind uniformly from `phrasings`, wording uniformly from that kind."""
    families = [f for f in families if any(q.family == f for q in questions)]
    families += [f for f in families if f == "left"]
    out: list[Turn] = []
    asked: set[str] = set()
    for _ in range(20 * n_turns if families else 0):
        if len(out) == n_turns:
            break
        q = pick_question(questions, rng.choice(families), rng)
        phrasing = rng.choice(phrasings)
        text = q.text(phrasing, rng.randrange(16)) if q else ""
        if q and text not in asked:
            asked.add(text)
            out.append((q, phrasing, text))
    return out


def conversation(
    first: Callable[[str], list | str], turns: Sequence[Turn], media: str, heldout_pairs: bool
) -> dict:
    """A chat record: `first(text)` is the first user turn's content, later user turns are the bare questions;
    meta `family` and `phrasing` of the last question, `media`, and `pairs: "heldout"` if `heldout_pairs`."""
    if not turns:
        raise ValueError("a conversation needs at least one question")
    messages: list[dict] = []
    for k, (q, _, text) in enumerate(turns):
        messages.append({"role": "user", "content": first(text) if k == 0 else text})
        messages.append({"role": "assistant", "content": q.answer})
    q, phrasing, _ = turns[-1]
    record = {"messages": messages, "family": q.family, "phrasing": phrasing, "media": media}
    if heldout_pairs:
        record["pairs"] = "heldout"
    return record
