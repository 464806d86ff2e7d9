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
    DIRECTIONS,
    HELDOUT_PAIRS,
    TRAIN_PAIRS,
    caption,
    check_word,
    motion_caption,
    random_object,
    random_sentence,
)
from .spanish import translation_line

__all__ = ["COPY_FRACTION", "DEFAULT_TEXT_LINES", "SPLITS", "TRANSLATE_FRACTION", "synth_text"]

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

SPLITS: tuple[str, ...] = ("train", "heldout")
# Default corpus sizes (lines) for the demo: enough for a tiny LM to learn the grammar.
DEFAULT_TEXT_LINES: dict[str, int] = {"train": 20000, "heldout": 1000}


def _random_line(rng: random.Random, pair: tuple[str, str] | None = None, translate: float = 0.0) -> str:
    """One line (document) of the text corpus: a repeat line, a parallel (translation) line with probability
    `translate`, a line in one of the prompt formats, or a sentence."""
    u = rng.random()
    if u < COPY_FRACTION:  # in-context copying: a sentence, the ASR prompt, the same sentence
        sentence = random_sentence(rng, pair=pair)
        return f"{sentence} {ASR_PROMPT}{sentence}"
    if u < COPY_FRACTION + translate:  # translation: a sentence, the AST prompt, its Spanish
        return translation_line(random_sentence(rng, pair=pair))
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
) -> Path:
    """Write the LM text corpus to `out_dir/text/{split}.txt` (one document per line) and return its path.

    Lines are image captions (one or two objects, with or without `IMAGE_PROMPT`), video captions (with or
    without `VIDEO_PROMPT`), plain sentences (with or without `ASR_PROMPT`), and repeat lines (about
    `COPY_FRACTION` of them: `{sentence} {ASR_PROMPT}{sentence}`, the same sentence twice) and parallel lines
    (about `translate_fraction` of them: `{sentence} {AST_PROMPT}{its Spanish}`), drawn with
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
    if not 0.0 <= translate_fraction <= 1.0 - COPY_FRACTION:
        raise ValueError(
            f"translate_fraction must be in [0, {1.0 - COPY_FRACTION}] (the repeat lines take COPY_FRACTION="
            f"{COPY_FRACTION}), got {translate_fraction}"
        )
    rng = random.Random(_split_seed(seed, split))
    cover = [*HELDOUT_PAIRS, *TRAIN_PAIRS][:n]
    lines = [_random_line(rng, pair, translate_fraction) for pair in cover]
    lines += [_random_line(rng, None, translate_fraction) for _ in range(n - len(cover))]
    rng.shuffle(lines)
    path = Path(out_dir) / "text" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lines(path, lines)
    return path
