"""The `vision-sft` stage end to end on tiny models: the adapters of a video bundle trained against one LM are
hot-swapped onto another (the instruct LM), trained on chat data with one image, two images and a video per
conversation; the instruct LM stays bit-identical (fingerprints, `mm verify-frozen`), the bundle holds no LM
tensor, the hot-swap and per-family figures are reported, and the chat model answers through `Chat` and
`mm chat`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm.formats.bundle import read_config, verify_frozen
from mm.lm import Tokenizer, Transformer, load_hf, preset, save_hf
from mm.models.chat import Chat
from mm.stages.video import VideoStageConfig
from mm.stages.vision_sft_model import hot_swap, load_source
from mm.training.config import load_config
from mm.training.freeze import fingerprint
from mm.training.runner import run as run_stage
from mm.world import synth_motion, synth_shapes

from .conftest import IMAGE_ENCODER, ROOT, nano_lm, stage_config

BIN = Path(sys.executable).parent


def chat_rows(root: Path, shapes: Path, motion: Path) -> list[dict]:
    """Conversations about the world's images and clips: describe, two images compared, a video described."""
    imgs = [json.loads(x) for x in shapes.read_text().splitlines()]
    clips = [json.loads(x) for x in motion.read_text().splitlines()]
    rows = []
    for r in imgs:
        image = {"type": "image", "path": str(shapes.parent / r["image"])}
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [image, "describe the image."]},
                    {"role": "assistant", "content": r["text"]},
                ],
                "family": "describe",
            }
        )
    for a, b in zip(imgs, imgs[1:]):
        na, nb = a["text"].count(" and ") + 1, b["text"].count(" and ") + 1
        answer = "the first" if na > nb else "the second" if nb > na else "neither"
        pair = [{"type": "image", "path": str(shapes.parent / x["image"])} for x in (a, b)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [*pair, "which image has more shapes?"]},
                    {"role": "assistant", "content": answer},
                ],
                "family": "more",
            }
        )
    for c in clips:
        video = {"type": "video", "path": str(motion.parent / c["video"])}
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [video, "describe the video."]},
                    {"role": "assistant", "content": c["text"]},
                ],
                "family": "describe",
            }
        )
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus):
    """A nano LM and its 'instruct' variant, a 2-step image bundle and video bundle, and chat data."""
    root = tmp_path_factory.mktemp("sftworld")
    lm = nano_lm(root, corpus)
    instruct = load_hf(lm)
    with torch.no_grad():
        for p in instruct.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_hf(instruct, root / "instruct")
    Tokenizer.from_file(lm).save(root / "instruct")
    shapes = synth_shapes(root, n=8, seed=0, split="train")
    motion = synth_motion(root, n=4, seed=0, split="train")
    common = ["train.batch_size=4", "train.max_steps=2", "train.save_every=2", "train.peak_flops=1e9"]
    image = stage_config(
        "image-pretrain",
        "configs/stages/image_pretrain_tiny.yaml",
        [
            f"lm={lm}",
            f"data.train=[{shapes}]",
            "eval_samples=0",
            "curve_samples=0",
            "xattn.every=1",
            *IMAGE_ENCODER,
            f"out={root / 'image'}",
            *common,
        ],
    )
    run_stage(image)
    video = load_config(
        VideoStageConfig,
        ROOT / "configs" / "stages" / "video_tiny.yaml",
        [
            f"init_from={root / 'image' / 'final'}",
            f"data.train=[{motion}]",
            "data.n_frames=4",
            "aggregator.merge=2",
            "aggregator.n_latents=4",
            "aggregator.depth=1",
            "aggregator.n_heads=2",
            "eval_samples=0",
            "curve_samples=0",
            f"out={root / 'video'}",
            *common,
        ],
    )
    run_stage(video)
    rows = chat_rows(root, shapes, motion)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "lm": lm,
        "instruct": root / "instruct",
        "video": root / "video" / "final",
        "chat": root / "chat.jsonl",
        "shapes": shapes,
    }


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    instruct_before = fingerprint(load_hf(world["instruct"]))
    args = [
        BIN / "mm",
        "train",
        "--config",
        ROOT / "configs" / "stages" / "vision_sft_tiny.yaml",
        f"init_from={world['video']}",
        f"lm={world['instruct']}",
        "--data",
        world["chat"],
        f"data.heldout=[{world['chat']}]",
        f"caption_heldout={world['shapes']}",
        "caption_samples=4",
        "eval_samples=12",
        "curve_samples=4",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.save_every=3",
        "train.eval_every=3",
        "train.num_threads=1",
        "train.peak_flops=1e9",
        "--out",
        out,
    ]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"out": out, "instruct_before": instruct_before}


