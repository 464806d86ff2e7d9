"""The shapes world's questions and instruction data (mm.world.questions, mm.world.chat, data synth)."""

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm.app.cli import main
from mm.world import (
    CHAT_FILES,
    COLORS,
    DIRECTIONS,
    FAMILIES,
    HELDOUT_PAIRS,
    PHRASINGS,
    SHAPES,
    TEMPLATES,
    Scene,
    SceneObject,
    chat_counts,
    clip_questions,
    pair_questions,
    parse_caption,
    scene_questions,
    scene_text,
    synth_chat,
)
from mm.world.chat_text import text_train_rows

N = 150  # image QA training rows; the other counts scale (chat_counts)
MEDIA_FILES = ("train.jsonl", "heldout.jsonl", "heldout_phrasings.jsonl", "heldout_pairs.jsonl")
TRAINING_FILES = ("train.jsonl", "text_train.jsonl")
DESIGN_TABLE = {  # design.md, "Questions about the world"
    "colour": "what colour is the {shape}?",
    "shape": "what shape is the {colour} object?",
    "size": "what size is the {colour} {shape}?",
    "count": "how many shapes are there?",
    "exists_shape": "is there a {shape}?",
    "exists_colour": "is there a {colour} object?",
    "left": "which is on the left, the {shape} or the {shape2}?",
    "motion": "which way does the {shape} move?",
    "more": "which image has more shapes?",
    "describe_image": "describe the image.",
    "describe_video": "describe the video.",
}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = synth_chat(tmp_path_factory.mktemp("world"), n=N, seed=0)
    return root, {name: read(root / name) for name in CHAT_FILES}


def answers_of(questions) -> dict[str, str]:
    return {q.text("canonical"): q.answer for q in questions}


def test_answers_of_a_constructed_scene():
    red = SceneObject("large", "red", "circle", (0, 0, 40, 40))
    blue = SceneObject("small", "blue", "square", (60, 10, 70, 20))
    scene = Scene(100, 50, (255, 255, 255), (red, blue))
    got = answers_of(scene_questions(scene))
    assert got == answers_of(scene_questions([("large", "red", "circle"), ("small", "blue", "square")]))
    expected = {
        "what colour is the circle?": "red",
        "what colour is the square?": "blue",
        "what shape is the red object?": "circle",
        "what shape is the blue object?": "square",
        "what size is the red circle?": "large",
        "what size is the blue square?": "small",
        "how many shapes are there?": "two",
        "is there a circle?": "yes",
        "is there a triangle?": "no",
        "is there a blue object?": "yes",
        "is there an orange object?": "no",
        "which is on the left, the circle or the square?": "the circle",
        "which is on the left, the square or the circle?": "the circle",
        "describe the image.": "a large red circle and a small blue square",
    }
    assert {k: got[k] for k in expected} == expected
    assert (
        len(got) == 6 + 1 + 3 + 6 + 2 + 1
    )  # colour/shape/size x2, count, exists 3 shapes + 6 colours, left, describe
    assert scene_text(scene) == "a large red circle and a small blue square."
    # Two circles: no colour question about "the circle", no left question; one object: count one.
    same = answers_of(scene_questions([("small", "red", "circle"), ("large", "blue", "circle")]))
    assert "what colour is the circle?" not in same and not any(q.startswith("which is on") for q in same)
    assert (
        same["what size is the blue circle?"] == "large" and same["what shape is the red object?"] == "circle"
    )
    assert (
        answers_of(scene_questions([("small", "green", "triangle")]))["how many shapes are there?"] == "one"
    )


def test_answers_of_clips_and_pairs():
    got = answers_of(clip_questions("orange", "square", "up"))
    assert got == {
        "which way does the square move?": "up",
        "what colour is the square?": "orange",
        "what shape is the orange object?": "square",
        "describe the video.": "an orange square moves up",
    }
    one, two = [("small", "red", "circle")], [("large", "blue", "square"), ("small", "red", "circle")]
    assert [pair_questions(a, b)[0].answer for a, b in ((two, one), (one, two), (one, one), (two, two))] == [
        "the first",
        "the second",
        "neither",
        "neither",
    ]


def all_wordings(phrasing: str) -> set[str]:
    """Every filled wording of every template in a phrasing kind."""
    out = set()
    for t in TEMPLATES.values():
        for w in t.wordings(phrasing):
            for shape, shape2, colour in itertools.product(SHAPES, SHAPES, COLORS):
                out.add(
                    re.sub(r"\ba (?=[aeiou])", "an ", w.format(shape=shape, shape2=shape2, colour=colour))
                )
    return out


