"""A real (tiny) CLIP pretraining run of the image encoder: finite losses, `encoder.safetensors` loads strictly
into a fresh `ImageEncoder`, `project` is untouched while the ViT trained, retrieval accuracies in the
summary; and a `mm pretrain-encoder` CLI smoke run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.encoders.image import ImageEncoder
from mm.lm import Tokenizer
from mm.stages.clip_pretrain import ClipPretrainConfig, build_clip_model
from mm.training.checkpoint import load_tensors
from mm.training.config import load_config
from mm.training.runner import run as run_encoder_pretrain
from mm.training.trainer import set_seed
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "configs" / "encoders" / "clip_tiny.yaml"
TINY = [
    "image_encoder.embed_dim=32",
    "image_encoder.depth=2",
    "image_encoder.num_heads=2",
    "image_encoder.intermediate_layers=[0]",
    "image_encoder.n_global_layers=1",
    "image_encoder.out_dim=16",
    "text.dim=32",
    "text.n_heads=2",
    "text.n_kv_heads=1",
    "text.ffn_dim=64",
    "embed_dim=32",
    "train.batch_size=8",
    "train.peak_flops=1e9",
    "train.num_threads=2",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipworld")
    train = synth_shapes(root, n=64, seed=0, split="train")
    heldout = synth_shapes(root, n=16, seed=0, split="heldout")
    captions = [json.loads(line)["text"] for line in train.read_text().splitlines() if line.strip()]
    tok = Tokenizer.train(captions * 4, 300)
    tok.save(root / "tok")
    # 16 training pairs, trained on and evaluated: retrieval must learn them.
    seen = train.parent / "seen.jsonl"
    seen.write_text("".join(line + "\n" for line in train.read_text().splitlines()[:16]))
    return {"root": root, "train": train, "heldout": heldout, "seen": seen, "tok": root / "tok"}


def chance_accuracy(manifest: Path) -> float:
    """Expected top-1 retrieval accuracy of random embeddings: identical captions count as right."""
    caps = [json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()]
    return sum(caps.count(c) for c in caps) / len(caps) ** 2


def test_clip_pretrain_run(world, tmp_path):
    out = tmp_path / "clip"
    cfg = load_config(
        ClipPretrainConfig,
        CONFIG,
        [
            *TINY,
            f"tokenizer={world['tok']}",
            f"out={out}",
            f"data.train=[{world['seen']}]",
            f"data.heldout=[{world['seen']},{world['heldout']}]",
            "train.batch_size=16",
            "train.max_steps=30",
            "train.save_every=15",
        ],
    )
    # The encoder the run starts from: same seed, same construction order.
    set_seed(cfg.train.seed)
    init = {
        k: v.clone()
        for k, v in build_clip_model(cfg, Tokenizer.from_file(world["tok"]).vocab_size)
        .image_encoder.state_dict()
        .items()
    }
    summary = run_encoder_pretrain(cfg)
    assert summary["stopped"] == "max_steps"

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) for r in recs)

    sd = load_tensors(out / "final" / "encoder.safetensors")
    fresh = ImageEncoder(cfg.image_encoder)
    fresh.load_state_dict(sd, strict=True)
    assert set(sd) == set(fresh.state_dict())
    proj = [k for k in sd if k.startswith("project.")]
    assert proj and all(torch.equal(sd[k], init[k]) for k in proj)
    assert any(not torch.equal(sd[k], init[k]) for k in sd if k.startswith("vit."))

    s = json.loads((out / "summary.json").read_text())
    assert s["retrieval"]["heldout"]["n"] == 16 and s["retrieval"]["seen"]["n"] == 16
    # The trained model retrieves the pairs it learned far above chance (0.07 here; the untrained one is near it).
    chance = chance_accuracy(world["seen"])
    acc = s["retrieval"]["seen"]
    for k in ("image_to_text", "text_to_image"):
        assert acc[k] >= max(0.5, 5 * chance), (k, acc[k], chance)


def test_cli_pretrain_encoder(world, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run(
        [
            str(BIN / "mm"),
            "pretrain-encoder",
            "--config",
            str(CONFIG),
            "--data",
            str(world["train"]),
            "--out",
            str(out),
            "--max-steps",
            "2",
            *TINY,
            f"tokenizer={world['tok']}",
            f"data.heldout=[{world['heldout']}]",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["step"] == 2 and math.isfinite(res["final_loss"])
    assert (out / "final" / "encoder.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
