"""The shapes world's LM text corpus: sentences and captions of the world in the stages' prompt formats.

The corpus holds lines in each stage's default prompt format (`mm.prompts`), so the frozen LM already knows
them, and repeat lines (`COPY_FRACTION` of them): a sentence, then the ASR prompt and the same sentence,
`there is a small green triangle. Repeat after me in English: there is a small green triangle.`, which teach
the LM to copy from its context. The speech stage relies on it: its rows are the speech embeddings (in the
first sentence's place), then the prompt and the transcript.

Parallel lines (`translate_fraction` of them; none by default until the speech stage trains translation, then
`TRANSLATE_FRACTION`) have the same layout with the
AST prompt and the sentence's Spanish (`mm.world.spanish`, the design's fixed grammar) as the target:
`there is a small green triangle. Translate the following sentence into Spanish: hay un triángulo verde
pequeño.`, so the LM translates text, and the speech stage's translation rows (speech, the AST prompt, the
Spanish) are these lines with the speech in the English sentence's place.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from mm.prompts import ASR_PROMPT, IMAGE_PROMPT, VIDEO_PROMPT

from .files import write_lines
from .grammar import (
    COLOR_SHAPE_PAIRS,
    COLORS,
    DIRECTIONS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    caption,
    check_word,
    motion_caption,
    random_object,
    random_sentence,
)
from .questions import clip_questions, clip_text, pick_question, scene_questions, scene_text
from .spanish import translation_line

__all__ = [
    "COPY_FRACTION",
    "DEFAULT_TEXT_LINES",
    "QUESTION_FAMILIES",
    "QUESTION_FRACTION",
    "SCRAMBLE_FRACTION",
    "SPLITS",
    "TRANSLATE_FRACTION",
    "WORD_LIST",
    "draw_question",
    "question_line",
    "scrambled_sentence",
    "synth_text",
]

# Share of corpus lines that repeat a sentence after `ASR_PROMPT` ("{sentence} Repeat after me in English:
# {sentence}"): without them the corpus never repeats anything within a line, so the LM never learns to copy
# from its context, and embeddings spliced into its input (the speech stage) cannot steer what it writes.
# Measured with the demo LM (configs/lm/tiny.yaml), repeating 200 held-out sentences given as text: 25% of the
# lines and 500 steps copy the form but not the words (WER 0.28, no sentence exact); 50% and 500 steps: WER 0.21;
# 50% and 1,500 steps: WER 0.00, every sentence exact (the copying mechanism forms between 1,000 and 1,500 steps).
COPY_FRACTION = 0.5
# Default share of parallel lines ("{sentence} Translate the following sentence into Spanish: {spanish}"),
# taken from the prompt-format lines (the repeat lines keep COPY_FRACTION). 0 gives the corpus without them,
# byte for byte as before they existed.
TRANSLATE_FRACTION = 0.1
# Default share of question lines ("{scene} {question} {answer}", e.g. "a large red circle. what colour is the
# circle? red"), taken from the prompt-format lines as the parallel lines are: the frozen LM answers questions
# about a scene described before them, and the speech stage's spoken-question rows are these lines with the
# spoken question in the written one's place (no prompt: spoken dialogue).
QUESTION_FRACTION = 0.15
# Families a question line asks (about a described scene or moving object; `more` needs two images and
# `describe` is a caption, which the caption lines already teach).
QUESTION_FAMILIES: tuple[str, ...] = ("colour", "shape", "size", "count", "exists", "left", "motion")
# Default share of the repeat lines whose sentence is a scrambled sequence of the world's words (no sentence
# form at all): without them the LM repeats by re-generating one of the forms it knows, not by copying, and a
# sentence in a form it never saw comes back in a known form (measured on the demo LM: the text of
# "the green square is small." repeated as "the small square is green.", WER 0.70 on untrained forms).
SCRAMBLE_FRACTION = 0.3
# The words of the world's sentences, for the scrambled sequences.
WORD_LIST: tuple[str, ...] = (
    *COLORS,
    *SHAPES,
    *SIZES,
    *DIRECTIONS,
    *("a", "an", "the", "there", "is", "i", "see", "moves", "and", "of", "above", "below"),
)

SPLITS: tuple[str, ...] = ("train", "heldout")
# Default corpus sizes (lines) for the demo: enough for a tiny LM to learn the grammar.
DEFAULT_TEXT_LINES: dict[str, int] = {"train": 20000, "heldout": 1000}


def scrambled_sentence(rng: random.Random, min_words: int = 2, max_words: int = 10) -> str:
    """A sequence of the world's words in no sentence form ("moves the blue of square i."), with a full stop."""
    n = rng.randint(min_words, max_words)
    return " ".join(rng.choice(WORD_LIST) for _ in range(n)) + "."


