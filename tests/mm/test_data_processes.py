"""Data through DataLoader workers in a 4-process gloo run (torchrun): LM pretraining on memory-mapped token
shards (`mm data tokenize`) and an image stage on WebDataset shards. The losses equal one process (no workers)
at the same global batch; each process read only its rows / decoded only its samples (counted); the 4-process
checkpoint resumes in one process with the next global batch, reading nothing it had read before."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.app.cli import main as mm_main
from mm.lm import Tokenizer, Transformer, preset, save_hf
from mm.training.config import config_to_yaml, load_config
from mm.training.runner import run
from mm.training.stage import stage_class
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORLD, STEPS, BATCH, SEQ = 4, 2, 8, 32
COMMON = [
    f"train.max_steps={STEPS}",
    f"train.batch_size={BATCH}",
    "train.save_every=2",
    "train.num_threads=1",
    "train.peak_flops=1e9",
    "train.seed=3",
    "optim.warmup_steps=10",  # the LR of the first steps does not depend on max_steps
]


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def config(name: str, preset_file: str, overrides: list[str]):
    return load_config(stage_class(name).config_class, ROOT / preset_file, [*overrides, f"stage={name}"])


@pytest.fixture(scope="module")
def four(tmp_path_factory, corpus):
    """Tokenized text, image shards, a nano LM; both stages run by 4 processes with DataLoader workers."""
    root = tmp_path_factory.mktemp("data4")
    tokens = root / "tokens"
    assert mm_main(["data", "tokenize", "--tokenizer", str(corpus["tokenizer"]), "--out", str(tokens),
                    "--doc-split", "line", "--shard-tokens", "4000", str(corpus["train"])]) == 0  # fmt: skip
    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size)), root / "lm")
    tok.save(root / "lm")
    synth_shapes(root, n=24, seed=0, split="train", shard_size=5)
    shards = sorted(str(p) for p in (root / "shapes").glob("train-*.tar"))
    cfgs = {
        "lm-pretrain": config(
            "lm-pretrain",
            "configs/lm/tiny.yaml",
            [
                "model.preset=nano",
                "tokenizer.path=null",  # the folder's own tokenizer
                f"data=[{{paths: [{tokens}], name: shapes}}]",
                "heldout=[]",
                f"train.seq_len={SEQ}",
                "train.ramp=[]",
                "anneal.steps=0",
                "anneal.polyak_k=0",
                *COMMON,
            ],
        ),
        "image-pretrain": config(
            "image-pretrain",
            "configs/stages/image_pretrain_tiny.yaml",
            [
                f"lm={root / 'lm'}",
                f"data.train=[{','.join(shards)}]",
                "data.cache_samples=false",
                "data.num_workers=2",
                "data.shuffle_window=8",
                "eval_samples=0",
                "curve_samples=0",
                "image_encoder.embed_dim=32",
                "image_encoder.depth=2",
                "image_encoder.num_heads=2",
                "image_encoder.intermediate_layers=[0]",
                *COMMON,
            ],
        ),
    }
    jobs = []
    for name, cfg in cfgs.items():
        cfg.out = str(root / "four" / name)
        (root / f"{name}.yaml").write_text(config_to_yaml(cfg))
        jobs.append({"config": str(root / f"{name}.yaml")})
    jobs[0]["loader"] = {"num_workers": 1}  # lm-pretrain has no data.num_workers key
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", str(WORLD), ROOT / "tests/mm/data_worker.py"]
    r = subprocess.run([*cmd, root / "jobs.json"], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root, "cfgs": cfgs}


@pytest.mark.parametrize("name", ["lm-pretrain", "image-pretrain"])
def test_four_processes_with_workers_equal_one_read_their_share_and_resume_in_one(four, name):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = copy.deepcopy(four["cfgs"][name])
        got = Path(cfg.out)
        # one process, no DataLoader workers, one step more: the reference
        ref_out = four["root"] / "one" / name
        ref_cfg = copy.deepcopy(cfg)
        ref_cfg.out, ref_cfg.train.max_steps = str(ref_out), STEPS + 1
        if name == "image-pretrain":
            ref_cfg.data.num_workers = 0
        run(ref_cfg)
        ref = losses(ref_out)
        four_losses = losses(got)
        torch.testing.assert_close(torch.tensor(four_losses), torch.tensor(ref[:STEPS]), rtol=2e-5, atol=2e-5)

        # each process read only its share of every global batch
        per_process = json.loads((got / "summary.json").read_text())["data_per_process"]
        assert len(per_process) == WORLD
        assert [p["num_workers"] for p in per_process] == [1 if name == "lm-pretrain" else 2] * WORLD
        mine = STEPS * BATCH // WORLD
        if name == "lm-pretrain":
            assert [p["rows_read"] for p in per_process] == [mine] * WORLD
            assert [p["tokens_read"] for p in per_process] == [mine * (SEQ + 1)] * WORLD
            assert per_process[0]["sources"]["shapes"]["rows"] == STEPS * BATCH  # the global position
        else:
            assert [p["tried"] for p in per_process] == [mine] * WORLD

        # the 4-process checkpoint resumes in one process (with workers): the next global batch, nothing re-read
        cfg.train.max_steps = STEPS + 1
        if name == "lm-pretrain":
            cfg.loader.num_workers = 2
        summary = run(cfg, resume=True)
        after = losses(got)
        assert after[:STEPS] == four_losses and len(after) == STEPS + 1
        torch.testing.assert_close(torch.tensor(after[STEPS]), torch.tensor(ref[STEPS]), rtol=2e-5, atol=2e-5)
        read = summary["data_skips"]
        assert (read["rows_read"] if name == "lm-pretrain" else read["tried"]) == BATCH
    finally:
        torch.set_num_threads(n)
