"""The shapes world: its vocabulary, caption wording, prompt formats and the LM text corpus.

The world (see `shared/design.md`, "The embedded default: the shapes world") has objects of a shape, a colour
and a size; images hold one or two of them, videos one moving object, speech clips speak sentences of the
world. The constants and helpers here are the single source of that vocabulary and of the exact wording of
captions, so the image, video and speech generators and the LM text corpus all agree.

Prompt formats (the text that precedes a stage's target; the LM text corpus contains lines in each format so
the frozen LM already knows them):

- `IMAGE_PROMPT` = "Caption: ", e.g. `Caption: a large red circle and a small blue square`.
- `VIDEO_PROMPT` = "Video: ", e.g. `Video: a red circle moves left`.
- `ASR_PROMPT` = "Repeat after me in English: " (the paper's ASR prompt), e.g.
  `Repeat after me in English: there is a small green triangle.`; in the speech stage the speech embeddings
  sit between the prompt and the transcript, in the text corpus the transcript follows the prompt directly.

Held-out colour-shape pairs (`HELDOUT_PAIRS`) never occur in image, video or speech training data but do occur
in the text corpus (compositional generalisation is measured on them).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ASR_PROMPT",
    "COLORS",
    "COLOR_SHAPE_PAIRS",
    "DEFAULT_TEXT_LINES",
    "DIRECTIONS",
    "HELDOUT_PAIRS",
    "IMAGE_PROMPT",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TRAIN_PAIRS",
    "VIDEO_PROMPT",
    "caption",
    "is_heldout",
    "motion_caption",
    "object_phrase",
    "random_sentence",
    "synth_text",
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

IMAGE_PROMPT = "Caption: "
VIDEO_PROMPT = "Video: "
ASR_PROMPT = "Repeat after me in English: "

SPLITS: tuple[str, ...] = ("train", "heldout")
# Default corpus sizes (lines) for the demo: enough for a tiny LM to learn the grammar.
DEFAULT_TEXT_LINES: dict[str, int] = {"train": 20000, "heldout": 1000}

# Spatial relations used by the two-object sentence templates.
_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


def _check(value: str, allowed: Sequence[str], what: str) -> None:
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
    _check(size, SIZES, "size")
    _check(color, tuple(COLORS), "color")
    _check(shape, SHAPES, "shape")
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


def motion_caption(color: str, shape: str, direction: str) -> str:
    """Caption of a video, e.g. "a red circle moves left" ("an orange ..." before a vowel)."""
    _check(color, tuple(COLORS), "color")
    _check(shape, SHAPES, "shape")
    _check(direction, DIRECTIONS, "direction")
    return f"{_a(color)} {color} {shape} moves {direction}"


def _pairs(allow_heldout: bool) -> tuple[tuple[str, str], ...]:
    """The colour-shape pairs a generator may draw from."""
    return COLOR_SHAPE_PAIRS if allow_heldout else TRAIN_PAIRS


def _random_object(rng: random.Random, allow_heldout: bool, pair: tuple[str, str] | None = None) -> tuple:
    """Draw a (size, color, shape) triple, optionally with a fixed (color, shape)."""
    color, shape = pair if pair is not None else rng.choice(_pairs(allow_heldout))
    return rng.choice(SIZES), color, shape


def random_sentence(
    rng: random.Random, *, allow_heldout: bool = True, pair: tuple[str, str] | None = None
) -> str:
    """A plain sentence of the world ("there is a small green triangle."); the speech transcripts use these.

    With `allow_heldout=False` no held-out pair is mentioned; `pair` forces the (first) object's colour-shape.
    """
    size, color, shape = _random_object(rng, allow_heldout, pair)
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
    _, color2, shape2 = _random_object(rng, allow_heldout)
    if kind == 5:
        return f"{_a(color)} {color} {shape} is {rng.choice(_RELATIONS)} {_a(color2)} {color2} {shape2}."
    return f"{caption([(size, color, shape), (rng.choice(SIZES), color2, shape2)])}."


def _random_line(rng: random.Random, pair: tuple[str, str] | None = None) -> str:
    """One line (document) of the text corpus, in one of the prompt formats or a plain sentence."""
    r = rng.random()
    if r < 0.35:  # image caption with the stage's prompt, one or two objects
        objects = [_random_object(rng, True, pair)]
        if rng.random() < 0.5:
            objects.append(_random_object(rng, True))
        text = caption(objects)
        return IMAGE_PROMPT + text if r < 0.30 else text
    if r < 0.55:  # video caption
        color, shape = pair if pair is not None else rng.choice(COLOR_SHAPE_PAIRS)
        text = motion_caption(color, shape, rng.choice(DIRECTIONS))
        return VIDEO_PROMPT + text if r < 0.50 else text
    sentence = random_sentence(rng, pair=pair)
    return ASR_PROMPT + sentence if r < 0.65 else sentence


def _split_seed(seed: int, split: str) -> str:
    """Seed of a split's RNG: each split draws from its own stream of the same distribution."""
    return f"mm.shapes.text/{split}/{seed}"


def synth_text(
    out_dir: str | os.PathLike[str], n: int | None = None, seed: int = 0, split: str = "train"
) -> Path:
    """Write the LM text corpus to `out_dir/text/{split}.txt` (one document per line) and return its path.

    Lines are image captions (one or two objects, with or without `IMAGE_PROMPT`), video captions (with or
    without `VIDEO_PROMPT`), and plain sentences (with or without `ASR_PROMPT`), drawn with
    `random.Random` seeded from (seed, split): the same (n, seed, split) gives identical bytes, and the
    heldout split is a fresh sample of the same distribution. The world is small, so many heldout lines also
    occur in train; it measures the LM's fit to the grammar, not novelty. When n >= 18, every colour-shape
    pair, held-out ones included, is mentioned at least once (for smaller n, the held-out pairs first).
    `n` defaults to `DEFAULT_TEXT_LINES[split]`.
    """
    _check(split, SPLITS, "split")
    if n is None:
        n = DEFAULT_TEXT_LINES[split]
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(_split_seed(seed, split))
    cover = [*HELDOUT_PAIRS, *TRAIN_PAIRS][:n]
    lines = [_random_line(rng, pair) for pair in cover]
    lines += [_random_line(rng) for _ in range(n - len(cover))]
    rng.shuffle(lines)
    path = Path(out_dir) / "text" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
