"""The shapes world's vocabulary and the exact wording of its captions and sentences.

The world (see `shared/design.md`, "The embedded default: the shapes world") has objects of a shape, a colour
and a size; images hold one or two of them, videos one moving object, speech clips speak sentences of the
world. The constants and helpers here are the single source of that vocabulary and of the wording of
captions, so the image, video and speech generators and the LM text corpus all agree.

Held-out colour-shape pairs (`HELDOUT_PAIRS`) never occur in image, video or speech training data but do occur
in the text corpus (compositional generalisation is measured on them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = [
    "COLORS",
    "COLOR_SHAPE_PAIRS",
    "DIRECTIONS",
    "HELDOUT_PAIRS",
    "SHAPES",
    "SIZES",
    "TRAIN_PAIRS",
    "caption",
    "check_word",
    "is_heldout",
    "motion_caption",
    "object_phrase",
    "parse_caption",
    "random_object",
    "random_sentence",
]

# Colour name -> RGB (design.md). Dict order is the canonical colour order.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# (colour, shape) pairs kept out of all image, video and speech training data; present in the text corpus.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("purple", "circle"),
    ("orange", "square"),
)

# All 18 (colour, shape) pairs in canonical order, and the 15 that training media may use.
COLOR_SHAPE_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in COLOR_SHAPE_PAIRS if p not in HELDOUT_PAIRS)

# Spatial relations used by the two-object sentence templates.
_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


def check_word(value: str, allowed: Sequence[str], what: str) -> None:
    """Raise ValueError unless value is one of the allowed words."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _a(word: str) -> str:
    """The indefinite article for a word: "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def is_heldout(color: str, shape: str) -> bool:
    """True if (color, shape) is one of the held-out pairs."""
    return (color, shape) in HELDOUT_PAIRS


def object_phrase(size: str, color: str, shape: str) -> str:
    """Return the phrase for one object, e.g. "a large red circle"."""
    check_word(size, SIZES, "size")
    check_word(color, tuple(COLORS), "color")
    check_word(shape, SHAPES, "shape")
    return f"a {size} {color} {shape}"


def caption(objects: Sequence[Sequence[str]]) -> str:
    """Caption for (size, color, shape) objects given left to right: "a large red circle and a small blue square"."""
    if not objects:
        raise ValueError("caption needs at least one object")
    phrases = []
    for obj in objects:
        if isinstance(obj, str) or len(obj) != 3:
            raise ValueError(f"each object must be a (size, color, shape) triple, got {obj!r}")
        phrases.append(object_phrase(*obj))
    return " and ".join(phrases)


def parse_caption(text: str) -> list[tuple[str, str, str]] | None:
    """(size, colour, shape) objects of an image caption, left to right; None if it is not one."""
    objects = []
    for phrase in text.strip().split(" and "):
        words = phrase.split()
        if len(words) != 4 or words[0] not in ("a", "an") or words[1] not in SIZES:
            return None
        if words[2] not in COLORS or words[3] not in SHAPES:
            return None
        objects.append((words[1], words[2], words[3]))
    return objects


def motion_caption(color: str, shape: str, direction: str) -> str:
    """Caption of a video, e.g. "a red circle moves left" ("an orange ..." before a vowel)."""
    check_word(color, tuple(COLORS), "color")
    check_word(shape, SHAPES, "shape")
    check_word(direction, DIRECTIONS, "direction")
    return f"{_a(color)} {color} {shape} moves {direction}"


def _pairs(allow_heldout: bool) -> tuple[tuple[str, str], ...]:
    """The colour-shape pairs a generator may draw from."""
    return COLOR_SHAPE_PAIRS if allow_heldout else TRAIN_PAIRS


def random_object(rng: random.Random, allow_heldout: bool, pair: tuple[str, str] | None = None) -> tuple:
    """Draw a (size, color, shape) triple, optionally with a fixed (color, shape)."""
    color, shape = pair if pair is not None else rng.choice(_pairs(allow_heldout))
    return rng.choice(SIZES), color, shape


def random_sentence(
    rng: random.Random, *, allow_heldout: bool = True, pair: tuple[str, str] | None = None
) -> str:
    """A plain sentence of the world ("there is a small green triangle."); the speech transcripts use these.

    With `allow_heldout=False` no held-out pair is mentioned; `pair` forces the (first) object's colour-shape.
    """
    size, color, shape = random_object(rng, allow_heldout, pair)
    kind = rng.randrange(7)
    if kind == 0:
        return f"there is {object_phrase(size, color, shape)}."
    if kind == 1:
        return f"the {shape} is {color}."
    if kind == 2:
        return f"the {size} {shape} is {color}."
    if kind == 3:
        return f"i see {object_phrase(size, color, shape)}."
    if kind == 4:
        return f"the {color} {shape} moves {rng.choice(DIRECTIONS)}."
    # Two objects: a spatial relation, or a list.
    _, color2, shape2 = random_object(rng, allow_heldout)
    if kind == 5:
        return f"{_a(color)} {color} {shape} is {rng.choice(_RELATIONS)} {_a(color2)} {color2} {shape2}."
    return f"{caption([(size, color, shape), (rng.choice(SIZES), color2, shape2)])}."
