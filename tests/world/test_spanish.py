"""The shapes world in Spanish (mm.world.spanish): the design's fixed grammar, exact on every sentence the world
writes, refusals naming the word, the LM corpus's parallel lines and the speech manifests' `spanish` field."""

import json
import random
import re
import shutil
import tarfile

import pytest

from mm.datasets.text import read_documents
from mm.lm import Tokenizer
from mm.prompts import ASR_PROMPT, AST_PROMPT
from mm.world import (
    COLORS,
    COPY_FRACTION,
    DIRECTIONS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    caption,
    motion_caption,
    random_sentence,
    synth_text,
)
from mm.world.corpus import TRANSLATE_FRACTION
from mm.world.grammar import random_object
from mm.world.spanish import (
    COLORS_ES,
    DIRECTIONS_ES,
    RELATIONS_ES,
    SHAPES_ES,
    SIZES_ES,
    to_spanish,
    translation_line,
)

# The design's word list (shared/design.md, "Spanish (speech translation)"), copied.
DESIGN_WORDS = (
    "red rojo, green verde, blue azul, yellow amarillo, purple morado, orange naranja; circle círculo, "
    "square cuadrado, triangle triángulo; small pequeño, large grande; left a la izquierda, right a la derecha, "
    "up hacia arriba, down hacia abajo; left of a la izquierda de, right of a la derecha de, above encima de, "
    "below debajo de"
)


def test_prompts_are_the_papers():
    assert AST_PROMPT == "Translate the following sentence into Spanish: "
    assert ASR_PROMPT == "Repeat after me in English: "


def test_vocabulary_is_the_designs_and_the_worlds():
    tables = {**COLORS_ES, **SHAPES_ES, **SIZES_ES, **DIRECTIONS_ES, **RELATIONS_ES}
    pairs = [item.strip() for group in DESIGN_WORDS.split(";") for item in group.split(",")]
    expected = {}
    for pair in pairs:  # "left of a la izquierda de": the English is the key the tables know
        english = next(k for k in sorted(tables, key=len, reverse=True) if pair.startswith(k + " "))
        expected[english] = pair[len(english) + 1 :]
    assert tables == expected
    assert list(COLORS_ES) == list(COLORS) and tuple(SHAPES_ES) == SHAPES
    assert tuple(SIZES_ES) == SIZES and tuple(DIRECTIONS_ES) == DIRECTIONS


@pytest.mark.parametrize(
    ("english", "spanish"),
    [
        # the design's examples
        ("a large red circle", "un círculo rojo grande"),
        ("the circle", "el círculo"),
        ("the square", "el cuadrado"),
        ("the triangle", "el triángulo"),
        ("there is a small green triangle.", "hay un triángulo verde pequeño."),
        ("i see a large yellow square.", "veo un cuadrado amarillo grande."),
        ("the square is blue.", "el cuadrado es azul."),
        ("the small triangle is purple.", "el triángulo pequeño es morado."),
        ("the large circle is orange.", "el círculo grande es naranja."),
        ("the red circle moves left.", "el círculo rojo se mueve a la izquierda."),
        ("the blue square moves right.", "el cuadrado azul se mueve a la derecha."),
        ("the green triangle moves up.", "el triángulo verde se mueve hacia arriba."),
        ("the yellow circle moves down.", "el círculo amarillo se mueve hacia abajo."),
        (
            "a red circle is left of a blue square.",
            "un círculo rojo está a la izquierda de un cuadrado azul.",
        ),
        ("a red circle is right of a blue square.", "un círculo rojo está a la derecha de un cuadrado azul."),
        ("a green square is above a red triangle.", "un cuadrado verde está encima de un triángulo rojo."),
        ("a green square is below a red triangle.", "un cuadrado verde está debajo de un triángulo rojo."),
        (
            "a large red circle and a small blue square.",
            "un círculo rojo grande y un cuadrado azul pequeño.",
        ),
        # the rules the module docstring adds for the world's other forms
        (
            "an orange square is above an orange circle.",
            "un cuadrado naranja está encima de un círculo naranja.",
        ),
        ("a large red circle and a small blue square", "un círculo rojo grande y un cuadrado azul pequeño"),
        ("an orange triangle moves up", "un triángulo naranja se mueve hacia arriba"),
        ("the circle is left of the small square.", "el círculo está a la izquierda del cuadrado pequeño."),
        ("the triangle is large.", "el triángulo es grande."),
        (
            "there is a small red circle and a large blue square.",
            "hay un círculo rojo pequeño y un cuadrado azul grande.",
        ),
        ("  the circle is red.  ", "el círculo es rojo."),
    ],
)
def test_exact_translations(english, spanish):
    assert to_spanish(english) == spanish


