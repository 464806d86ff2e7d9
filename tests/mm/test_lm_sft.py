"""The lm-sft stage: chat rows labelled on the assistant's tokens only, mixed with plain rows by position; a run
fine-tunes every LM parameter, exports an HF Llama directory, reports both perplexities and text-QA accuracy,
and resumes to the same weights; bad chat lines are skipped naming file:line; bad configs are refused."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from mm.app.cli import main as mm_main
from mm.datasets.text import IGNORE_INDEX
from mm.lm import Tokenizer, load_hf
from mm.models.chat import normalize_answer
from mm.stages.lm_sft_data import SFTRows
from mm.training.checkpoint import load_checkpoint
from mm.training.runner import run, stage_for

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def dialogues(path: Path, n: int, seed: int, turns: int = 2) -> Path:
    """`n` text dialogues about one-object scenes: colour, then shape questions (chat JSONL)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            size, colour, shape = rng.choice(("small", "large")), rng.choice(COLOURS), rng.choice(SHAPES)
            qa = [(f"what colour is the {shape}?", colour), (f"what shape is the {colour} object?", shape)]
            messages = []
            for k, (q, a) in enumerate(qa[:turns]):
                text = f"a {size} {colour} {shape}.\n{q}" if k == 0 else q
                messages += [{"role": "user", "content": text}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages, "family": "colour"}) + "\n")
    return path


@pytest.fixture
def sft_data(corpus, stage_helpers, tmp_path) -> dict[str, Path]:
    """A nano LM with the corpus tokenizer, training and held-out dialogues, the corpus."""
    return {
        "lm": stage_helpers["nano_lm"](tmp_path, corpus),
        "train": dialogues(tmp_path / "chat_train.jsonl", 40, seed=0),
        "heldout": dialogues(tmp_path / "chat_heldout.jsonl", 6, seed=1, turns=1),
        "text": corpus["train"],
        "heldout_text": corpus["heldout"],
    }


def sft_config(stage_helpers, data: dict[str, Path], out: Path, *extra: str):
    """The demo preset shrunk: 4 rows a step, 6 steps, checkpoints every 3."""
    return_cfg = stage_helpers["stage_config"](
        "lm-sft",
        "configs/lm/sft_tiny.yaml",
        [
            f"init_from={data['lm']}",
            f"data.train=[{data['train']}]",
            f"data.text=[{data['text']}]",
            f"data.heldout_text=[{data['heldout_text']}]",
            f"data.heldout_chat=[{data['heldout']}]",
            "data.max_len=128",
            "train.seq_len=32",
            "train.batch_size=4",
            "train.max_steps=6",
            "train.save_every=3",
            "train.peak_flops=1e9",
            "optim.warmup_steps=2",
            "eval_samples=4",
            "max_new_tokens=3",
            f"out={out}",
            *extra,
        ],
    )
    return return_cfg


