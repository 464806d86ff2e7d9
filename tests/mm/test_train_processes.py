"""Whole-process behaviour of `mm pretrain-lm`: SIGKILL + --resume reproduces the uninterrupted losses,
SIGTERM saves before exiting, 2-process FSDP2 (gloo, its LM loss in chunks) equals one process (the README
commands: tests/test_readme.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm.lm import load_hf
from mm.training.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cfg_file(tmp_path, corpus, steps=40, save_every=5) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(
        f"""model: {{preset: nano}}
tokenizer: {{path: {corpus["tokenizer"]}}}
data: [{{paths: [{corpus["train"]}], name: shapes, doc_split: line}}]
optim: {{lr: 3.0e-3, warmup_steps: 3}}
train: {{max_steps: {steps}, batch_size: 8, seq_len: 32, save_every: {save_every}, keep_last: 2,
        num_threads: 1, peak_flops: 1.0e9}}
"""
    )
    return p


def mm_cmd(*args) -> list[str]:
    return [str(BIN / "mm"), *map(str, args)]


def losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    t0 = time.time()
    metrics = out / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read() if proc.stderr else ''}")
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [7])  # (random kill steps: tests/faults/test_interruptions.py)
def test_sigkill_then_resume_gives_identical_losses(corpus, tmp_path, kill_after):
    cfg = cfg_file(tmp_path, corpus)
    ref = tmp_path / "ref"
    subprocess.run(mm_cmd("pretrain-lm", "--config", cfg, "--out", ref), check=True, env=ENV, cwd=tmp_path)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        mm_cmd("pretrain-lm", "--config", cfg, "--out", out), env=ENV, cwd=tmp_path, stderr=subprocess.DEVNULL
    )
    reached = wait_for_step(out, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached < 40, "the run finished before it could be killed"
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and load_checkpoint(ck)["trainer"]["step"] <= reached
    subprocess.run(
        mm_cmd("pretrain-lm", "--config", cfg, "--out", out, "--resume"), check=True, env=ENV, cwd=tmp_path
    )
    assert losses(out) == losses(ref)
    assert len(losses(ref)) == 40


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_resume_finishes(corpus, tmp_path):
    cfg = cfg_file(tmp_path, corpus, steps=300, save_every=1000)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        mm_cmd("pretrain-lm", "--config", cfg, "--out", out),
        env=ENV,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    last = losses(out)
    ck = latest_checkpoint(out / "checkpoints")
    assert load_checkpoint(ck)["trainer"]["step"] == len(last) < 300  # saved at the step it stopped
    subprocess.run(
        mm_cmd("pretrain-lm", "--config", cfg, "--out", out, "--resume", "--max-steps", len(last) + 3),
        check=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert len(losses(out)) == len(last) + 3


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_loads_in_one(corpus, tmp_path):
    cfg = cfg_file(tmp_path, corpus, steps=8, save_every=4)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(mm_cmd("pretrain-lm", "--config", cfg, "--out", one), check=True, env=ENV, cwd=tmp_path)
    subprocess.run(
        [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "mm", "pretrain-lm"]
        + ["--config", cfg, "--out", two, "train.loss_chunk=24"],  # the sharded head's loss in chunks too
        check=True,
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
    )
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-5)
    a, b = load_hf(one / "final"), load_hf(two / "final")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    # The 2-process checkpoint (optimizer state included) resumes in a single process.
    shutil.rmtree(two / "final")
    subprocess.run(
        mm_cmd("pretrain-lm", "--config", cfg, "--out", two, "--resume", "--max-steps", 10),
        check=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert len(losses(two)) == 10


def test_missing_data_path_is_a_clear_cli_error(tmp_path):
    r = subprocess.run(
        mm_cmd("pretrain-lm", "--config", ROOT / "configs/lm/tiny.yaml", "--data", tmp_path / "missing.txt"),
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "missing.txt" in r.stderr