# Words of the world's English that Spanish output must never contain ("a" is Spanish too: only in "a la").
_ENGLISH = {
    *COLORS,
    *SHAPES,
    *SIZES,
    *DIRECTIONS,
    "an",
    "the",
    "there",
    "is",
    "i",
    "see",
    "moves",
    "and",
    "of",
}
_ENGLISH |= {"above", "below"}


def _check(english: str, spanish: str) -> None:
    """A translation is Spanish only, keeps the full stop exactly, and is deterministic."""
    words = spanish.rstrip(".").split(" ")
    assert not set(words) & _ENGLISH, (english, spanish)
    assert all(words[i + 1] == "la" for i, w in enumerate(words) if w == "a"), (english, spanish)
    assert spanish.endswith(".") == english.endswith(".") and spanish.count(".") == english.count(".")
    assert to_spanish(english) == spanish


def test_every_random_sentence_translates():
    rng = random.Random(26)
    seen = {"hay ": 0, "veo ": 0, " es ": 0, " se mueve ": 0, " está ": 0, " y ": 0}
    for _ in range(600):
        english = random_sentence(rng)
        spanish = to_spanish(english)
        _check(english, spanish)
        for key in seen:
            seen[key] += key in spanish
    assert min(seen.values()) > 40, seen  # each of the seven templates (two share "el ... es") is covered
    # the Spanish names the same colours and shapes as the English, in the same order
    rng = random.Random(7)
    for _ in range(300):
        english = random_sentence(rng, allow_heldout=False)
        spanish = to_spanish(english)
        for table in (COLORS_ES, SHAPES_ES, SIZES_ES):
            words_en = [table[w] for w in english[:-1].split() if w in table]
            assert [w for w in spanish[:-1].split() if w in table.values()] == words_en, (english, spanish)


def test_captions_and_motion_captions_translate():
    rng = random.Random(3)
    for _ in range(300):
        objects = [random_object(rng, True) for _ in range(rng.choice((1, 2)))]
        expected = " y ".join(f"un {SHAPES_ES[s]} {COLORS_ES[c]} {SIZES_ES[z]}" for z, c, s in objects)
        assert to_spanish(caption(objects)) == expected
    for c in COLORS:
        for s in SHAPES:
            for d in DIRECTIONS:
                english = motion_caption(c, s, d)
                assert to_spanish(english) == f"un {SHAPES_ES[s]} {COLORS_ES[c]} se mueve {DIRECTIONS_ES[d]}"
                _check(english, to_spanish(english))


@pytest.mark.parametrize(
    ("sentence", "word"),
    [
        ("two circles.", "'two'"),
        ("the blob is red.", "'blob'"),
        ("a orange circle", "'a'"),  # the world writes "an orange"
        ("an red circle", "'an'"),
        ("the circle is pink.", "'pink'"),
        ("the circle moves sideways.", "'sideways'"),
        ("a red circle and a blue square is red.", "'is'"),  # a list has no predicate
        ("is there a circle?", "'is'"),
        ("the red large circle", "'large'"),  # size comes before colour
        ("The circle is red.", "'The'"),
        ("the circle is red. the square is blue.", "full stop before its end"),
        ("Caption: a large red circle", "'Caption:'"),
        ("there is", "ends too early"),
        ("a red circle is left of", "ends too early"),
    ],
)
def test_sentences_outside_the_grammar_raise_naming_the_word(sentence, word):
    with pytest.raises(ValueError, match=re.escape(word)) as err:
        to_spanish(sentence)
    assert repr(sentence) in str(err.value)


def test_empty_and_non_text_are_refused():
    for bad in ("", "   ", "."):
        with pytest.raises(ValueError, match="no sentence"):
            to_spanish(bad)
    with pytest.raises(TypeError, match="str"):
        to_spanish(None)


def _parallel(lines):
    return [line for line in lines if f" {AST_PROMPT}" in line]


