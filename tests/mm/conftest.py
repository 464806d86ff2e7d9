"""Tiny configs of every stage on tiny data of every modality, shared by the multi-process tests
(`test_stage_processes`, `test_meta_start`, `test_sharded_checkpoints`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mm.lm import Tokenizer, Transformer, preset, save_hf
from mm.training.config import load_config
from mm.training.runner import run
from mm.training.stage import stage_class
from mm.world import synth_motion, synth_shapes
from mm.world.speech import synth_speech

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ENCODER = [
    "image_encoder.embed_dim=32",
    "image_encoder.depth=2",
    "image_encoder.num_heads=2",
    "image_encoder.intermediate_layers=[0]",
]
SPEECH_ENCODER = [
    "speech_encoder.dim=32",
    "speech_encoder.n_layers=1",
    "speech_encoder.n_heads=2",
    "speech_encoder.ffn_dim=64",
    "speech_encoder.dropout=0.0",  # dropout draws differ between processes: off for an exact comparison
]


def stage_config(name: str, preset_file: str, overrides: list[str]) -> Any:
    """The typed config of stage `name` from a preset file and overrides."""
    return load_config(stage_class(name).config_class, ROOT / preset_file, [*overrides, f"stage={name}"])


def nano_lm(root: Path, corpus: dict[str, Path]) -> Path:
    """A random nano LM (seed 0) with the corpus tokenizer, saved as an HF directory under root/lm."""
    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size)), root / "lm")
    tok.save(root / "lm")
    return root / "lm"


def lm_pretrain_config(corpus: dict[str, Path], common: list[str]) -> Any:
    """LM pretraining of the nano preset on the corpus, 32-token rows, no held-out split and no anneal."""
    return stage_config(
        "lm-pretrain",
        "configs/lm/tiny.yaml",
        [
            "model.preset=nano",
            f"tokenizer.path={corpus['tokenizer']}",
            f"data=[{{paths: [{corpus['train']}], name: shapes, doc_split: line}}]",
            "heldout=[]",
            "train.seq_len=32",
            "anneal.steps=0",
            "anneal.polyak_k=0",
            "anneal.source=null",
            *common,
        ],
    )


def image_overrides(lm: Path, shapes: Path) -> list[str]:
    """An image stage on `lm` and the `shapes` pairs, the tiny encoder, no evaluation."""
    return [f"lm={lm}", f"data.train=[{shapes}]", "eval_samples=0", "curve_samples=0", *IMAGE_ENCODER]


def text_dialogues(root: Path, n: int = 16) -> Path:
    """`n` one-turn text dialogues about one-object scenes (chat JSONL), for the lm-sft stage."""
    colours, shapes = ("red", "green", "blue"), ("circle", "square", "triangle")
    lines = []
    for i in range(n):
        colour, shape = colours[i % 3], shapes[(i // 3) % 3]
        messages = [
            {"role": "user", "content": f"a small {colour} {shape}.\nwhat colour is the {shape}?"},
            {"role": "assistant", "content": colour},
        ]
        lines.append(json.dumps({"messages": messages, "family": "colour"}))
    path = root / "text_dialogues.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_stage_configs(
    root: Path, corpus: dict[str, Path], common: list[str], n: int = 16
) -> dict[str, Any]:
    """A nano LM, `n` image pairs, `n // 2` clips and spoken sentences, an image bundle (trained with
    `common`), and a config of every stage (their `out` unset)."""
    lm = nano_lm(root, corpus)
    shapes = synth_shapes(root, n=n, seed=0, split="train")
    clips = synth_motion(root, n=n // 2, seed=0, split="train")
    speech = synth_speech(root, n=n // 2, split="train")
    image = image_overrides(lm, shapes)
    bundle = stage_config("image-pretrain", "configs/stages/image_pretrain_tiny.yaml", [*image, *common])
    bundle.out = str(root / "image-bundle")
    run(bundle)
    init = f"init_from={root / 'image-bundle' / 'final'}"
    video = [
        init,
        f"data.train=[{clips}]",
        "aggregator.merge=2",
        "aggregator.n_latents=4",
        "aggregator.depth=1",
        "aggregator.n_heads=2",
        "data.n_frames=4",
        "eval_samples=0",
        "curve_samples=0",
    ]
    chat = chat_manifest(root, shapes)
    return {
        "lm-pretrain": lm_pretrain_config(corpus, common),
        "clip-pretrain": stage_config(
            "clip-pretrain",
            "configs/encoders/clip_tiny.yaml",
            [f"tokenizer={lm}", f"data.train=[{shapes}]", "eval_samples=0", *IMAGE_ENCODER, *common],
        ),
        "bestrq-pretrain": stage_config(
            "bestrq-pretrain",
            "configs/encoders/bestrq_tiny.yaml",
            [f"data.train=[{speech}]", "eval_samples=0", *SPEECH_ENCODER, *common],
        ),
        "image-pretrain": stage_config(
            "image-pretrain", "configs/stages/image_pretrain_tiny.yaml", [*image, *common]
        ),
        "image-anneal": stage_config(
            "image-anneal", "configs/stages/image_anneal_tiny.yaml", [*image, init, *common]
        ),
        "video": stage_config("video", "configs/stages/video_tiny.yaml", [*video, *common]),
        "lm-sft": stage_config(
            "lm-sft",
            "configs/lm/sft_tiny.yaml",
            [
                f"init_from={lm}",
                f"data.train=[{text_dialogues(root)}]",
                f"data.text=[{corpus['train']}]",
                "eval_samples=0",
                *common,
            ],
        ),
        "speech": stage_config(
            "speech",
            "configs/stages/speech_tiny.yaml",
            [f"lm={lm}", f"data.train=[{speech}]", "eval_samples=0", *SPEECH_ENCODER, *common],
        ),
        # the image bundle's adapters on the same LM (a fine-tuned LM of the same shape in real use)
        "vision-sft": stage_config(
            "vision-sft",
            "configs/stages/vision_sft_tiny.yaml",
            [init, f"lm={lm}", f"data.train=[{chat}]", "eval_samples=0", "curve_samples=0", *common],
        ),
    }


def chat_manifest(root: Path, shapes: Path) -> Path:
    """Chat conversations about the `shapes` images: one image described, or two images compared."""
    import json

    recs = [json.loads(x) for x in shapes.read_text().splitlines()]
    rows = []
    for k, (a, b) in enumerate(zip(recs, recs[1:] + recs[:1])):
        pair = [
            {"type": "image", "path": str(shapes.parent / r["image"])} for r in ((a, b) if k % 2 else (a,))
        ]
        question = "which image has more shapes?" if k % 2 else "describe the image."
        answer = ("the first" if len(a["text"]) > len(b["text"]) else "the second") if k % 2 else a["text"]
        user = {"role": "user", "content": [*pair, question]}
        rows.append({"messages": [user, {"role": "assistant", "content": answer}]})
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def stage_configs() -> Callable[..., dict[str, Any]]:
    """`build_stage_configs(root, corpus, common, n=16)`: tiny data, an image bundle and every stage's config."""
    return build_stage_configs


@pytest.fixture(scope="session")
def stage_helpers() -> dict[str, Any]:
    """The pieces of `build_stage_configs`, for tests that need only some stages."""
    return {
        "stage_config": stage_config,
        "nano_lm": nano_lm,
        "lm_pretrain_config": lm_pretrain_config,
        "image_overrides": image_overrides,
    }