def test_phrasings_canonical_as_the_design_table_and_held_out_apart():
    assert {k: t.canonical for k, t in TEMPLATES.items()} == DESIGN_TABLE
    assert {t.family for t in TEMPLATES.values()} == set(FAMILIES)
    for t in TEMPLATES.values():
        assert 1 <= len(t.train) <= 2 and 1 <= len(t.heldout) <= 2, t.key
    held, seen = all_wordings("heldout"), all_wordings("canonical") | all_wordings("train")
    assert held and not held & seen


def user_texts(record: dict) -> list[str]:
    texts = []
    for m in record["messages"]:
        if m["role"] == "user":
            items = m["content"] if isinstance(m["content"], list) else [m["content"]]
            texts += [i if isinstance(i, str) else i.get("text", "") for i in items]
    return texts


def test_records_follow_the_chat_format(chat):
    root, files = chat
    for name, rows in files.items():
        assert rows, name
        for r in rows:
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, (name, r)
            assert r["family"] in FAMILIES and r["phrasing"] in PHRASINGS, r
            videos = 0
            for m in r["messages"]:
                if m["role"] == "assistant":
                    a = m["content"]
                    assert isinstance(a, str) and a == a.lower() and a and not a.endswith("."), r
                    continue
                if isinstance(m["content"], str):
                    continue
                assert not name.startswith("text_"), r
                for item in m["content"]:
                    assert item["type"] in ("text", "image", "video"), item
                    if item["type"] == "text":
                        assert isinstance(item["text"], str) and item["text"]
                    else:
                        assert (root / item["path"]).is_file(), item
                        videos += item["type"] == "video"
            assert videos <= 1, r
            # Media only in the first user turn.
            assert all(isinstance(m["content"], str) for m in r["messages"][1:]), r


def parse_motion(text: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"an? (\w+) (\w+) moves (\w+)", text)
    assert m, text
    return m.group(1), m.group(2), m.group(3)


def questions_of(record: dict):
    """The questions of the record's media (from its captions) or of its described scene."""
    if record["media"] == "text":
        scene = record["messages"][0]["content"].rsplit("\n", 1)[0]
        parts = [s.split(": ", 1)[1] for s in scene.split("\n")] if scene.startswith("first") else [scene]
        if " moves " in scene:
            return clip_questions(*parse_motion(scene.rstrip(".")))
        objs = [parse_caption(p.rstrip(".")) for p in parts]
        return pair_questions(*objs) if len(objs) == 2 else scene_questions(objs[0])
    caps = record["captions"]
    if record["media"] == "video":
        return clip_questions(*parse_motion(caps[0]))
    objs = [parse_caption(c) for c in caps]
    return pair_questions(*objs) if len(objs) == 2 else scene_questions(objs[0])


def test_every_answer_is_right(chat):
    _, files = chat
    for name, rows in files.items():
        for r in rows:
            known = {}
            for q in questions_of(r):
                for p in PHRASINGS:
                    known.update({w: q.answer for w in q.wordings(p)})
            msgs = r["messages"]
            for user, assistant in zip(msgs[::2], msgs[1::2]):
                question = [t for t in user_texts({"messages": [user]}) if t][-1].split("\n")[-1]
                assert known[question] == assistant["content"], (name, r)


def test_images_show_their_captions(chat):
    root, files = chat
    for r in files["heldout.jsonl"] + files["heldout_pairs.jsonl"]:
        paths = [i["path"] for i in r["messages"][0]["content"] if i["type"] == "image"]
        for path, cap in zip(paths, r["captions"]):
            pixels = np.asarray(Image.open(root / path).convert("RGB")).reshape(-1, 3)
            shown = {c for c, rgb in COLORS.items() if (pixels == rgb).all(axis=1).any()}
            assert shown == {c for _, c, _ in parse_caption(cap)}, (path, cap)


def test_held_out_phrasings_and_pairs_stay_out_of_training(chat):
    _, files = chat
    held = all_wordings("heldout")
    for name in (*TRAINING_FILES, "heldout.jsonl", "heldout_pairs.jsonl", "text_heldout.jsonl"):
        for r in files[name]:
            assert not any(t.split("\n")[-1] in held for t in user_texts(r)), (name, r)
    assert all(user_texts(r)[-1] in held for r in files["heldout_phrasings.jsonl"])
    for r in files["train.jsonl"]:
        pairs = {
            (c, s) for cap in r["captions"] for c, s in re.findall(r"(\w+) (circle|square|triangle)", cap)
        }
        assert not pairs & set(HELDOUT_PAIRS) and "pairs" not in r, r
        assert not any(f"{c} {s}" in json.dumps(r) for c, s in HELDOUT_PAIRS), r
    for r in files["heldout_pairs.jsonl"]:
        assert r["pairs"] == "heldout" and any(
            f"{c} {s}" in " ".join(r["captions"]) for c, s in HELDOUT_PAIRS
        )
    text_pairs = [r for r in files["text_train.jsonl"] if r.get("pairs") == "heldout"]
    assert text_pairs and all(any(f"{c} {s}" in json.dumps(r) for c, s in HELDOUT_PAIRS) for r in text_pairs)
    train_scenes = {r["messages"][0]["content"].rsplit("\n", 1)[0] for r in files["text_train.jsonl"]}
    assert not train_scenes & {
        r["messages"][0]["content"].rsplit("\n", 1)[0] for r in files["text_heldout.jsonl"]
    }


