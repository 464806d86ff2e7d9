"""`mm bench` on a tiny configuration (issues 9 and 27): the run completes, the JSON has every ratio key the
issues name (default against default, and `_vs_best` for the pairs the tiny run compiles), the repeats and machine
facts, and each pair of models computed the same thing on the same weights (equal first-step losses, equal greedy
tokens). No timing is asserted: the machine is shared and the shapes tiny."""

import json
import math

import pytest
import torch

from mm.app.bench import BEST_KEYS, RATIO_KEYS, checks, format_table, run_bench, tiny_config
from mm.lm import decode


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:  # the compiled decode step without GEMM autotuning: seconds
            mp.setattr(decode, "CPU_OPTIONS", {"freezing": True})
            yield run_bench(tiny_config())
    finally:
        torch.set_num_threads(threads)


def test_ratio_keys_and_run_facts_are_recorded(result):
    for key in RATIO_KEYS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    run = {"lm_train_speedup_fp32_vs_best", "generate_speedup_b1_vs_best"}  # the tiny config's best pairs
    for key in BEST_KEYS:
        value = result[key]
        assert (isinstance(value, float) and value > 0) if key in run else value is None, key
    for r in (result["lm_train"]["fp32"], result["generate"]["b1"]):
        assert r["ours_best"]["compile_s"] >= 0 and r["hf_best"]["compile_s"] >= 0
    assert result["generate"]["b1"]["hf_best"]["first_call_s"] > 0
    meta = result["meta"]
    assert meta["torch"] == torch.__version__ and meta["threads"] == 1 and meta["cpu_model"]
    assert meta["repeats"] == 2 and meta["warmup"] == 1
    assert len(result["lm_train"]["fp32"]["ours"]["times_s"]) == 2
    json.loads(json.dumps(result))  # serialisable as is


def test_both_sides_compute_the_same_losses_and_tokens(result):
    assert checks(result) == []
    assert result["lm_train"]["fp32"]["loss_abs_diff"] < 1e-4
    assert result["lm_train"]["fp32"]["loss_abs_diff_vs_best"] < 1e-4  # compiled on both sides
    assert (
        result["generate"]["b1"]["tokens_equal_vs_best"]
        and result["generate"]["b1"]["tokens_equal_best_vs_default"]
    )
    assert result["adapter_step"]["loss_abs_diff"] < 1e-4
    assert all(r["tokens_equal"] for r in result["generate"].values())
    assert result["caption"]["tokens_equal"]
    assert result["generate"]["b1"]["ours_decode"] == "dynamic"  # "auto" on a tiny LM


def test_frozen_lm_trains_fewer_parameters_and_memory_is_measured(result):
    ad = result["adapter_step"]
    n = ad["trainable_params"]
    assert n["ours_frozen"] == n["hf_frozen"] < n["ours_lm_trainable"]
    for kind in ("ours_frozen", "ours_lm_trainable", "hf_frozen"):
        assert ad[kind]["peak_mb"] > 0
    assert result["frozen_memory_ratio"] == ad["ours_frozen"]["peak_mb"] / ad["ours_lm_trainable"]["peak_mb"]


def test_table_names_every_benchmark(result):
    table = format_table(result)
    for what in ("LM train step fp32", "MFU bf16", "generate b1", "image-adapter step", "caption"):
        assert what in table