def test_corpus_parallel_lines_at_the_fraction_asked(tmp_path):
    assert not _parallel(synth_text(tmp_path / "o", n=500, seed=0).read_text(encoding="utf-8").splitlines())
    lines = synth_text(tmp_path / "d", n=3000, seed=0, translate_fraction=TRANSLATE_FRACTION)
    lines = lines.read_text(encoding="utf-8").splitlines()
    par = _parallel(lines)
    assert abs(len(par) / len(lines) - TRANSLATE_FRACTION) < 0.02 and TRANSLATE_FRACTION == 0.1
    for line in par:
        english, spanish = line.split(f" {AST_PROMPT}")
        assert line == translation_line(english) and spanish == to_spanish(english)
        assert english.endswith(".") and spanish.endswith(".")
    assert len(set(par)) > len(par) // 3
    assert (
        abs(sum(ASR_PROMPT in line and line.count(".") == 2 for line in lines) / 3000 - COPY_FRACTION) < 0.03
    )
    for color, shape in HELDOUT_PAIRS:  # the LM learns to translate the held-out pairs too
        assert any(f"{color} {shape}" in line for line in par), (color, shape)
    quarter = synth_text(tmp_path / "q", n=3000, seed=0, translate_fraction=0.25).read_text(encoding="utf-8")
    assert abs(len(_parallel(quarter.splitlines())) / 3000 - 0.25) < 0.03
    held = (
        synth_text(tmp_path / "d", n=1000, seed=0, split="heldout", translate_fraction=TRANSLATE_FRACTION)
        .read_text(encoding="utf-8")
        .splitlines()
    )
    assert 50 < len(_parallel(held)) < 150


def test_corpus_without_parallel_lines(tmp_path):
    none = synth_text(tmp_path / "z", n=2000, seed=0, translate_fraction=0.0).read_text(encoding="utf-8")
    assert AST_PROMPT.strip() not in none and none.isascii()
    for bad in (-0.1, 0.6):
        with pytest.raises(ValueError, match="translate_fraction"):
            synth_text(tmp_path, n=10, translate_fraction=bad)


def test_tokenizer_round_trips_the_spanish(tmp_path):
    path = synth_text(tmp_path, n=400, seed=2)
    tok = Tokenizer.train(read_documents(path, doc_split="line"), 300)
    rng = random.Random(5)
    texts = [translation_line(random_sentence(rng)) for _ in range(100)]
    texts += ["un triángulo verde pequeño está encima de un círculo naranja.", "el círculo es rojo."]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(" pequeño")) == " pequeño"  # ñ, two UTF-8 bytes


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_speech_manifest_has_the_spanish(tmp_path):
    from mm.world.speech import espeak_wave, speech_clip_params, synth_speech

    manifest = synth_speech(tmp_path, n=2, split="train", workers=1)
    recs = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert [list(r) for r in recs] == [["audio", "text", "voice", "speed", "pitch", "seconds", "spanish"]] * 2
    for i, r in enumerate(recs):
        p = speech_clip_params(0, "train", i)
        assert {k: r[k] for k in p} == p and r["spanish"] == to_spanish(r["text"])
        # the audio is what it was before the field: espeak-ng's wave for the same parameters
        wav, _ = espeak_wave(p["text"], p["voice"], p["speed"], p["pitch"])
        assert (manifest.parent / r["audio"]).read_bytes() == wav
    with tarfile.open(manifest.parent / "train-00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000.json").read())
    assert meta["spanish"] == recs[0]["spanish"] and meta["text"] == recs[0]["text"]


def test_speech_translation_rows_mirror_the_corpus_lines(tmp_path):
    """A speech-stage row (speech, AST prompt, Spanish) has, after the speech, the very tokens that follow the
    English sentence in the corpus's parallel line: the speech takes the sentence's place."""
    import torch

    from mm.datasets.audio import SpeechCollator

    path = synth_text(tmp_path, n=400, seed=2)
    tok = Tokenizer.train(read_documents(path, doc_split="line"), 320)
    col = SpeechCollator(tok, ASR_PROMPT, lambda n: n // 8)
    rng = random.Random(11)
    for _ in range(20):
        english = random_sentence(rng)
        spanish = to_spanish(english)
        row = col([{"features": torch.zeros(40, 80), "text": spanish, "prompt": AST_PROMPT}])["tokens"][
            0
        ].tolist()
        after_speech = row[row.index(tok.speech_end_id) + 1 :]
        line = tok.encode(translation_line(english), eos=True)
        assert line[: len(tok.encode(english))] == tok.encode(english)
        assert line[len(tok.encode(english)) :] == after_speech
