"""The corpus's question lines and scrambled repeat lines, the spoken-question and untrained-form speech splits,
and the 60-second recording: their forms, answers and partitions."""

import json
import random
import re
import shutil

import pytest

from mm import world
from mm.world.corpus import (
    QUESTION_FAMILIES,
    WORD_LIST,
    draw_question,
    question_line,
    scrambled_sentence,
    synth_text,
)
from mm.world.grammar import HELDOUT_PAIRS, random_sentence
from mm.world.questions import TEMPLATES
from mm.world.spanish import to_spanish


def _wordings(phrasings=("canonical", "train")) -> list[re.Pattern]:
    """Regular expressions of every question wording (slots as words)."""
    out = []
    for t in TEMPLATES.values():
        for kind in phrasings:
            for w in t.wordings(kind):
                pattern = re.escape(w)
                pattern = re.sub(r"\\\{\w+\\\}", r"[a-z]+", pattern)
                out.append(re.compile(pattern.replace(r"\ a\ ", r"\ an?\ ")))
    return out


def test_question_lines_scene_question_and_its_answer():
    rng = random.Random(3)
    families, exists = [], []
    for _ in range(400):
        scene, question, answer, family = draw_question(rng)
        assert family in QUESTION_FAMILIES
        families.append(family)
        if family == "exists":
            exists.append(("object" in question, answer))
        line = question_line(random.Random(len(families)))
        assert line.count("?") == 1 and not line.endswith(".")
        # the answer is the scene's: re-derive it from the scene's own questions
        objects = scene.rstrip(".")
        if family == "colour" and " moves " not in scene:
            shape = question.split()[-1].rstrip("?")
            assert f"{answer} {shape}" in objects, (scene, question, answer)
        if family == "count":
            assert answer == ("two" if " and " in scene else "one")
        if family == "motion":
            assert scene.endswith(f"moves {answer}.")
        assert any(p.fullmatch(question) for p in _wordings()), question
    assert set(families) == set(QUESTION_FAMILIES)  # every family is asked
    assert 0.18 < families.count("exists") / 400 < 0.33  # exists counted twice among the scene's families
    # the kind of exists question (shape or colour) says nothing of the answer: each kind half yes, half no
    for colour in (False, True):
        answers = [a for c, a in exists if c == colour]
        assert abs(len(answers) / len(exists) - 0.5) < 0.12
        assert abs(answers.count("yes") / len(answers) - 0.5) < 0.15, (colour, answers)


def test_speech_questions_train_avoids_heldout_pairs_and_heldout_uses_canonical_wordings():
    from mm.world.speech import speech_clip_params

    canonical = _wordings(("canonical",))
    for i in range(300):
        p = speech_clip_params(0, "questions_train", i)
        assert set(p) == {"text", "voice", "speed", "pitch", "context", "answer", "family"}
        assert p["voice"] == "en-us"
        assert not any(f"{c} {s}" in p["context"] for c, s in HELDOUT_PAIRS), p
        q = speech_clip_params(0, "questions_heldout", i)
        assert any(r.fullmatch(q["text"]) for r in canonical), q["text"]
    assert speech_clip_params(0, "questions_heldout", 7) == speech_clip_params(0, "questions_heldout", 7)


