"""The one training loop: schedule, accumulation, only trainable parameters updated, checkpoints (atomic,
resumable, full disk, NaN), Polyak averaging, the LM pretraining recipe (ramp, RoPE switch, anneal)."""

import json
import math
from pathlib import Path

import pytest
import torch

from mm.lm import RopeScaling, load_hf
from mm.training.checkpoint import list_checkpoints, load_checkpoint, polyak_average
from mm.training.config import (
    ConfigError,
    DataSourceConfig,
    LMPretrainConfig,
    OptimConfig,
    RampStageConfig,
    load_config,
)
from mm.training.runner import run as run_stage
from mm.training.stage import Stage
from mm.training.trainer import Trainer, TrainingDiverged, lr_at

ROOT = Path(__file__).resolve().parents[2]


def make_cfg(corpus, out, **train) -> LMPretrainConfig:
    cfg = LMPretrainConfig()
    cfg.model.preset = "nano"
    cfg.tokenizer.path = str(corpus["tokenizer"])
    cfg.data = [DataSourceConfig(paths=[str(corpus["train"])], name="shapes", doc_split="line")]
    cfg.heldout = [DataSourceConfig(paths=[str(corpus["heldout"])], name="heldout", doc_split="line")]
    cfg.optim = OptimConfig(lr=3e-3, warmup_steps=2)
    cfg.train.batch_size, cfg.train.seq_len = 4, 32
    cfg.train.max_steps, cfg.train.save_every, cfg.train.keep_last = 6, 3, 2
    cfg.train.peak_flops = 1e9
    for k, v in train.items():
        setattr(cfg.train, k, v)
    cfg.out = str(out)
    return cfg


def losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_cosine_floor_and_anneal():
    o = OptimConfig(lr=1.0, min_lr_ratio=0.01, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert lr_at(109, o, 110) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    # With a 20-step anneal: cosine reaches the floor at step 90, then linear to 0 at the last step.
    assert lr_at(89, o, 110, anneal_steps=20) > 0.01
    assert lr_at(90, o, 110, anneal_steps=20) == pytest.approx(0.01 * (1 - 1 / 20))
    assert lr_at(109, o, 110, anneal_steps=20) == 0.0


def test_pretrain_writes_metrics_checkpoints_and_hf_export(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path / "run", max_steps=6)
    summary = run_stage(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_00000003",
        "step_00000006",
    ]
    assert summary["heldout_ppl"] == pytest.approx(math.exp(summary["heldout_loss"]))
    model = load_hf(tmp_path / "run" / "final")  # the final LM is an HF Llama directory
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000006")["model"]
    torch.testing.assert_close(model.tok_embeddings.weight, ck["tok_embeddings.weight"])


def test_keep_last_k(corpus, tmp_path):
    run_stage(make_cfg(corpus, tmp_path, max_steps=8, save_every=1, keep_last=3))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000006",
        "step_00000007",
        "step_00000008",
    ]


def test_resume_continues_with_identical_losses(corpus, tmp_path):
    full = run_stage(make_cfg(corpus, tmp_path / "full", max_steps=8))
    part = make_cfg(corpus, tmp_path / "part", max_steps=8)
    part.train.max_steps = 3  # stop early, as if interrupted after the step-3 checkpoint
    run_stage(part)
    resumed = run_stage(make_cfg(corpus, tmp_path / "part", max_steps=8), resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert resumed["final_loss"] == full["final_loss"]
    # the stage's training seconds (learning curves against seconds) go on from the interrupted run's
    recs = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["elapsed_s"] for r in recs]
    assert [r["step"] for r in recs] == list(range(1, 9)) and seconds == sorted(seconds) and seconds[0] > 0
    assert resumed["elapsed_s"] > seconds[2] and resumed["elapsed_s"] > resumed["wall_time_s"]


def test_accumulation_is_normalised_by_loss_tokens(corpus, tmp_path):
    run_stage(make_cfg(corpus, tmp_path / "a", max_steps=4))
    run_stage(make_cfg(corpus, tmp_path / "b", max_steps=4, micro_batch_size=1))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "a")), torch.tensor(losses(tmp_path / "b")))


def test_ramp_changes_shapes_and_switches_rope(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path, max_steps=6)
    scaling = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16)
    cfg.train.ramp = [
        RampStageConfig(until_tokens=200, batch_size=4, seq_len=16),
        RampStageConfig(until_tokens=0, batch_size=2, seq_len=64, rope_scaling=scaling),
    ]
    run_stage(cfg)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["batch_size"], r["seq_len"]) for r in recs] == [(4, 16)] * 4 + [(2, 64)] * 2
    model = load_hf(tmp_path / "final")
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.factor == 4.0


