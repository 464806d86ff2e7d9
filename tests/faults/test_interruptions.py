"""Interruptions: SIGKILL at random steps (several seeds) during LM pretraining and during an adapter stage,
SIGKILL in the middle of a checkpoint write, and a full disk during an adapter stage. Resumed runs must give
the same losses step for step as an uninterrupted run, and no half-written checkpoint may ever be loaded."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm.lm import Tokenizer, Transformer, preset, save_hf
from mm.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LM_STEPS = 40


def lm_config(tmp_path: Path, corpus: dict, save_every: int = 5) -> Path:
    p = tmp_path / "lm.yaml"
    p.write_text(
        f"""model: {{preset: nano}}
tokenizer: {{path: {corpus["tokenizer"]}}}
data: [{{paths: [{corpus["train"]}], name: shapes, doc_split: line}}]
optim: {{lr: 3.0e-3, warmup_steps: 3}}
train: {{max_steps: {LM_STEPS}, batch_size: 8, seq_len: 32, save_every: {save_every}, keep_last: 2,
        num_threads: 1, peak_flops: 1.0e9}}
"""
    )
    return p


def losses(out: Path) -> list[float]:
    """Loss per step from metrics.jsonl."""
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def last_step(out: Path) -> int:
    """Last step logged so far (0 if none)."""
    m = out / "metrics.jsonl"
    text = m.read_text() if m.exists() else ""
    lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only: the run may be writing the last one
    return json.loads(lines[-1])["step"] if lines else 0


def run_until(cmd: list[str], cwd: Path, until: callable, timeout: float = 180) -> subprocess.Popen:
    """Start cmd; SIGKILL it as soon as until() holds. Fails if the process ends first."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=cwd, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not until():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def assert_every_visible_checkpoint_loads(root: Path) -> int:
    """Each listed checkpoint loads whole; returns how many there are."""
    found = list_checkpoints(root)
    for ck in found:
        state = load_checkpoint(ck)
        assert state["model"] and state["trainer"]["step"] == int(ck.name.split("_")[-1])
    return len(found)


@pytest.fixture(scope="module")
def lm_reference(corpus, tmp_path_factory) -> tuple[Path, list[float]]:
    d = tmp_path_factory.mktemp("lmref")
    cfg = lm_config(d, corpus)
    out = d / "ref"
    subprocess.run([BIN / "mm", "pretrain-lm", "--config", cfg, "--out", out], check=True, env=ENV, cwd=d)
    return cfg, losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_at_a_random_step_of_lm_pretraining_resumes_identically(seed, lm_reference, tmp_path, faults):
    cfg, ref = lm_reference
    kill_at = random.Random(seed).randint(2, LM_STEPS - 5)
    out = tmp_path / "run"
    run_until(
        [BIN / "mm", "pretrain-lm", "--config", cfg, "--out", out],
        tmp_path,
        lambda: last_step(out) >= kill_at,
    )
    assert assert_every_visible_checkpoint_loads(out / "checkpoints") >= (1 if kill_at >= 5 else 0)
    subprocess.run(
        [BIN / "mm", "pretrain-lm", "--config", cfg, "--out", out, "--resume"],
        check=True,
        env=ENV,
        cwd=tmp_path,
    )
    got = losses(out)
    faults.lost(int(got != ref))
    assert got == ref
    faults.record("interruptions", what="SIGKILL during LM pretraining")