def draw_question(
    rng: random.Random,
    pair: tuple[str, str] | None = None,
    phrasings: tuple[str, ...] = ("canonical", "train"),
    allow_heldout: bool = True,
) -> tuple[str, str, str, str]:
    """A described scene (one or two objects; a fifth of the time a moving object) and one of its questions
    (family drawn uniformly among `QUESTION_FAMILIES` the scene has, `exists` counted twice; answers balanced;
    wording from `phrasings`): (scene text, question, answer, family)."""
    size, colour, shape = random_object(rng, allow_heldout, pair)
    if rng.random() < 0.2:
        direction = rng.choice(DIRECTIONS)
        text, questions = clip_text(colour, shape, direction), clip_questions(colour, shape, direction)
    else:
        objects = [(size, colour, shape)]
        if rng.random() < 0.5:
            objects.insert(rng.randrange(2), random_object(rng, allow_heldout))
        text, questions = scene_text(objects), scene_questions(objects)
    families = [f for f in QUESTION_FAMILIES if any(q.family == f for q in questions)]
    family = rng.choice(families + [f for f in families if f == "exists"])  # exists twice: two kinds
    if family == "exists":
        # the kind (a shape or a colour) first, then the answer: neither tells the other, so the answer must
        # come from the scene (drawn answer-first over all nine questions, a shape question is "yes" 64% of
        # the time, and the demo LM learned that prior instead of reading the scene)
        kind = rng.choice(("exists_shape", "exists_colour"))
        questions = [q for q in questions if q.key == kind]
    q = pick_question(questions, family, rng)
    assert q is not None  # the family was chosen among those the scene has
    return text, q.text(rng.choice(phrasings), rng.randrange(16)), q.answer, q.family


def question_line(rng: random.Random, pair: tuple[str, str] | None = None) -> str:
    """A question line: `{scene} {question} {answer}` (`draw_question`, canonical and training wordings)."""
    text, question, answer, _ = draw_question(rng, pair)
    return f"{text} {question} {answer}"


def _random_line(
    rng: random.Random,
    pair: tuple[str, str] | None = None,
    translate: float = 0.0,
    questions: float = 0.0,
    scramble: float = 0.0,
) -> str:
    """One line (document) of the text corpus: a repeat line (its sentence scrambled with probability
    `scramble`), a parallel (translation) line with probability `translate`, a question line with probability
    `questions`, a line in one of the prompt formats, or a sentence."""
    u = rng.random()
    if u < COPY_FRACTION:  # in-context copying: a sentence, the ASR prompt, the same sentence
        if scramble > 0 and rng.random() < scramble:
            sentence = scrambled_sentence(rng)
        else:
            sentence = random_sentence(rng, pair=pair)
        return f"{sentence} {ASR_PROMPT}{sentence}"
    if u < COPY_FRACTION + translate:  # translation: a sentence, the AST prompt, its Spanish
        return translation_line(random_sentence(rng, pair=pair))
    if u < COPY_FRACTION + translate + questions:  # a described scene, a question, its answer
        return question_line(rng, pair)
    r = rng.random()
    if r < 0.35:  # image caption with the stage's prompt, one or two objects
        objects = [random_object(rng, True, pair)]
        if rng.random() < 0.5:
            objects.append(random_object(rng, True))
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
    out_dir: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    translate_fraction: float = 0.0,
    question_fraction: float = 0.0,
    scramble_fraction: float = 0.0,
) -> Path:
    """Write the LM text corpus to `out_dir/text/{split}.txt` (one document per line) and return its path.

    Lines are image captions (one or two objects, with or without `IMAGE_PROMPT`), video captions (with or
    without `VIDEO_PROMPT`), plain sentences (with or without `ASR_PROMPT`), and repeat lines (about
    `COPY_FRACTION` of them: `{sentence} {ASR_PROMPT}{sentence}`, the same sentence twice) and parallel lines
    (about `translate_fraction` of them: `{sentence} {AST_PROMPT}{its Spanish}`), question lines (about
    `question_fraction`: `{scene} {question} {answer}`; `question_line`), and with `scramble_fraction` that
    share of the repeat lines repeat a scrambled sequence of the world's words instead of a sentence; drawn with
    `random.Random` seeded from (seed, split): the same (n, seed, split) gives identical bytes, and the
    heldout split is a fresh sample of the same distribution. The world is small, so many heldout lines also
    occur in train; it measures the LM's fit to the grammar, not novelty. When n >= 18, every colour-shape
    pair, held-out ones included, is mentioned at least once (for smaller n, the held-out pairs first).
    `n` defaults to `DEFAULT_TEXT_LINES[split]`.
    """
    check_word(split, SPLITS, "split")
    if n is None:
        n = DEFAULT_TEXT_LINES[split]
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    for name, value in (("translate_fraction", translate_fraction), ("question_fraction", question_fraction)):
        if value < 0:
            raise ValueError(f"{name} must be at least 0, got {value}")
    if translate_fraction + question_fraction > 1.0 - COPY_FRACTION:
        raise ValueError(
            f"translate_fraction + question_fraction must be at most {1.0 - COPY_FRACTION} (the repeat lines take "
            f"COPY_FRACTION={COPY_FRACTION}), got {translate_fraction} + {question_fraction}"
        )
    if not 0.0 <= scramble_fraction <= 1.0:
        raise ValueError(f"scramble_fraction must be in [0, 1], got {scramble_fraction}")
    rng = random.Random(_split_seed(seed, split))
    cover = [*HELDOUT_PAIRS, *TRAIN_PAIRS][:n]
    shares = (translate_fraction, question_fraction, scramble_fraction)
    lines = [_random_line(rng, pair, *shares) for pair in cover]
    lines += [_random_line(rng, None, *shares) for _ in range(n - len(cover))]
    rng.shuffle(lines)
    path = Path(out_dir) / "text" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lines(path, lines)
    return path
