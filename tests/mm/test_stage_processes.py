"""Every stage under torchrun (2 processes, gloo): the losses equal one process at the same global batch, each
process reads only its share of the data, and the 2-process checkpoint resumes in one process.

One torchrun group runs all eight stages one after another (`stage_worker.py`); the one-process references
and the resumed runs run in this process.
"""

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from mm.training.config import config_to_yaml
from mm.training.runner import run

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS, BATCH = 2, 4
COMMON = [
    f"train.max_steps={STEPS}",
    f"train.batch_size={BATCH}",
    "train.save_every=2",
    "train.num_threads=1",
]
COMMON += ["train.peak_flops=1e9", "train.seed=3"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpus, stage_configs):
    """Tiny data of every modality, a nano LM, an image bundle, and every stage config."""
    root = tmp_path_factory.mktemp("stages")
    cfgs = stage_configs(root, corpus, COMMON)
    listing = []
    for name, cfg in cfgs.items():
        cfg.out = str(root / "two" / name)
        path = root / f"{name}.yaml"
        path.write_text(config_to_yaml(cfg))
        listing.append({"config": str(path)})
    (root / "jobs.json").write_text(json.dumps(listing))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", ROOT / "tests/mm/stage_worker.py"]
    r = subprocess.run([*cmd, root / "jobs.json"], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root, "cfgs": cfgs}


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


STAGES = [
    "lm-pretrain",
    "clip-pretrain",
    "bestrq-pretrain",
    "image-pretrain",
    "image-anneal",
    "video",
    "speech",
    "vision-sft",
    "lm-sft",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_two_processes_equal_one_read_their_share_and_resume_in_one(jobs, name):
    cfg = jobs["cfgs"][name]
    two = Path(cfg.out)
    one = jobs["root"] / "one" / name
    cfg.out = str(one)
    run(cfg)
    ref, got = losses(one), losses(two)
    assert len(ref) == len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-5, atol=2e-5)
    summary = json.loads((two / "summary.json").read_text())
    per_process = summary["data_per_process"]
    assert len(per_process) == 2
    if name == "lm-sft":  # each process read only its half of the rows: conversations and plain documents
        assert [p["chat_rows"] + p["text_rows"] for p in per_process] == [STEPS * BATCH // 2] * 2
    elif name != "lm-pretrain":  # each process decoded only its half of every global batch
        assert [p["tried"] for p in per_process] == [STEPS * BATCH // 2] * 2
    # the 2-process checkpoint resumes in one process: one more step, the first ones kept
    cfg.out = str(two)
    cfg.train.max_steps = STEPS + 1
    run(cfg, resume=True)
    after = losses(two)
    assert len(after) == STEPS + 1 and after[:STEPS] == got


def one_process_losses(cfg, out: Path, **train) -> list[float]:
    cfg = copy.deepcopy(cfg)
    cfg.out = str(out)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    run(cfg)
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_activation_checkpointing_and_compile_apply_to_every_stage_or_are_refused(jobs, name, monkeypatch):
    cfg = jobs["cfgs"][name]
    root = jobs["root"] / "ac" / name
    if name == "bestrq-pretrain":  # the Conformer layers are called piecewise: no block to wrap
        with pytest.raises(
            ValueError, match="train.activation_checkpointing: the bestrq-pretrain stage has no"
        ):
            one_process_losses(cfg, root / "ac", activation_checkpointing=True)
        with pytest.raises(ValueError, match="train.compile: the bestrq-pretrain stage has no"):
            one_process_losses(cfg, root / "compile", compile=True)
        return
    plain = one_process_losses(cfg, root / "plain")
    compiled = []  # compiling takes about a minute a stage here: record what would be compiled, run it eagerly
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    recomputed = one_process_losses(cfg, root / "ac", activation_checkpointing=True, compile=True)
    torch.testing.assert_close(torch.tensor(recomputed), torch.tensor(plain), rtol=1e-6, atol=1e-6)
    # each compiled forward is a block's checkpointed forward: partial(checkpoint, block.forward); and the LM's
    # head loss is compiled too (`apply_compile_loss`), not checkpointed
    blocks = [f for f in compiled if isinstance(f, functools.partial)]
    assert blocks and all(f.func is checkpoint for f in blocks)
    assert all(isinstance(getattr(f.args[0], "__self__", None), torch.nn.Module) for f in blocks)
    rest = [f for f in compiled if not isinstance(f, functools.partial)]
    assert all(f.__name__ == "head_loss" for f in rest)
    assert bool(rest) == (name != "clip-pretrain")  # every stage with an LM loss (CLIP has none)


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_eval_every_evaluates_every_stage_during_training(jobs, name):
    cfg = copy.deepcopy(jobs["cfgs"][name])
    data = cfg.data
    if name == "lm-pretrain":
        cfg.heldout = copy.deepcopy(cfg.data)
    elif name == "lm-sft":  # held-out dialogues (answered) and plain documents (perplexity)
        data.heldout_chat, data.heldout_text = list(data.train), list(data.text)
    else:
        data.heldout = list(data.train)
    for key in ("eval_samples", "curve_samples"):
        if hasattr(cfg, key):
            setattr(cfg, key, 4)
    out = jobs["root"] / "eval" / name
    one_process_losses(cfg, out, eval_every=1)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    evals = {k: v for k, v in first.items() if k.startswith("eval/")}
    assert evals, first
    assert all(isinstance(v, float) for v in evals.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bestrq-pretrain", "speech"])
def test_checkpoints_keep_the_batch_norm_statistics_of_the_trained_encoder(jobs, name):
    from mm.training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = copy.deepcopy(jobs["cfgs"][name])
    out = jobs["root"] / "bn" / name
    one_process_losses(cfg, out)
    model = load_checkpoint(latest_checkpoint(out / "checkpoints"))["model"]
    stats = [k for k in model if k.endswith(("running_mean", "running_var"))]
    assert stats, sorted(model)[:10]
    assert all(float(model[k].abs().sum()) > 0 for k in stats)
    assert not any(k.startswith("lm.") for k in model)
