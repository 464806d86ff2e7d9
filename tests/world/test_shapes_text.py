"""The shapes world's vocabulary, caption wording and LM text corpus (mm.world.grammar, mm.world.corpus)."""

import random
import re

import pytest

from mm import world
from mm.datasets.mixture import PackedText
from mm.datasets.text import TextSource, read_documents
from mm.prompts import ASR_PROMPT, IMAGE_PROMPT, VIDEO_PROMPT
from mm.world import (
    COLORS,
    HELDOUT_PAIRS,
    caption,
    is_heldout,
    motion_caption,
    object_phrase,
    random_sentence,
    synth_text,
)


def test_vocabulary_constants():
    assert COLORS == {
        "red": (220, 30, 30),
        "green": (30, 160, 60),
        "blue": (30, 70, 220),
        "yellow": (230, 200, 20),
        "purple": (140, 50, 170),
        "orange": (240, 130, 20),
    }
    assert world.SHAPES == ("circle", "square", "triangle")
    assert world.SIZES == ("small", "large")
    assert world.DIRECTIONS == ("left", "right", "up", "down")
    assert HELDOUT_PAIRS == (("green", "triangle"), ("purple", "circle"), ("orange", "square"))
    assert len(world.COLOR_SHAPE_PAIRS) == 18 and len(world.TRAIN_PAIRS) == 15
    assert not set(world.TRAIN_PAIRS) & set(HELDOUT_PAIRS)
    assert is_heldout("green", "triangle") and is_heldout("orange", "square")
    assert not is_heldout("green", "circle") and not is_heldout("red", "triangle")
    assert (IMAGE_PROMPT, VIDEO_PROMPT, ASR_PROMPT) == (
        "Caption: ",
        "Video: ",
        "Repeat after me in English: ",
    )


def test_caption_wording_and_order():
    assert object_phrase("large", "red", "circle") == "a large red circle"
    assert caption([("large", "red", "circle")]) == "a large red circle"
    assert (
        caption([("large", "red", "circle"), ("small", "blue", "square")])
        == "a large red circle and a small blue square"
    )
    # Objects are listed in the order given (the caller sorts them left to right).
    assert (
        caption([("small", "blue", "square"), ("large", "red", "circle")])
        == "a small blue square and a large red circle"
    )
    assert motion_caption("red", "circle", "left") == "a red circle moves left"
    assert motion_caption("orange", "square", "up") == "an orange square moves up"


@pytest.mark.parametrize(
    "call",
    [
        lambda: object_phrase("huge", "red", "circle"),
        lambda: object_phrase("small", "pink", "circle"),
        lambda: object_phrase("small", "red", "hexagon"),
        lambda: motion_caption("red", "circle", "sideways"),
        lambda: caption([]),
        lambda: caption([("small", "red")]),
    ],
)
def test_bad_words_raise(call):
    with pytest.raises(ValueError):
        call()


def test_random_sentence_can_avoid_heldout_pairs():
    rng = random.Random(0)
    heldout_phrases = [f"{c} {s}" for c, s in HELDOUT_PAIRS]
    for _ in range(500):
        s = random_sentence(rng, allow_heldout=False)
        assert not any(p in s for p in heldout_phrases), s
        # "the triangle is green." names a pair without adjacency: check that form too.
        m = re.fullmatch(r"the (?:small |large )?(\w+) is (\w+)\.", s)
        if m:
            assert not is_heldout(m.group(2), m.group(1)), s


# One regular expression per line format of the corpus (the whole grammar).
_COLOR = "(?:red|green|blue|yellow|purple|orange)"
_SHAPE = "(?:circle|square|triangle)"
_OBJ = rf"a (?:small|large) {_COLOR} {_SHAPE}"
_CAP = rf"{_OBJ}(?: and {_OBJ})?"
_ART = r"an? "
_MOTION = rf"{_ART}{_COLOR} {_SHAPE} moves (?:left|right|up|down)"
_SENT = (
    rf"(?:there is {_OBJ}\.|the {_SHAPE} is {_COLOR}\.|the (?:small|large) {_SHAPE} is {_COLOR}\."
    rf"|i see {_OBJ}\.|the {_COLOR} {_SHAPE} moves (?:left|right|up|down)\."
    rf"|{_ART}{_COLOR} {_SHAPE} is (?:left of|right of|above|below) {_ART}{_COLOR} {_SHAPE}\."
    rf"|{_OBJ} and {_OBJ}\.)"
)
# A repeat line: a sentence, the ASR prompt, the same sentence (group 1 = the sentence).
_REPEAT = re.compile(rf"({_SENT}) Repeat after me in English: \1")
# A parallel line: a sentence, the AST prompt, its Spanish (exact translations: tests/world/test_spanish.py).
_TRANSLATE = re.compile(rf"({_SENT}) Translate the following sentence into Spanish: [^.]+\.")
_LINE = re.compile(
    rf"(?:Caption: )?{_CAP}|(?:Video: )?{_MOTION}|(?:Repeat after me in English: )?{_SENT}|{_REPEAT.pattern}"
    rf"|{_TRANSLATE.pattern}"
)