def test_scrambled_and_question_lines_in_the_corpus(tmp_path):
    plain = synth_text(tmp_path / "a", n=800, seed=1).read_bytes()
    # without the new shares the corpus is byte for byte the one of before
    assert (
        synth_text(tmp_path / "b", n=800, seed=1, question_fraction=0, scramble_fraction=0).read_bytes()
        == plain
    )
    lines = (
        synth_text(tmp_path / "c", n=4000, seed=1, question_fraction=0.2, scramble_fraction=0.3)
        .read_text(encoding="utf-8")
        .splitlines()
    )
    questions = [line for line in lines if "?" in line]
    assert abs(len(questions) / 4000 - 0.2) < 0.03
    repeats = [
        line.split(" Repeat after me in English: ")
        for line in lines
        if " Repeat after me in English: " in line
    ]
    copies = [a for a, b in repeats if a == b]
    formed = re.compile(r"(there is|the|i see|an?) .*\.")
    scrambled = [a for a in copies if not formed.fullmatch(a)]
    assert abs(len(scrambled) / len(copies) - 0.3) < 0.08  # about 30% of the repeats have no sentence form
    assert all(set(a.rstrip(".").split()) <= set(WORD_LIST) for a in scrambled)
    for bad in ({"question_fraction": -0.1}, {"question_fraction": 0.45, "translate_fraction": 0.1}):
        with pytest.raises(ValueError, match="fraction"):
            synth_text(tmp_path, n=10, **bad)
    with pytest.raises(ValueError, match="scramble_fraction"):
        synth_text(tmp_path, n=10, scramble_fraction=1.5)
    assert scrambled_sentence(random.Random(0)).endswith(".")


def test_untrained_forms_are_never_sentences_of_the_world():
    from mm.world.speech import speech_clip_params, untrained_sentence

    rng = random.Random(0)
    trained = {random_sentence(rng) for _ in range(30000)}
    rng = random.Random(1)
    forms = [untrained_sentence(rng) for _ in range(600)]
    assert not set(forms) & trained
    assert len({re.sub(r"red|green|blue|yellow|purple|orange", "C", f).split()[0] for f in forms}) >= 2
    texts = [speech_clip_params(0, "untrained_forms", i)["text"] for i in range(200)]
    assert all(to_spanish(t) for t in texts)  # each has its exact translation (the AST reference)
    assert "an orange" in " ".join(forms) and "a orange" not in " ".join(forms)
    assert not set(texts) & trained
    scrambled = [speech_clip_params(0, "train_scrambled", i) for i in range(50)]
    assert all(p["asr_only"] and set(p["text"].rstrip(".").split()) <= set(WORD_LIST) for p in scrambled)
    assert not {p["text"] for p in scrambled} & trained
    voices = {speech_clip_params(0, "untrained_voices", i)["voice"] for i in range(8)}
    assert voices == set(world.speech.UNTRAINED_VOICES)
    assert not voices & set(world.speech.HELDOUT_VOICES) and world.speech.TRAIN_VOICE not in voices


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_long_recording_and_merged_manifest(tmp_path):
    import soundfile as sf

    from mm.world.speech import merge_manifests, synth_long_recording, synth_speech

    path = synth_long_recording(tmp_path, seconds=6.0, seed=2)
    wave, sr = sf.read(path)
    meta = json.loads((path.parent / "long_recording.json").read_text())
    assert sr == 16000 and len(wave) / sr >= 6.0 and abs(meta["seconds"] - len(wave) / sr) < 1e-3
    assert meta["text"] == " ".join(meta["sentences"]) and len(meta["sentences"]) >= 2
    assert meta["starts"] == sorted(meta["starts"]) and meta["starts"][0] == 0.0
    # the pauses are silent: between the end of one sentence and the start of the next
    gap = int((meta["starts"][1] - 0.3) * sr)
    assert abs(wave[gap]) < 1e-3
    a = synth_speech(tmp_path, n=2, split="train", workers=1)
    b = synth_speech(tmp_path, n=3, split="questions_train", workers=1)
    c = synth_speech(tmp_path, n=2, split="train_scrambled", workers=1)
    merged = merge_manifests(tmp_path, ["train", "train_scrambled", "questions_train"], "mix")
    lines = merged.read_text().splitlines()
    assert lines == a.read_text().splitlines() + c.read_text().splitlines() + b.read_text().splitlines()
    assert all(
        json.loads(line)["asr_only"] and "spanish" not in json.loads(line)
        for line in c.read_text().splitlines()
    )
    assert "spanish" not in json.loads(lines[-1]) and json.loads(lines[-1])["answer"]
    with pytest.raises(FileNotFoundError, match="nope"):
        merge_manifests(tmp_path, ["nope"], "x")