def test_counts_and_balance(chat):
    _, files = chat
    c = chat_counts(N)
    train = files["train.jsonl"]
    assert Counter(r["media"] for r in train) == {
        "image": c["image"],
        "images": c["two_image"],
        "video": c["video"],
    }
    assert len(files["text_train.jsonl"]) == c["text"]
    assert Counter(r["family"] for r in train if r["media"] == "image").keys() == {
        "colour", "shape", "size", "count", "exists", "left", "describe"
    }  # fmt: skip
    for rows in (train, files["text_train.jsonl"]):
        phrasing = Counter(r["phrasing"] for r in rows)
        assert phrasing.keys() == {"canonical", "train"} and 0.35 < phrasing["canonical"] / len(rows) < 0.65
    for rows in (train, files["text_train.jsonl"]):  # exists: yes and no about equally often
        exists = Counter(r["messages"][-1]["content"] for r in rows if r["family"] == "exists")
        assert exists.keys() == {"yes", "no"} and 0.35 < exists["yes"] / sum(exists.values()) < 0.65, exists
    more = Counter(r["messages"][-1]["content"] for r in train if r["family"] == "more")
    assert max(more.values()) - min(more.values()) <= 1 and len(more) == 3
    turns = Counter(len(r["messages"]) // 2 for r in train if r["media"] == "image")
    assert turns.keys() == {1, 2, 3, 4}
    first = [r["messages"][0]["content"] for r in train]
    assert any(f[0]["type"] == "text" for f in first) and any(f[0]["type"] != "text" for f in first)
    two = [[i["path"] for i in f if i["type"] == "image"] for f in first if len(f) == 3]
    assert two and all(a.endswith("_a.png") and b.endswith("_b.png") for a, b in two)
    for name in ("heldout.jsonl", "heldout_phrasings.jsonl", "heldout_pairs.jsonl"):
        rows = files[name]
        per = Counter((r["media"], r["family"]) for r in rows)
        assert per[("image", "left")] == c["eval_image"] and per[("video", "motion")] == c["eval_video"]
        assert per[("images", "more")] == c["eval_two_image"] and len(per) == 7 + 4 + 1
        exists = Counter(r["messages"][-1]["content"] for r in rows if r["family"] == "exists")
        assert exists["yes"] == exists["no"] == c["eval_image"] // 2
        assert Counter(r["messages"][-1]["content"] for r in rows if r["family"] == "more") == {
            "the first": 1, "the second": 1, "neither": 1
        }  # fmt: skip
    text = Counter(r["family"] for r in files["text_heldout.jsonl"])
    assert text == {f: c["eval_text"] for f in FAMILIES}


def test_cli_writes_the_same_files_for_the_same_seed(chat, tmp_path, capsys):
    root, _ = chat
    assert main(["data", "synth", "--kind", "chat", "--out", str(tmp_path), "--n", str(N)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "chat"
    for name in CHAT_FILES:
        assert (out / name).read_bytes() == (root / name).read_bytes(), name
    for path in sorted((root / "images").iterdir())[:20]:
        assert (out / "images" / path.name).read_bytes() == path.read_bytes()
    assert text_train_rows(1, 20) != text_train_rows(0, 20) == text_train_rows(0, 20)
    # A smaller run into the same folder leaves no media of the larger one behind.
    synth_chat(tmp_path, n=30, seed=0)
    used = {i["path"] for name in CHAT_FILES for r in read(out / name) for i in r["messages"][0]["content"]
            if isinstance(i, dict) and "path" in i}  # fmt: skip
    on_disk = {f"{d}/{p.name}" for d in ("images", "clips") for p in (out / d).iterdir()}
    assert on_disk == used


def test_directions_and_bad_counts():
    assert {
        q.answer for d in DIRECTIONS for q in clip_questions("red", "circle", d) if q.family == "motion"
    } == set(DIRECTIONS)
    with pytest.raises(ValueError, match="at least 1"):
        chat_counts(0)
    with pytest.raises(ValueError, match="one or two objects"):
        scene_questions([])
