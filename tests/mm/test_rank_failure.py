"""A failing process ends the torchrun group (2 processes, gloo) at once, with its traceback prefixed by its rank
(`mm.training.rank_failure`).

A toy stage (a file outside `mm`, named by the config's `stage_file:`) raises on rank 1 at step 2, while rank 0
blocks in a wait that does not notice a peer's death, as NCCL's waits do (a gloo collective would fail at once on
the closed connection): only the watcher thread ends it. Without it, torchrun's SIGTERM meets the trainer's
save-after-this-step handler and rank 0 waits for the agent's SIGKILL, 30 s later (measured: the test then fails)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BIN = Path(sys.executable).parent

FAILING_STAGE = '''
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mm.training.config import StageConfig
from mm.training.parallelize import ParallelPlan
from mm.training.stage import Stage, register


@dataclass
class FailData:
    train: list[str] = field(default_factory=lambda: ["generated"])


@dataclass
class FailConfig(StageConfig):
    stage: str = "fail-on-one-rank"
    rank0_blocks: bool = False
    data: FailData = field(default_factory=FailData)
    out: str = "runs/fail"


@register(("fail-on-one-rank",), FailConfig)
class FailStage(Stage[FailConfig]):
    """A linear regression whose rank 1 raises at step 2."""

    def build(self, device):
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).to(device)
        return self.model

    def parallel_plan(self):
        return ParallelPlan(self.model, blocks=list(self.model))

    def open_data(self, rank, world):
        self.gen = torch.Generator().manual_seed(rank)

    def on_step(self, step, tokens_seen):
        if step == 2 and self.rank == 1:
            open("failed_at", "w").write(repr(time.time()))
            raise RuntimeError("rank one cannot read shard-00017.tar")
        if step == 2 and self.cfg.rank0_blocks:
            time.sleep(120)  # a wait that does not notice a dead peer (as NCCL's)

    def next_batch(self, rows, seq_len):
        x = torch.randn(rows, 3, generator=self.gen)
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def count_loss_tokens(self, batch):
        return batch["x"].shape[0]

    def loss(self, batch):
        err = (self.model(batch["x"]) - batch["y"]).pow(2).sum()
        return err, torch.tensor(batch["x"].shape[0])
'''


def test_a_failing_rank_ends_the_group_promptly_with_its_traceback(tmp_path):
    (tmp_path / "fail_stage.py").write_text(FAILING_STAGE)
    cfg = tmp_path / "fail.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            stage: fail-on-one-rank
            stage_file: fail_stage.py
            rank0_blocks: true
            optim: {{lr: 0.05, warmup_steps: 1}}
            train: {{max_steps: 6, batch_size: 4, save_every: 100, device: cpu, peak_flops: 1.0e12,
                     num_threads: 1}}
            out: {tmp_path / "run"}
            """
        )
    )
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "mm", "train", "--config", cfg]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=100)
    took = time.time() - float((tmp_path / "failed_at").read_text())  # from the failure to the group's end
    assert r.returncode != 0, r.stderr[-3000:]
    err = r.stderr
    assert "[rank 1] mm: rank 1 of 2 failed; ending the process group" in err, err[-3000:]
    assert "[rank 1] RuntimeError: rank one cannot read shard-00017.tar" in err, err[-3000:]
    assert "[rank 1]   File " in err and "in on_step" in err  # the traceback, each line prefixed
    # rank 0 ends by itself (its watcher), saying why, without a traceback of its own
    assert "[rank 0] mm: ending this process: rank 1 failed" in err, err[-3000:]
    assert "[rank 0] Traceback" not in err
    assert took < 10, f"the group took {took:.1f} s to end"  # torchrun's SIGKILL would come after 30 s
