"""Sharded checkpoints (torch.distributed.checkpoint): saved by 4 processes, resumed by 2 and by 1, the losses
are those of an uninterrupted run; an adapter stage's checkpoint holds no LM tensor, and no process gathered
any tensor to write it. LM pretraining (FSDP2 over the whole LM) and image-pretrain (FSDP2, LM frozen)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.training.checkpoint import latest_checkpoint, load_checkpoint
from mm.training.config import config_to_yaml
from mm.training.dcp import SafeReader
from mm.training.runner import run
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAIN = ["train.batch_size=4", "train.save_every=2", "train.num_threads=1", "train.peak_flops=1e9"]
TRAIN += ["train.seed=5", "train.keep_last=0"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchrun(n: int, jobs: list[dict], root: Path, gathers: Path | None = None) -> None:
    listing = root / f"jobs-{n}-{len(list(root.glob('jobs-*')))}.json"
    listing.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if gathers is not None:
        env["MM_TEST_GATHERS"] = str(gathers)
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", str(n), ROOT / "tests/mm/stage_worker.py"]
    r = subprocess.run([*cmd, listing], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def save_yaml(cfg, path: Path) -> str:
    path.write_text(config_to_yaml(cfg))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, stage_helpers):
    """For both stages: an uninterrupted 1-process run of 4 steps, and a 4-process run stopped at step 2 whose
    checkpoint is then resumed to step 4 by 2 processes (torchrun) and by 1 process (here)."""
    h = stage_helpers
    root = tmp_path_factory.mktemp("sharded")
    lm = h["nano_lm"](root, corpus)
    shapes = synth_shapes(root, n=32, seed=0, split="train")
    image = [*h["image_overrides"](lm, shapes), "image_encoder.intermediate_layers=[1]", *TRAIN]
    cfgs = {
        "lm-pretrain": h["lm_pretrain_config"](corpus, TRAIN),
        "image-pretrain": h["stage_config"](
            "image-pretrain", "configs/stages/image_pretrain_tiny.yaml", image
        ),
    }
    four, two = [], []
    for name, cfg in cfgs.items():
        cfg.train.max_steps = 4
        cfg.out = str(root / "whole" / name)
        run(cfg)
        cfg.train.max_steps = 2
        cfg.out = str(root / "four" / name)
        four.append({"config": save_yaml(cfg, root / f"{name}-four.yaml")})
    torchrun(4, four, root, gathers=root / "gathers.jsonl")
    for name, cfg in cfgs.items():
        for n in (2, 1):
            shutil.copytree(root / "four" / name, root / f"resumed{n}" / name)
        cfg.train.max_steps = 4
        cfg.out = str(root / "resumed2" / name)
        two.append({"config": save_yaml(cfg, root / f"{name}-two.yaml"), "resume": True})
    torchrun(2, two, root)
    for name, cfg in cfgs.items():
        cfg.out = str(root / "resumed1" / name)
        run(cfg, resume=True)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lm-pretrain", "image-pretrain"])
def test_saved_by_four_resumed_by_two_and_one_equals_an_uninterrupted_run(runs, name):
    whole = losses(runs / "whole" / name)
    assert len(whole) == 4
    four = losses(runs / "four" / name)
    torch.testing.assert_close(torch.tensor(four), torch.tensor(whole[:2]), rtol=2e-5, atol=2e-5)
    ck = latest_checkpoint(runs / "four" / name / "checkpoints")
    assert json.loads((ck / "trainer.json").read_text())["world_size"] == 4
    files = sorted(p.name for p in (ck / "dcp").iterdir())
    assert [f for f in files if f.endswith(".distcp")] == [f"__{r}_0.distcp" for r in range(4)]
    for n in (2, 1):
        got = losses(runs / f"resumed{n}" / name)
        assert got[:2] == four  # the first steps are the 4-process run's
        torch.testing.assert_close(torch.tensor(got[2:]), torch.tensor(whole[2:]), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_an_adapter_checkpoint_holds_no_lm_tensor_and_nothing_was_gathered(runs):
    ck = latest_checkpoint(runs / "four" / "image-pretrain" / "checkpoints")
    keys = SafeReader(str(ck / "dcp")).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and not any(k.startswith("model.lm.") for k in model_keys)
    assert {k.split(".")[1] for k in model_keys} == {"image_encoder", "image_xattn", "image_aux"}
    assert not any(".lm." in k or k.startswith("optimizer.state.lm.") for k in keys)
    full = load_checkpoint(ck)["model"]  # readable whole in one process
    assert set(full) == {k[len("model.") :] for k in model_keys}
    counts = [json.loads(x) for x in (runs / "gathers.jsonl").read_text().splitlines()]
    assert sorted(c["rank"] for c in counts) == [0, 1, 2, 3]
    assert all(c["saves"] == 2 and c["gathers"] == 0 for c in counts), counts  # 2 stages, 1 save each
