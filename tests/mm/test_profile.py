"""`mm profile`: a stage's real step measured phase by phase, its FLOPs, operator families and what evaluation and
checkpoints cost (tiny LM stage; the figures are measurements, so the test checks their consistency, not speed)."""

import json

import pytest

from mm.app.cli import main
from mm.app.profile_step import _family, format_profile, profile_stage
from mm.lm import preset
from mm.training.config import DataSourceConfig, LMPretrainConfig


def tiny_lm_config(corpus, out) -> LMPretrainConfig:
    cfg = LMPretrainConfig()
    cfg.model.preset = "nano"
    cfg.tokenizer.path = str(corpus["tokenizer"])
    cfg.data = [DataSourceConfig(paths=[str(corpus["train"])], name="shapes", doc_split="line")]
    cfg.heldout = [DataSourceConfig(paths=[str(corpus["heldout"])], name="heldout", doc_split="line")]
    cfg.train.batch_size, cfg.train.seq_len = 4, 32
    cfg.train.max_steps, cfg.train.save_every, cfg.train.eval_every = 100, 50, 25
    cfg.out = str(out)
    return cfg


def test_profile_measures_the_stage_step_and_counts_its_flops(corpus, tmp_path):
    cfg = tiny_lm_config(corpus, tmp_path / "lm")
    rec = profile_stage(cfg, steps=3, warmup=1, profiled_steps=2)
    m = rec["median_s"]
    assert rec["stage"] == "lm-pretrain" and rec["batch_size"] == 4
    assert 0 < m["forward"] < m["step"] and 0 < m["backward"] < m["step"]
    assert m["data"] + m["forward"] + m["backward"] + m["optimizer"] <= m["step"] * 1.001
    # FLOPs of one forward + backward: at least 6 x (non-embedding parameters) x tokens
    c = preset("nano", vocab_size=400)
    per_layer = 4 * c.dim * c.dim * (1 + c.n_kv_heads / c.n_heads) / 2 + 3 * c.dim * c.ffn_dim
    assert rec["flops_per_step"] >= 6 * c.n_layers * per_layer * 4 * 32 * 0.9
    assert rec["achieved_flop_s"] == pytest.approx(rec["flops_per_step"] / m["step"])
    assert rec["operator_s_per_step"]["matmul"] > 0 and rec["top_operators"]
    assert rec["eval_s"] > 0 and rec["checkpoint_s"] > 0  # the held-out perplexity and one saved checkpoint
    assert rec["amortised_eval_and_checkpoint_s_per_step"] == pytest.approx(
        rec["eval_s"] / 25 + rec["checkpoint_s"] / 50
    )
    assert not (tmp_path / "lm").exists()  # the stage's output folder is left alone
    assert "lm-pretrain:" in format_profile(rec) and "GFLOP/step" in format_profile(rec)


def test_operator_families():
    assert _family("aten::addmm") == "matmul" and _family("aten::convolution_backward") == "conv"
    assert _family("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert _family("aten::_fused_adamw_") == "optimizer" and _family("aten::mul") == "other"


def test_profile_command_needs_one_source(tmp_path, capsys):
    assert main(["profile"]) == 2
    assert "either --config CFG or --demo OUT" in capsys.readouterr().err
    assert main(["profile", "--demo", str(tmp_path), "--stage", "nope"]) == 2
    assert "not a demo stage" in capsys.readouterr().err
    assert main(["profile", "--demo", str(tmp_path), "--data", "x.txt"]) == 2
    assert "apply to --config only" in capsys.readouterr().err


def test_profile_command_writes_json(corpus, tmp_path, capsys):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        "stage: lm-pretrain\nmodel: {preset: nano}\n"
        f"tokenizer: {{path: {corpus['tokenizer']}}}\n"
        "train: {batch_size: 2, seq_len: 16, max_steps: 10, save_every: 5}\n"
    )
    out = tmp_path / "p.json"
    args = ["profile", "--config", str(cfg), "--data", str(corpus["train"]), "train.batch_size=3"]
    assert main([*args, "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert [r["stage"] for r in recs] == ["lm-pretrain"] and recs[0]["flops_per_step"] > 0
    assert recs[0]["batch_size"] == 3  # the override reached the config
    assert "ms/step" in capsys.readouterr().out
