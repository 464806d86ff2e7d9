"""The video stage under torchrun (2 processes, gloo): its trained video cross-attention is sharded by FSDP2
(DTensor parameters, AdamW groups that never mix them with the replicated aggregator's plain tensors), the
losses equal one process, and the 2-process checkpoint resumes in 2 processes and in one. Built on the meta
device, the stage reads the image bundle's tensors lazily: a process of 2 reads about half of the frozen image
cross-attention (sharded) and the whole image encoder (replicated by design)."""

import copy
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


@pytest.fixture(scope="module")
def video(tmp_path_factory, corpus, stage_helpers):
    root = tmp_path_factory.mktemp("video-sharding")
    return root, video_config(root, corpus, stage_helpers)


def test_video_cross_attention_is_sharded_equal_to_one_process_and_resumes(video, tmp_path):
    cfg = copy.deepcopy(video[1])
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


def test_the_video_stage_reads_half_of_the_sharded_image_path_per_process(video):
    from mm.training.runner import build, context, stage_for
    from mm.training.trainer import setup_run

    cfg = copy.deepcopy(video[1])
    eager = stage_for(cfg, context(cfg, setup_run(cfg.train)))
    eager.build(torch.device("cpu"))
    want = dict(eager.model.named_parameters())
    stage = stage_for(cfg, context(cfg, torch.device("cpu")))
    rec = build(stage)  # on the meta device, recorded
    xattn = [n for n in want if n.startswith("image_xattn.")]
    encoder = [n for n in want if n.startswith("image_encoder.")]
    assert xattn and encoder and set(xattn + encoder) <= set(rec.sources)  # none read at build time
    for names, sharded in ((xattn, True), (encoder, False)):
        total = sum(want[n].numel() * want[n].element_size() for n in names)
        for rank in range(2):
            got = 0
            for n in names:
                full = want[n].detach()
                if not full.dim():
                    part, expect = rec.sources[n].read(), full
                else:
                    rows = full.shape[0]
                    size = -(-rows // 2)  # FSDP2's dim-0 shard of a process of 2
                    start, stop = (
                        (min(rows, rank * size), min(rows, (rank + 1) * size)) if sharded else (0, rows)
                    )
                    if start == stop:
                        continue
                    part, expect = rec.sources[n].read(start, stop), full[start:stop]
                assert torch.equal(part, expect), n
                got += part.numel() * part.element_size()
            share = (
                0.5 if sharded else 1.0
            )  # the encoder is replicated by design (`VideoStage.parallel_plan`)
            assert abs(got - share * total) <= 0.1 * total, (names[0], rank, got, total)
