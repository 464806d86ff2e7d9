"""The GPU readiness check's CPU-runnable pieces: the no-GPU exit, the JSON report, the assertions, the attention
and LM-step checks at tiny shapes, the stage configs and the world; and compile applied after checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.app import gpu_check
from mm.app.gpu_check import CPU_SIZES, CheckContext, CheckResult, run_check, summary_line, write_report
from mm.app.gpu_check_kernels import check_attention, ragged_doc_ids
from mm.app.gpu_check_stages import PRESETS, stage_configs, world

ROOT = Path(__file__).resolve().parents[2]


def ctx_for(tmp_path: Path) -> CheckContext:
    return CheckContext(device=torch.device("cpu"), out=tmp_path, sizes=CPU_SIZES, cpu=True)


def test_script_exits_2_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh stops at once with status 2 and says why, before installing anything."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "no CUDA GPU is visible" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing made or installed
    assert gpu_check.main([str(tmp_path / "o2")]) == 2  # the module says the same without --cpu


def test_script_runs_from_the_source_tree_on_the_cpu(tmp_path):
    """GPU_CHECK_CPU=1: the script imports the rooms through its links to this tree and writes its JSON."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_CPU": "1", "WHEELS": str(tmp_path / "none")}
    out = tmp_path / "out"
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--only", "attention"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is True and report["checks"]["attention"]["status"] == "passed"
    assert report["machine"]["torch"] == torch.__version__


def test_world_is_made_once(tmp_path):
    paths = world(tmp_path, speech=False, n=4)
    assert set(paths) == {"text", "heldout", "shapes", "motion"} and all(p.is_file() for p in paths.values())
    assert len(paths["shapes"].read_text().splitlines()) == 4
    stamp = paths["motion"].stat().st_mtime_ns
    world(tmp_path, speech=False, n=4)
    assert paths["motion"].stat().st_mtime_ns == stamp


def test_result_records_assertions_and_status():
    res = CheckResult("x")
    assert res.expect("a", True, 1.0, 2.0) is True
    res.expect("b (not on CPU)", None, None, 0)
    res.settle()
    assert res.status == "passed"
    bad = CheckResult("y")
    bad.expect("c", False, torch.tensor(3.14159265), 1)
    bad.settle()
    assert bad.status == "failed" and bad.assertions[0].value == 3.14159
    assert "c: 3.14159 (limit 1)" in summary_line(bad)


def test_run_check_keeps_the_traceback_and_goes_on(tmp_path, capsys):
    def boom(ctx, res):
        res.figure(before=1)
        raise RuntimeError("kernel missing")

    res = run_check("boom", boom, ctx_for(tmp_path))
    assert res.status == "error" and "RuntimeError: kernel missing" in res.error
    assert "Traceback" in res.error and res.figures == {"before": 1}
    assert "boom raised" in capsys.readouterr().err


def test_write_report_is_atomic_json(tmp_path):
    path = tmp_path / "r" / "gpu_check.json"
    write_report(path, {"checks": {"a": {"status": "passed"}}, "x": Path("/p")})
    assert json.loads(path.read_text())["checks"]["a"]["status"] == "passed"
    assert not list(path.parent.glob("*.tmp"))


def test_ragged_documents_fill_rows():
    ids = ragged_doc_ids((3, 4, 2, 5), rows=2, T=6, device=torch.device("cpu"))
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]]  # a document is cut at its row end


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_attention_check_at_tiny_shapes(tmp_path):
    """Check 1 on the CPU: every kernel within tolerance of dense float32 SDPA; a wrong kernel fails it."""
    ctx = ctx_for(tmp_path)
    res = run_check("attention", check_attention, ctx)
    assert res.status == "passed", [a for a in res.assertions if not a.ok]
    names = {a.what for a in res.assertions}
    assert "varlen_ragged dq_dk_dv max error" in names and "flex_ragged out max error" in names

    import mm.app.gpu_check_kernels as k

    def wrong(q, k_, v, doc_ids):  # causal over the whole row: ignores the documents
        return torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True, enable_gqa=True)

    bad = CheckResult("bad")
    k.compare_kernel(
        "wrong_ragged", wrong, ragged_doc_ids(CPU_SIZES.ragged, 2, CPU_SIZES.attn_seq, ctx.device), ctx, bad
    )
    bad.settle()
    assert bad.status == "failed"


def test_lm_step_check_at_tiny_shapes(tmp_path):
    """Check 2 on the CPU (eager only here: compile's figures need a C++ build): loss falls, figures kept."""
    from mm.app.gpu_check_train import one_process_group, planned_gib, run_lm_steps

    ctx = ctx_for(tmp_path)
    assert planned_gib(ctx) > 0
    with one_process_group():
        r = run_lm_steps(ctx, compile_=False)
    assert r["sharded"] is True  # FSDP2 forced over the one-process group
    assert r["losses"][-1] < r["losses"][0] and len(r["losses"]) == CPU_SIZES.lm_steps
    assert not torch.distributed.is_initialized()  # the group is left again


def test_stage_configs_chain_the_demo(tmp_path):
    data = {k: tmp_path / f"{k}.jsonl" for k in ("text", "heldout", "shapes", "motion", "speech")}
    cfgs = stage_configs(tmp_path / "out", data, 3, ctx_for(tmp_path))
    assert list(cfgs) == list(PRESETS)
    assert all(c.train.max_steps == 3 and c.train.autocast == "none" for c in cfgs.values())
    assert cfgs["image-anneal"].init_from == str(tmp_path / "out" / "image-pretrain" / "final")
    assert cfgs["speech"].lm == str(tmp_path / "out" / "lm-bf16")
    assert cfgs["video"].data.train == [str(data["motion"])]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compile_traces_each_block(checkpointing):
    """`apply_compile` compiles the blocks' forward, also after activation checkpointing (the module's own
    `compile` traced nothing then, and the blocks ran eagerly)."""
    from torch._dynamo.utils import counters

    from mm.lm.config import preset
    from mm.lm.model import Transformer
    from mm.training.parallelize import apply_activation_checkpointing, apply_compile

    torch._dynamo.reset()
    counters.clear()
    model = Transformer(preset("nano", n_layers=2))
    ref = Transformer(preset("nano", n_layers=2))
    ref.load_state_dict(model.state_dict())
    if checkpointing:
        apply_activation_checkpointing(list(model.layers))
    apply_compile(list(model.layers), backend="eager")
    x = torch.randint(0, 512, (1, 32))
    model(x).sum().backward()
    ref(x).sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced the blocks
    torch.testing.assert_close(
        model.layers[0].attention.wq.weight.grad, ref.layers[0].attention.wq.weight.grad
    )
    torch._dynamo.reset()