def test_asynchronous_checkpoints_resume_like_synchronous_ones(corpus, tmp_path):
    """`train.async_checkpoint`: shards are written in a background thread while training goes on, and the
    folder is published when whole; the checkpoints equal synchronous ones, and resume the same."""
    from mm.training.dcp import read_full

    for mode in ("sync", "async"):
        part = make_cfg(corpus, tmp_path / mode, max_steps=4, save_every=2, async_checkpoint=mode == "async")
        run_stage(part)
    ckpts = tmp_path / "async" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    assert not list(ckpts.glob(".*"))  # no temporary folder left
    for step in ("step_00000002", "step_00000004"):  # model and optimizer tensors, bit for bit
        a, s = (read_full(tmp_path / m / "checkpoints" / step / "dcp", "") for m in ("async", "sync"))
        assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in s)
        trainer = [
            json.loads((tmp_path / m / "checkpoints" / step / "trainer.json").read_text())
            for m in ("async", "sync")
        ]
        for t in trainer:
            del t["config"]  # the run's own folder and switches
            assert t.pop("elapsed_s") > 0  # the run's training seconds so far (a measurement)
        assert trainer[0] == trainer[1]  # step, tokens seen, data position as at the save
    for mode in ("sync", "async"):
        run_stage(make_cfg(corpus, tmp_path / mode, max_steps=6), resume=True)
    assert losses(tmp_path / "async") == losses(tmp_path / "sync") and len(losses(tmp_path / "sync")) == 6


def test_polyak_average_is_the_mean_of_the_named_checkpoints(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path, max_steps=8, save_every=100, keep_last=1)
    cfg.anneal.steps, cfg.anneal.source, cfg.anneal.polyak_k = 4, "shapes", 2
    summary = run_stage(cfg)
    assert summary["polyak_checkpoints"] == ["step_00000006", "step_00000008"]
    a = load_checkpoint(tmp_path / "checkpoints" / "step_00000006")["model"]
    b = load_checkpoint(tmp_path / "checkpoints" / "step_00000008")["model"]
    final = load_hf(tmp_path / "final")
    mean = (a["layers.0.attention.wq.weight"] + b["layers.0.attention.wq.weight"]) / 2
    torch.testing.assert_close(final.layers[0].attention.wq.weight, mean)
    avg = polyak_average(
        [tmp_path / "checkpoints" / "step_00000006", tmp_path / "checkpoints" / "step_00000008"]
    )
    for k in a:
        torch.testing.assert_close(avg[k], (a[k] + b[k]) / 2)
    assert not torch.equal(a["norm.weight"], b["norm.weight"])


class _TwoPart(Stage):
    """A toy stage: a frozen 'lm' and a trainable 'head'; loss can be forced to NaN."""

    name = "toy"

    def __init__(self, nan_at: int | None = None):
        self.model = torch.nn.ModuleDict({"lm": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 1)})
        self.nan_at, self.calls = nan_at, 0

    def trainable(self):
        return list(self.model["head"].named_parameters(prefix="head"))

    def frozen(self):
        return {"lm": self.model["lm"]}

    def batch_shape(self, step, tokens_seen):
        return 4, 1

    def next_batch(self, rows, seq_len):
        x = torch.randn(rows, 4)
        return {"x": x, "labels": torch.zeros(rows, dtype=torch.long)}

    def loss(self, batch):
        self.calls += 1
        out = self.model["head"](self.model["lm"](batch["x"])).pow(2).sum()
        if self.nan_at is not None and self.calls >= self.nan_at:
            out = out * float("nan")
        return out, torch.tensor(batch["x"].shape[0])