def test_rows_label_only_assistant_tokens_and_mix_plain_rows_by_position(sft_data):
    tok = Tokenizer.from_file(sft_data["lm"])
    rows = SFTRows([str(sft_data["train"])], [str(sft_data["text"])], tok, fraction=0.25, seed=0, max_len=128)
    kinds = [rows.sample(g)["kind"] for g in range(40)]
    assert kinds.count("text") == 10 and kinds[:8] == ["chat"] * 3 + ["text"] + ["chat"] * 3 + ["text"]
    chat = rows.sample(0)
    ids, labels = chat["ids"], chat["labels"]
    learned = [labels[t] for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
    # the labelled targets are exactly the two answers, each followed by <|eot_id|>: no user or header token
    answers = tok.decode(learned).split("<|eot_id|>")
    record = [json.loads(x) for x in sft_data["train"].read_text().splitlines()]
    assert answers in [
        [m["content"] for m in r["messages"] if m["role"] == "assistant"] + [""] for r in record
    ]
    for t in range(len(ids) - 1):
        assert labels[t] in (IGNORE_INDEX, ids[t + 1])
    plain = rows.sample(3)
    assert plain["ids"][0] == tok.bos_id and plain["labels"] == [*plain["ids"][1:], IGNORE_INDEX]
    # a pure function of (data, seed, position); another seed draws another order
    again = SFTRows(
        [str(sft_data["train"])], [str(sft_data["text"])], tok, fraction=0.25, seed=0, max_len=128
    )
    assert [again.sample(g)["ids"] for g in (9, 2, 5)] == [rows.sample(g)["ids"] for g in (9, 2, 5)]
    other = SFTRows(
        [str(sft_data["train"])], [str(sft_data["text"])], tok, fraction=0.25, seed=1, max_len=128
    )
    assert [other.sample(g)["ids"] for g in range(8)] != [rows.sample(g)["ids"] for g in range(8)]


def test_bad_chat_lines_are_skipped_naming_file_and_line(sft_data, tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    good = sft_data["train"].read_text().splitlines()
    image = {"messages": [{"role": "user", "content": [{"type": "image", "path": str(bad)}, "what colour?"]},
                          {"role": "assistant", "content": "red"}]}  # fmt: skip
    bad.write_text("\n".join([good[0], "{not json", '{"messages": [{"role": "robot", "content": "x"}]}',
                              json.dumps(image), *good[1:]]) + "\n")  # fmt: skip
    tok = Tokenizer.from_file(sft_data["lm"])
    with caplog.at_level(logging.WARNING):
        rows = SFTRows([str(bad)], [], tok, fraction=0.0, seed=0, max_len=128)
        for g in range(41):
            assert rows.sample(g)["kind"] == "chat"
    assert f"{bad}:2: skipped chat record" in caplog.text and f"{bad}:3: skipped chat record" in caplog.text
    stats = rows.stats()  # the image conversation: no image decoder in a text-only stage, skipped and counted
    assert stats["skipped_by_reason"] == {"no_image_decoder": 1} and stats["chat_rows"] == 41


def test_sft_trains_every_parameter_exports_an_lm_and_resumes_to_the_same_weights(
    stage_helpers, sft_data, tmp_path, capsys
):
    full = run(sft_config(stage_helpers, sft_data, tmp_path / "full"))
    final = tmp_path / "full" / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "stage.json"} <= {
        p.name for p in final.iterdir()
    }
    assert json.loads((final / "stage.json").read_text())["stage"] == "lm-sft"
    before, after = load_hf(sft_data["lm"]).state_dict(), load_hf(final).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every LM tensor trained
    assert full["pretrained_heldout_ppl"] > 1 and full["heldout_ppl"] > 1
    assert full["ppl_ratio"] == pytest.approx(full["heldout_ppl"] / full["pretrained_heldout_ppl"])
    qa = full["eval"]["chat_heldout"]
    assert qa["n"] == 4 and 0 <= qa["exact_match"] <= 1 and full["text_qa_accuracy"] == qa["exact_match"]
    assert len(qa["examples"]) == 4 and qa["examples"][0]["question"].startswith("a ")
    assert full["data_skips"]["chat_rows"] + full["data_skips"]["text_rows"] == 24
    assert full["data_skips"]["text_rows"] == 6  # a quarter of the rows are plain documents
    # interrupted after the step-3 checkpoint, resumed: the same losses and the same final weights
    part = sft_config(stage_helpers, sft_data, tmp_path / "part")
    part.train.max_steps = 3
    run(part)
    resumed = run(sft_config(stage_helpers, sft_data, tmp_path / "part"), resume=True)
    assert resumed["final_loss"] == full["final_loss"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000006")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "step_00000006")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["pretrained_heldout_ppl"] == full["pretrained_heldout_ppl"]
    # `mm generate` reads the final folder
    capsys.readouterr()
    assert mm_main(["generate", "--checkpoint", str(final), "--max-new-tokens", "2", "a red"]) == 0
    assert capsys.readouterr().out.startswith("a red")


def test_answers_are_compared_without_case_spaces_or_final_full_stop():
    assert normalize_answer("  Red.\n") == "red" and normalize_answer("the first .") == "the first"
    assert normalize_answer("red.circle") == "red.circle"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.text_fraction=1.0", "data.text_fraction=1.0; must be in [0, 1)"),
        ("data.text=[]", "needs plain corpus files in `data.text`"),
        ("data.max_len=100000", "data.max_len=100000; must be in [2,"),
        ("data.doc_split=word", "data.doc_split='word'; allowed: paragraph, line"),
        ("init_from=''", "`init_from` must name"),
        ("data.heldout_chat=[/nonexistent.jsonl]", "data.heldout_chat: /nonexistent.jsonl does not exist"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(stage_helpers, sft_data, tmp_path, override, message):
    cfg = sft_config(stage_helpers, sft_data, tmp_path / "out", override)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        stage_for(cfg).check()
    assert message in str(e.value)