def test_text_corpus_grammar_prompts_and_heldout_pairs(tmp_path):
    path = synth_text(tmp_path, n=3000, seed=0, split="train")
    assert path == tmp_path / "text" / "train.txt"
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # the file ends with a newline
    lines = lines[:-1]
    assert len(lines) == 3000 and all(lines)
    bad = [line for line in lines if not _LINE.fullmatch(line)]
    assert not bad, bad[:5]
    assert not [line for line in lines if "a orange" in line]  # "an orange"
    for prompt in (IMAGE_PROMPT, VIDEO_PROMPT, ASR_PROMPT):
        assert sum(line.startswith(prompt) for line in lines) > 100, prompt
    assert any(" and " in line and line.startswith(IMAGE_PROMPT) for line in lines)
    for color, shape in HELDOUT_PAIRS:
        assert sum(f"{color} {shape}" in line for line in lines) > 20, (color, shape)
        assert any(line.startswith(IMAGE_PROMPT) and f"{color} {shape}" in line for line in lines)
        assert any(line.startswith(VIDEO_PROMPT) and f"{color} {shape}" in line for line in lines)


def test_text_corpus_teaches_copying(tmp_path):
    """About COPY_FRACTION of the lines repeat one sentence after the ASR prompt, word for word."""
    lines = synth_text(tmp_path, n=3000, seed=0).read_text(encoding="utf-8").splitlines()
    repeats = [line for line in lines if _REPEAT.fullmatch(line)]
    assert abs(len(repeats) / len(lines) - world.COPY_FRACTION) < 0.03, len(repeats)
    assert (
        0.1 <= world.COPY_FRACTION <= 0.5
    )  # enough to teach copying; the prompt formats keep half the lines
    for line in repeats:
        first, second = line.split(" " + ASR_PROMPT)
        assert first == second and first.endswith(".")
    # Repeats are varied (not a few memorised lines: 3,000 lines give about 1,500 repeats of about 590 distinct
    # sentences, the world's sentence space being small), and other lines never repeat a sentence twice.
    assert len(set(repeats)) > len(repeats) // 3
    others = [line for line in lines if line not in repeats and not _TRANSLATE.fullmatch(line)]
    assert not [line for line in others if line.count(".") > 1]
    # The held-out pairs are repeated too (the LM learns to copy them as well).
    for color, shape in HELDOUT_PAIRS:
        assert any(f"{color} {shape}" in line for line in repeats), (color, shape)


def test_small_corpus_still_covers_every_pair(tmp_path):
    lines = synth_text(tmp_path, n=18, seed=5).read_text().splitlines()
    for color, shape in world.COLOR_SHAPE_PAIRS:
        # Either "color shape" adjacent, or "the [size] shape is color."
        assert any(
            f"{color} {shape}" in line or re.search(rf"{shape} is {color}\.", line) for line in lines
        ), (
            color,
            shape,
        )
    lines = synth_text(tmp_path, n=3, seed=5).read_text().splitlines()
    for color, shape in HELDOUT_PAIRS:
        assert any(f"{color} {shape}" in line or re.search(rf"{shape} is {color}\.", line) for line in lines)


def test_text_corpus_deterministic_and_splits_differ(tmp_path):
    a = synth_text(tmp_path / "a", n=500, seed=3).read_bytes()
    b = synth_text(tmp_path / "b", n=500, seed=3).read_bytes()
    assert a == b
    assert synth_text(tmp_path / "c", n=500, seed=4).read_bytes() != a
    heldout = synth_text(tmp_path / "a", n=500, seed=3, split="heldout")
    assert heldout == tmp_path / "a" / "text" / "heldout.txt"
    h = heldout.read_bytes()
    assert h != a
    # Same distribution: the heldout split uses the same line formats.
    assert all(_LINE.fullmatch(line) for line in h.decode().splitlines())
    with pytest.raises(ValueError, match="split"):
        synth_text(tmp_path, n=10, split="test")


def test_default_sizes(tmp_path):
    assert world.DEFAULT_TEXT_LINES == {"train": 20000, "heldout": 1000}
    assert len(synth_text(tmp_path, split="heldout").read_text().splitlines()) == 1000


def test_corpus_reads_one_document_per_line(tmp_path):
    path = synth_text(tmp_path, n=200, seed=1)
    docs = list(read_documents(path, doc_split="line"))
    assert docs == path.read_text().splitlines()
    # The whole corpus is one paragraph when split by paragraphs (hence doc_split="line" for it).
    assert len(list(read_documents(path))) == 1

    class Chars:
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    packed = PackedText([TextSource([str(tmp_path / "text")], doc_split="line")], Chars())
    assert packed.stats["sources"]["text"]["documents"] == 200
