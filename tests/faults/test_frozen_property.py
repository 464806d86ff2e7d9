"""Frozen means frozen, as a property over random stage configurations: whatever trains and however (placement,
tiles, accumulation, autocast, activation checkpointing, learning rate, a stage chained on another), every LM
tensor is bit-identical afterwards, and the adapter checkpoint is refused against an LM that differs in one value."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm.formats.bundle import verify_frozen
from mm.lm import Tokenizer, Transformer, load_hf, preset, save_hf
from mm.stages.image import ImageStageConfig
from mm.stages.image_model import load_image_bundle
from mm.training.config import load_config
from mm.training.freeze import FrozenLMChanged
from mm.training.runner import run as run_stage
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("frozenprop")
    tok = Tokenizer.from_file(corpus["tokenizer"])
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size, n_layers=4)), root / "lm")
    tok.save(root / "lm")
    other = root / "lm_other"  # the same LM with one value changed
    shutil.copytree(root / "lm", other)
    sd = load_file(str(other / "model.safetensors"))
    sd["model.layers.2.self_attn.o_proj.weight"][1, 2] += 1e-4
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    train = synth_shapes(root, n=24, seed=2, split="train")
    return {"root": root, "lm": root / "lm", "other": other, "train": train}


def random_overrides(rng: random.Random) -> list[str]:
    """A random but valid image-stage configuration (2 steps)."""
    return [
        f"xattn.every={rng.choice([1, 2, 4])}",
        f"xattn.hf_row_compat={rng.choice(['true', 'false'])}",
        f"data.max_tiles={rng.choice([1, 2, 4])}",
        f"train.batch_size={rng.choice([2, 4])}",
        f"train.micro_batch_size={rng.choice([0, 1])}",
        f"train.autocast={rng.choice(['none', 'bf16'])}",
        f"train.activation_checkpointing={rng.choice(['true', 'false'])}",
        f"optim.lr={rng.choice([1e-4, 3e-3, 1.0])}",
        f"optim.weight_decay={rng.choice([0.0, 0.1, 10.0])}",
        f"image_encoder.n_global_layers={rng.choice([0, 1])}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_lm_bit_identical_whatever_the_stage_configuration(seed, world, tmp_path, faults):
    rng = random.Random(seed)
    before = {k: v.clone() for k, v in load_hf(world["lm"]).state_dict().items()}
    files = {p.name: p.read_bytes() for p in world["lm"].iterdir()}
    base = [
        f"lm={world['lm']}",
        f"data.train=[{world['train']}]",
        "image_encoder.embed_dim=32",
        "image_encoder.depth=2",
        "image_encoder.num_heads=2",
        "image_encoder.intermediate_layers=[0]",
        "train.max_steps=2",
        "train.save_every=1",
        "train.num_threads=1",
        "train.peak_flops=1e9",
        "eval_samples=0",
    ]
    overrides = random_overrides(rng)
    cfg = load_config(
        ImageStageConfig, ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml", [*base, *overrides]
    )
    cfg.out = str(tmp_path / "pre")
    run_stage(cfg)
    if rng.random() < 0.5:  # chain an anneal stage on it
        anneal = load_config(
            ImageStageConfig, ROOT / "configs" / "stages" / "image_anneal_tiny.yaml", [*base, *overrides]
        )
        anneal.init_from, anneal.out = cfg.out + "/final", str(tmp_path / "anneal")
        run_stage(anneal)
        cfg = anneal
    after = load_hf(world["lm"]).state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    faults.lost(len(changed))
    assert not changed, (overrides, changed)
    assert {p.name: p.read_bytes() for p in world["lm"].iterdir()} == files
    bundle = Path(cfg.out) / "final"
    assert verify_frozen(bundle)[0]
    # The same adapter against an LM that differs in one value is refused.
    meta = json.loads((bundle / "mm_config.json").read_text())
    meta["lm_path"] = str(world["other"])
    (bundle / "mm_config.json").write_text(json.dumps(meta))
    with pytest.raises(FrozenLMChanged):
        load_image_bundle(bundle)
    assert not verify_frozen(bundle)[0]
    faults.record("configs", what="random stage config, LM bit-identical")
    faults.record("hostile", what="adapter against another LM")