def test_only_trainable_parameters_reach_the_optimizer_and_change(tmp_path):
    task = _TwoPart()
    lm_before = {k: v.clone() for k, v in task.model["lm"].state_dict().items()}
    head_before = task.model["head"].weight.clone()
    tr = LMPretrainConfig().train
    tr.max_steps, tr.save_every, tr.peak_flops = 3, 0, 1e9
    trainer = Trainer(task, tr, OptimConfig(lr=0.1, warmup_steps=0), tmp_path)
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in task.model["head"].parameters()}
    assert not any(id(p) in opt_ids for p in task.model["lm"].parameters())
    trainer.fit()
    for k, v in task.model["lm"].state_dict().items():
        assert torch.equal(v, lm_before[k])
    assert not torch.equal(task.model["head"].weight, head_before)
    ck = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert set(ck["model"]) == {"head.weight", "head.bias"}  # the checkpoint holds only what trains


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    task = _TwoPart(nan_at=5)
    tr = LMPretrainConfig().train
    tr.max_steps, tr.save_every, tr.peak_flops = 10, 2, 1e9
    trainer = Trainer(task, tr, OptimConfig(lr=0.1, warmup_steps=0), tmp_path)
    with pytest.raises(TrainingDiverged, match="at step 5.*step_00000004"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step_00000004"


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    task = _TwoPart()
    tr = LMPretrainConfig().train
    tr.max_steps, tr.save_every, tr.peak_flops = 4, 2, 1e9
    trainer = Trainer(task, tr, OptimConfig(lr=0.1, warmup_steps=0), tmp_path)
    import mm.training.checkpoint as ckpt

    real = ckpt.save_state
    calls = {"n": 0}

    def failing(state, path, async_save=False):
        calls["n"] += 1
        if calls["n"] > 1:  # the first checkpoint's shards are written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(state, path, async_save=async_save)

    monkeypatch.setattr(ckpt, "save_state", failing)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert names == ["step_00000002"]  # no half-written folder left behind
    ck = load_checkpoint(tmp_path / "checkpoints" / "step_00000002")
    assert ck["trainer"]["step"] == 2


def test_bad_inputs_are_named(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    cfg.data = [DataSourceConfig(paths=[str(tmp_path / "nope.txt")])]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        run_stage(cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg.data = [DataSourceConfig(paths=[str(empty)])]
    with pytest.raises(ValueError, match="empty.txt"):
        run_stage(cfg)
    with pytest.raises(ConfigError, match=r"'train.max_stepz'.*allowed keys there: \[.*'max_steps'"):
        load_config(LMPretrainConfig, ROOT / "configs" / "lm" / "tiny.yaml", ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config(LMPretrainConfig, None, ["optim.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'train.batch_sise'"):
        load_config(LMPretrainConfig, bad)


def test_presets_load():
    for name in ("tiny", "llama3-8b"):
        cfg = load_config(LMPretrainConfig, ROOT / "configs" / "lm" / f"{name}.yaml")
        assert cfg.model.build().num_params() > 0
    cfg = load_config(LMPretrainConfig, ROOT / "configs" / "lm" / "llama3-8b.yaml")
    assert cfg.optim.lr == 3e-4 and cfg.train.ramp[0].seq_len == 4096 and cfg.train.ramp[1].seq_len == 8192


def test_lr_multipliers_by_parameter_name(tmp_path):
    task = _TwoPart()
    tr = LMPretrainConfig().train
    tr.max_steps, tr.save_every, tr.peak_flops = 1, 0, 1e9
    optim = OptimConfig(lr=0.1, warmup_steps=0, lr_mult={"bias": 10.0})
    trainer = Trainer(task, tr, optim, tmp_path)
    trainer.fit()
    by_id = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    assert by_id[id(task.model["head"].bias)]["lr"] == pytest.approx(
        10 * by_id[id(task.model["head"].weight)]["lr"]
    )
    assert (
        by_id[id(task.model["head"].weight)]["weight_decay"] > 0
        and by_id[id(task.model["head"].bias)]["weight_decay"] == 0
    )


def test_mfu_denominator_is_the_data_sheet_peak_on_a_known_gpu(monkeypatch):
    import mm.training.services as services

    assert services.chip_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert services.chip_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert services.chip_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 66.9e12
    assert services.chip_peak_flops("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 494.7e12
    assert services.chip_peak_flops("NVIDIA GeForce RTX 4090", torch.bfloat16) == 0.0
    monkeypatch.setattr(services, "measure_peak_flops", lambda device, dtype: 123.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert services.mfu_denominator(torch.device("cuda"), torch.bfloat16) == 989.4e12
    assert services.mfu_denominator(torch.device("cpu"), torch.bfloat16) == 123.0  # the CPU: a timed matmul
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert services.mfu_denominator(torch.device("cuda"), torch.bfloat16) == 123.0  # an unknown GPU too


def test_the_cuda_process_group_has_a_cpu_backend_for_asynchronous_checkpoints():
    from mm.training.distributed import process_group_backend

    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(cuda=False) == "gloo"


def test_tf32_is_enabled_on_cuda_only():
    from mm.training.services import enable_tf32

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        assert not enable_tf32(torch.device("cpu")) and not matmul.allow_tf32
        assert enable_tf32(torch.device("cuda")) and matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_micro_batches_go_to_the_device_one_ahead_not_all_at_once(corpus, tmp_path, monkeypatch):
    from mm.stages.lm_pretrain import LMPretrainStage

    events = []
    moved = Trainer._on_device
    monkeypatch.setattr(Trainer, "_on_device", lambda self, mb: events.append("move") or moved(self, mb))
    loss = LMPretrainStage.loss
    monkeypatch.setattr(LMPretrainStage, "loss", lambda self, b: events.append("forward") or loss(self, b))
    cfg = make_cfg(corpus, tmp_path / "run", max_steps=1, save_every=0, micro_batch_size=1)
    cfg.heldout = []
    run_stage(cfg)
    # 4 rows in micro-batches of 1: each moved right after the previous one's forward, never all first
    assert events == ["move", "forward", "move", "forward", "move", "forward", "move", "forward"]