def test_instruct_lm_is_hot_swapped_and_stays_bit_identical(world, trained):
    final = trained["out"] / "final"
    meta = read_config(final)
    assert meta["stage"] == "vision-sft"
    assert meta["lm_fingerprint"] == trained["instruct_before"] == fingerprint(load_hf(world["instruct"]))
    assert meta["lm_fingerprint_start"] == meta["lm_fingerprint_end"]
    assert meta["adapters_lm_fingerprint"] == fingerprint(load_hf(world["lm"])) != meta["lm_fingerprint"]
    assert verify_frozen(final)[0]
    tensors = load_file(final / "adapter.safetensors")
    assert not any(k.startswith("lm.") for k in tensors)
    assert {k.split(".")[0] for k in tensors} >= {
        "image_encoder",
        "image_xattn",
        "image_index",
        "video_xattn",
    }
    source = load_file(world["video"].parent.parent / "image" / "final" / "adapter.safetensors")
    changed = [k for k in source if not torch.equal(source[k], tensors[k])]
    assert any(k.startswith("image_encoder.") for k in changed) and any(
        k.startswith("image_xattn.") for k in changed
    )
    r = subprocess.run([BIN / "mm", "verify-frozen", final], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_summary_has_the_hot_swap_and_per_family_figures(trained):
    s = json.loads((trained["out"] / "summary.json").read_text())
    swap = s["hot_swap"]
    assert set(swap) == {"pretrained_lm", "instruct_lm_no_training", "instruct_lm_after_vision_sft"}
    assert all(0 <= v["exact_match"] <= 1 and v["n"] == 4 for v in swap.values())
    ev = s["eval"]["chat"]
    assert ev["n"] == 12 and set(ev["by_family"]) <= {"describe", "more"} and 0 <= ev["accuracy"] <= 1
    assert all("question" in e for f in ev["examples"].values() for e in f)


def test_chat_answers_in_python_and_on_the_command_line(world, trained):
    final = trained["out"] / "final"
    chat = Chat.load(final)
    img = sorted((world["shapes"].parent / "train").glob("*.png"))[:2]
    one = chat.ask("describe the image.", images=[img[0]])
    assert isinstance(one, str) and len(chat.history) == 2
    two = chat.ask("which image has more shapes?", images=img)
    assert len(chat.history) == 4 and chat.history[2]["content"][-1]["text"] == "which image has more shapes?"
    chat.reset()
    assert (
        chat.ask("describe the image.", images=[img[0]]) == one
    )  # greedy: the same answer from a fresh start
    r = subprocess.run(
        [BIN / "mm", "chat", "--checkpoint", final, "--image", img[0], "describe the image."],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == one + "\n"
    assert isinstance(two, str)


def test_hot_swap_refuses_an_lm_of_another_shape_or_tokenizer(world, tmp_path):
    model, tok, _, _ = load_source(world["video"])
    deeper = Transformer(preset("nano", vocab_size=tok.vocab_size, n_layers=model.cfg.n_layers + 1))
    save_hf(deeper, tmp_path / "deeper")
    tok.save(tmp_path / "deeper")
    with pytest.raises(
        ValueError, match=r"not the adapters' LM fine-tuned: its n_layers differ \(n_layers 3 vs 2"
    ):
        hot_swap(model, tok, tmp_path / "deeper")
    save_hf(load_hf(world["instruct"]), tmp_path / "other_tok")
    Tokenizer.train(["a few words", "of another corpus"] * 50, vocab_size=tok.vocab_size).save(
        tmp_path / "other_tok"
    )
    with pytest.raises(ValueError, match="another tokenizer"):
        hot_swap(model, tok, tmp_path / "other_tok")


def test_served_chat_folder_answers_questions_about_uploads(world, trained):
    from mm.app.serve import chat_folders
    from mm.app.serve_assistant import CheckpointAssistant

    from .test_serve_browser import post, serving

    final = str(trained["out"] / "final")
    dirs, ask, kinds = chat_folders([final])
    assert dirs == [] and kinds == ("image", "video")
    server = serving(CheckpointAssistant(dirs, chat=ask, chat_kinds=kinds))
    try:
        img = sorted((world["shapes"].parent / "train").glob("*.png"))[0]
        want = Chat.load(final).ask("how many shapes are there?", images=[img])
        status, reply = post(
            server, {"file": ("a.png", img.read_bytes()), "question": (None, b"how many shapes are there?")}
        )
        assert (status, reply) == (200, {"answer": want})
        status, reply = post(server, {"file": ("a.png", img.read_bytes())})  # no question: a description
        assert status == 200 and reply["answer"] == Chat.load(final).ask("describe the image.", images=[img])
        status, reply = post(server, {"file": ("bad.png", b"\x89PNG broken")})
        assert status == 400 and "bad.png" in reply["error"]
    finally:
        server.shutdown()
        server.server_close()
