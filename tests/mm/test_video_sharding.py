"""The video stage under torchrun (2 processes, gloo): its trained video cross-attention is sharded by FSDP2
(DTensor parameters, AdamW groups that never mix them with the replicated aggregator's plain tensors), the
losses equal one process, and the 2-process checkpoint resumes in 2 processes and in one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.training.config import config_to_yaml
from mm.training.runner import run
from mm.world import synth_motion, synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMON = ["train.batch_size=4", "train.save_every=2", "train.num_threads=1", "train.peak_flops=1e9"]
COMMON += ["train.seed=3"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def video_config(root: Path, corpus, helpers):
    """A nano LM, an image bundle (2 steps) and the video stage's config on 4 clips."""
    lm = helpers["nano_lm"](root, corpus)
    shapes = synth_shapes(root, n=8, seed=0, split="train")
    clips = synth_motion(root, n=4, seed=0, split="train")
    image = helpers["image_overrides"](lm, shapes)
    bundle = helpers["stage_config"](
        "image-pretrain", "configs/stages/image_pretrain_tiny.yaml", [*image, *COMMON, "train.max_steps=2"]
    )
    bundle.out = str(root / "image-bundle")
    run(bundle)
    video = [
        f"init_from={root / 'image-bundle' / 'final'}",
        f"data.train=[{clips}]",
        "aggregator.merge=2",
        "aggregator.n_latents=4",
        "aggregator.depth=1",
        "aggregator.n_heads=2",
        "data.n_frames=4",
        "eval_samples=0",
        "curve_samples=0",
    ]
    return helpers["stage_config"]("video", "configs/stages/video_tiny.yaml", [*video, *COMMON])


def losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_video_cross_attention_is_sharded_equal_to_one_process_and_resumes(tmp_path, corpus, stage_helpers):
    cfg = video_config(tmp_path, corpus, stage_helpers)
    cfg.out = str(tmp_path / "two")
    jobs = []
    for steps, resume in ((2, False), (3, True)):  # 2 steps and a checkpoint, then one more step from it
        cfg.train.max_steps = steps
        path = tmp_path / f"video-{steps}.yaml"
        path.write_text(config_to_yaml(cfg))
        jobs.append({"config": str(path), "resume": resume})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    record = tmp_path / "trainable.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MM_TEST_TRAINABLE": str(record)}
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", ROOT / "tests/mm/stage_worker.py"]
    r = subprocess.run([*cmd, tmp_path / "jobs.json"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    recs = [json.loads(x) for x in record.read_text().splitlines()]
    assert sorted(x["rank"] for x in recs) == [0, 0, 1, 1]
    for rec in recs:
        kinds = rec["params"]
        xattn = {n: k for n, k in kinds.items() if n.startswith("video_xattn.")}
        assert xattn and set(xattn.values()) == {"DTensor"}, kinds
        agg = {k for n, k in kinds.items() if n.startswith("video_aggregator.")}
        assert agg == {"Parameter"}, kinds  # replicated by design (`VideoStage.parallel_plan`)
        assert all(len(g) == 1 for g in rec["groups"]), rec["groups"]  # no group mixes the two
    one = tmp_path / "one"
    cfg.out, cfg.train.max_steps = str(one), 3
    run(cfg)
    ref, got = losses(one), losses(tmp_path / "two")
    assert len(ref) == len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-5, atol=2e-5)
    # the clipped norm combines the sharded and the replicated gradients' norms as one process's single norm
    norms = [losses(out, "grad_norm") for out in (one, tmp_path / "two")]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-4, atol=1e-6)
    # the 2-process checkpoint (AdamW state of sharded and replicated parameters) resumes in one process
    cfg.out, cfg.train.max_steps = str(tmp_path / "two"), 4
    run(cfg, resume=True)
    after = losses(tmp_path / "two")
    assert len(after) == 4 and after[:3] == got
