"""A stage defined in a file outside `mm` (a toy regression with its own typed config) trains with
`mm train --config CFG`: the config's `stage_file:` names the file, which the CLI imports before looking the stage
up; nothing in `mm` lists it."""

import json
import textwrap

import pytest

from mm.app.cli import main
from mm.training.stage import STAGES

TOY_STAGE = '''
from dataclasses import dataclass, field

import torch
from torch import nn

from mm.training.config import StageConfig
from mm.training.parallelize import ParallelPlan
from mm.training.stage import Stage, register


@dataclass
class ToyData:
    train: list[str] = field(default_factory=lambda: ["generated"])


@dataclass
class ToyConfig(StageConfig):
    stage: str = "toy-regression"
    width: int = 4
    data: ToyData = field(default_factory=ToyData)
    out: str = "runs/toy"


@register(("toy-regression",), ToyConfig)
class ToyStage(Stage[ToyConfig]):
    """Fit y = sum(x) with one linear layer, on generated rows."""

    def build(self, device):
        self.model = nn.Sequential(nn.Linear(self.cfg.width, 8), nn.Linear(8, 1)).to(device)
        return self.model

    def parallel_plan(self):
        return ParallelPlan(self.model, blocks=list(self.model))

    def open_data(self, rank, world):
        self.gen = torch.Generator().manual_seed(self.cfg.train.seed + rank)

    def next_batch(self, rows, seq_len):
        x = torch.randn(rows, self.cfg.width, generator=self.gen)
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def count_loss_tokens(self, batch):
        return batch["x"].shape[0]

    def loss(self, batch):
        err = (self.model(batch["x"]) - batch["y"]).pow(2).sum()
        return err, torch.tensor(batch["x"].shape[0])

    def export(self, final, meta):
        if self.rank == 0:
            final.mkdir(parents=True, exist_ok=True)
            torch.save(self.gathered(dict(self.model.state_dict())), final / "toy.pt")
            (final / "meta.json").write_text(__import__("json").dumps({**meta, "width": self.cfg.width}))
'''


def test_a_stage_from_a_file_outside_mm_trains_with_mm_train(tmp_path, capsys):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy_stage.py").write_text(TOY_STAGE)
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            stage: toy-regression
            stage_file: plugins/toy_stage.py
            width: 3
            optim: {{lr: 0.05, warmup_steps: 1}}
            train: {{max_steps: 6, batch_size: 8, save_every: 3, device: cpu, peak_flops: 1.0e12,
                     activation_checkpointing: true}}
            out: {tmp_path / "run"}
            """
        )
    )
    assert main(["train", "--config", str(cfg)]) == 0
    assert "toy-regression" in STAGES
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (run / "final" / "toy.pt").is_file()
    assert json.loads((run / "final" / "meta.json").read_text()) == {"stage": "toy-regression", "width": 3}
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    assert main(["train", "--config", str(cfg), "--resume", "--max-steps", "8"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 8


def test_a_stage_file_that_fails_to_import_fails_again_when_imported_again(tmp_path):
    from mm.training.stage import import_stage_file

    bad = tmp_path / "broken_stage.py"
    bad.write_text("raise RuntimeError('half-written stage file')\n")
    for _ in range(2):  # not remembered as imported after the first failure
        with pytest.raises(RuntimeError, match="half-written stage file"):
            import_stage_file(bad)
    with pytest.raises(FileNotFoundError, match="stage_file='.*missing.py': no such file"):
        import_stage_file(tmp_path / "missing.py")