SLOW_WRITE = """
import os, sys, time
import mm.training.checkpoint as ck
real = ck.save_state
def slow(state, path, async_save=False):
    out = real(state, path, async_save=async_save)
    if path.parent.name.startswith(".step_00000010"):
        open(os.environ["MM_TEST_MARKER"], "w").close()  # the shards are on disk, the rest is not
        time.sleep(60)
    return out
ck.save_state = slow
from mm.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_leaves_only_whole_checkpoints(lm_reference, tmp_path, faults):
    cfg, ref = lm_reference
    out, marker = tmp_path / "run", tmp_path / "writing"
    cmd = [sys.executable, "-c", SLOW_WRITE, "pretrain-lm", "--config", str(cfg), "--out", str(out)]
    env = {**ENV, "MM_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 120, "never reached the checkpoint write"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = out / "checkpoints"
    half = [p.name for p in root.iterdir() if p.name.startswith(".step_00000010")]
    assert half, "the kill did not land inside the write"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005"]
    assert latest_checkpoint(root).name == "step_00000005"
    assert assert_every_visible_checkpoint_loads(root) == 1
    subprocess.run(
        [BIN / "mm", "pretrain-lm", "--config", cfg, "--out", out, "--resume"],
        check=True,
        env=ENV,
        cwd=tmp_path,
    )
    got = losses(out)
    faults.lost(int(got != ref))
    assert got == ref
    faults.record("interruptions", what="SIGKILL inside a checkpoint write")


@pytest.fixture(scope="module")
def image_world(corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faultimg")
    tok = Tokenizer.from_file(corpus["tokenizer"])
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size)), root / "lm")
    tok.save(root / "lm")
    train = synth_shapes(root, n=40, seed=0, split="train")
    overrides = [
        f"lm={root / 'lm'}",
        f"data.train=[{train}]",
        "image_encoder.embed_dim=32",
        "image_encoder.depth=2",
        "image_encoder.num_heads=2",
        "image_encoder.intermediate_layers=[0]",
        "train.batch_size=4",
        "train.max_steps=12",
        "train.save_every=3",
        "train.num_threads=1",
        "train.peak_flops=1e9",
        "eval_samples=0",
    ]
    cfg = ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml"
    ref = root / "ref"
    subprocess.run(
        [BIN / "mm", "train", "--config", cfg, *overrides, "--out", ref], check=True, env=ENV, cwd=root
    )
    return {"root": root, "cfg": cfg, "overrides": overrides, "ref": losses(ref)}


@pytest.mark.slow
def test_sigkill_during_an_adapter_stage_resumes_identically(image_world, tmp_path, faults):
    w = image_world
    kill_at = random.Random(5).randint(4, 10)
    out = tmp_path / "run"
    cmd = [BIN / "mm", "train", "--config", w["cfg"], *w["overrides"], "--out", out]
    run_until(cmd, tmp_path, lambda: last_step(out) >= kill_at)
    assert assert_every_visible_checkpoint_loads(out / "checkpoints") >= 1
    subprocess.run([*cmd, "--resume"], check=True, env=ENV, cwd=tmp_path)
    got = losses(out)
    faults.lost(int(got != w["ref"]))
    assert got == w["ref"]
    assert (out / "final" / "adapter.safetensors").is_file()
    faults.record("interruptions", what="SIGKILL during an adapter stage")


def test_full_disk_during_an_adapter_stage_keeps_the_previous_checkpoint(
    image_world, tmp_path, monkeypatch, faults
):
    import mm.training.checkpoint as ck
    from mm.stages.image import ImageStageConfig
    from mm.training.config import load_config
    from mm.training.runner import run as run_stage

    w = image_world
    cfg = load_config(
        ImageStageConfig, w["cfg"], [*w["overrides"], f"out={tmp_path / 'run'}", "train.max_steps=6"]
    )
    real = ck.save_state
    calls = {"n": 0}

    def full_disk(state, path, async_save=False):
        calls["n"] += 1
        if calls["n"] > 1:  # the step-3 checkpoint's shards are written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(state, path, async_save=async_save)

    monkeypatch.setattr(ck, "save_state", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_stage(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]  # no half-written folder
    state = load_checkpoint(root / "step_00000003")
    assert state["trainer"]["step"] == 3
    assert torch.isfinite(torch.cat([v.flatten().float() for v in state["model"].values()])).all()
    faults.lost(int(not (root / "step_00000003" / "trainer.json").is_file()))
    faults.record("interruptions", what="full disk during a checkpoint write")
