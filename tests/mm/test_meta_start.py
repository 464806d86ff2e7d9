"""Start on the meta device, shard, then materialise (`mm.training.materialize`).

- Every stage built on the meta device and materialised equals its eager build bit for bit, and leaves the
  random generator where the eager build leaves it (so one-process runs compute what they computed before).
- The 70B preset builds on the meta device and shards over 4 processes (gloo), each reporting its parameter
  bytes (a quarter of the whole) with nothing materialised.
- A ~260M-parameter preset materialises in 4 processes, each process's peak resident memory growing by about a
  quarter of the whole fp32 model, with the values of the one-process build.
- The frozen LM of the image stages is read lazily: each process reads only its rows (safetensors `get_slice`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.formats.hf_llama import SafetensorsTensor, stored_dtype
from mm.lm import Tokenizer, Transformer, load_hf, preset, save_hf
from mm.training.config import config_to_yaml, load_config
from mm.training.materialize import materialize, record_init
from mm.training.runner import build, prepare, run, stage_for
from mm.training.stage import stage_class
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMON = ["train.max_steps=2", "train.batch_size=4", "train.save_every=2", "train.num_threads=1"]
COMMON += ["train.peak_flops=1e9", "train.seed=3"]
STAGES = [
    "lm-pretrain",
    "clip-pretrain",
    "bestrq-pretrain",
    "image-pretrain",
    "image-anneal",
    "video",
    "speech",
    "lm-sft",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus, stage_configs):
    """A nano LM, tiny data of every modality, an image bundle, and a config of every stage."""
    root = tmp_path_factory.mktemp("meta-start")
    cfgs = stage_configs(root, corpus, COMMON, n=8)
    lm = root / "lm"
    for name, cfg in cfgs.items():
        cfg.out = str(root / "out" / name)
    return {"root": root, "cfgs": cfgs, "lm": lm}


def checked_stage(cfg):
    stage = stage_for(copy.deepcopy(cfg))
    stage.check_common()
    stage.check()
    return stage


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_built_on_meta_and_materialised_equals_its_eager_build(world, name):
    cfg = world["cfgs"][name]
    eager = checked_stage(cfg)
    torch.manual_seed(3)
    eager.build(torch.device("cpu"))
    want, rng = eager.model.state_dict(), torch.get_rng_state()

    stage = checked_stage(cfg)
    assert stage.meta_init()
    torch.manual_seed(3)
    init = build(stage)
    assert all(p.is_meta for p in stage.model.parameters())  # nothing allocated, nothing drawn yet
    prepare(stage, init)
    got = stage.model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]
    assert torch.equal(torch.get_rng_state(), rng)  # the same draws, in the same order


def test_a_global_random_draw_on_a_real_tensor_while_recording_is_refused():
    with pytest.raises(RuntimeError, match="global random generator"):
        with record_init():
            torch.empty(3, device="cpu").normal_()


def test_the_lazily_loaded_lm_reads_each_process_rows_in_our_layout(tmp_path):
    torch.manual_seed(0)
    cfg = preset("nano", vocab_size=300)
    save_hf(Transformer(cfg), tmp_path / "lm", max_shard_bytes=40_000)  # several files
    whole = load_hf(tmp_path / "lm")
    lazy = load_hf(tmp_path / "lm", device="meta")
    assert all(p.is_meta for p in lazy.parameters())
    for name, p in lazy.named_parameters():
        src = p.lazy_source
        assert isinstance(src, SafetensorsTensor)
        full = whole.get_parameter(name)
        rows = full.shape[0]
        for start, stop in [(0, rows), (1, rows // 2 + 3), (rows // 3, rows)]:  # shards cutting heads in two
            torch.testing.assert_close(src.read(start, stop), full[start:stop], rtol=0, atol=0)
    with record_init() as rec:
        model = load_hf(tmp_path / "lm", device="meta")
    rec.bind(model)
    materialize(model, rec, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))
    assert torch.equal(model.inv_freq, whole.inv_freq)
    assert stored_dtype(tmp_path / "lm") == torch.float32


def torchrun(n: int, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        BIN / "torchrun",
        "--standalone",
        "--nproc-per-node",
        str(n),
        ROOT / "tests/mm/meta_start_worker.py",
    ]
    r = subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def reports(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.slow
def test_the_70b_preset_builds_on_meta_and_shards_over_four_processes(tmp_path, corpus):
    config = ROOT / "configs/lm/llama3-70b.yaml"
    vocab = 128256
    torchrun(
        4,
        config,
        tmp_path,
        "shard",
        f"tokenizer.path={corpus['tokenizer']}",
        f"data=[{{paths: [{corpus['train']}], name: shapes, doc_split: line}}]",
        f"model.overrides.vocab_size={vocab}",
        "train.num_threads=1",
        f"out={tmp_path / 'run'}",
    )
    shape = preset("llama3-70b", vocab_size=vocab)
    whole = 4 * shape.num_params()  # fp32 bytes
    got = reports(tmp_path, 4)
    for r in got:
        print(
            f"rank {r['rank']}: {r['param_bytes'] / 2**30:.2f} GiB of parameters (of {whole / 2**30:.1f} GiB), "
            f"resident {r['rss_start_kib'] / 2**10:.0f} -> {r['rss_built_kib'] / 2**10:.0f} MiB"
        )
        assert r["world"] == 4 and r["all_meta"] and r["sharded"]
        assert r["param_bytes"] == pytest.approx(
            whole / 4, rel=1e-3
        )  # dim-0 chunks: 8192, 1024, 28672 split evenly
        assert r["rss_built_kib"] - r["rss_start_kib"] < 512 * 2**10  # nothing of the 282 GB was allocated
    assert sum(r["param_bytes"] for r in got) == whole


@pytest.mark.slow
def test_a_260m_preset_materialises_only_each_process_share(tmp_path, corpus):
    over = dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=4096, vocab_size=8192)
    cfg = load_config(
        stage_class("lm-pretrain").config_class,
        ROOT / "configs/lm/tiny.yaml",
        [
            f"tokenizer.path={corpus['tokenizer']}",
            f"data=[{{paths: [{corpus['train']}], name: shapes, doc_split: line}}]",
            "train.num_threads=1",
            "train.seed=5",
            f"out={tmp_path / 'run'}",
        ],
    )
    cfg.model.overrides = over
    path = tmp_path / "260m.yaml"
    path.write_text(config_to_yaml(cfg))
    torchrun(4, path, tmp_path, "materialise")
    got = reports(tmp_path, 4)
    shape = preset("tiny", **over)
    whole = 4 * shape.num_params()
    for r in got:
        grew = (r["peak_kib"] - r["rss_before_kib"]) * 1024
        print(
            f"rank {r['rank']}: holds {r['param_bytes'] / 2**20:.0f} MiB of {whole / 2**20:.0f} MiB; peak resident "
            f"memory while materialising +{grew / 2**20:.0f} MiB ({grew / whole:.2f} of the whole)"
        )
        assert r["peak_reset"] and not r["all_meta"]
        assert r["param_bytes"] == whole // 4
        assert grew < 0.4 * whole  # a quarter, plus one full tensor at a time (the largest: 32 MiB)
    torch.manual_seed(5)  # the one-process build: every process kept its rows of exactly these values
    ref = Transformer(shape)
    for name, p in ref.named_parameters():
        parts = sorted((r["sums"][name] for r in got), key=lambda s: s[1])
        assert sum(s[2][0] for s in parts) == p.shape[0]
        for total, offset, size in parts:
            want = float(p.detach()[offset[0] : offset[0] + size[0]].double().sum())
            assert total == pytest.approx(want, rel=1e-9, abs=1e-9), name


def test_mixed_precision_and_the_frozen_lm_dtype_follow_the_compute_dtype(tmp_path):
    from mm.training.config import TrainConfig
    from mm.training.parallelize import frozen_dtype, frozen_lm_dtype, mixed_precision
    from mm.training.services import compute_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # (no GPU needed to ask)
    assert compute_dtype("auto", cpu) == torch.float32 and compute_dtype("auto", cuda) == torch.bfloat16
    assert compute_dtype("bf16", cpu) == torch.bfloat16 and compute_dtype("none", cuda) == torch.float32
    for autocast in ("auto", "bf16", "none"):  # the CPU keeps float32 parameters and no policy
        assert mixed_precision(TrainConfig(autocast=autocast), cpu) is None
        assert frozen_dtype(TrainConfig(autocast=autocast), cpu) == torch.float32
    assert mixed_precision(TrainConfig(autocast="none"), cuda) is None
    policy = mixed_precision(TrainConfig(autocast="auto"), cuda)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert frozen_dtype(TrainConfig(), cuda) == torch.bfloat16
    # a bf16 checkpoint is kept in bf16 (nothing rounded), a float32 one stays float32
    torch.manual_seed(0)
    model = Transformer(preset("nano", vocab_size=300))
    save_hf(model, tmp_path / "fp32")
    save_hf(model.to(torch.bfloat16), tmp_path / "bf16")
    assert frozen_lm_dtype(tmp_path / "fp32", torch.bfloat16) == torch.float32
    assert frozen_lm_dtype(tmp_path / "bf16", torch.bfloat16) == torch.bfloat16
    assert frozen_lm_dtype(tmp_path / "bf16", torch.float32) == torch.float32
    with record_init() as rec:
        lazy = load_hf(tmp_path / "bf16", device="meta", dtype=torch.bfloat16)
    rec.bind(lazy)
    materialize(lazy, rec, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in lazy.parameters())
    from mm.training.freeze import fingerprint

    assert fingerprint(lazy) == fingerprint(
        load_hf(tmp_path / "bf16")
    )  # as the float32 load of the same file


def test_the_peak_flops_are_measured_in_the_dtype_the_model_computes_in(world, monkeypatch):
    import mm.training.services as services

    seen = []
    monkeypatch.setattr(
        services, "measure_peak_flops", lambda device, dtype=torch.float32: seen.append(dtype) or 1e9
    )
    cfg = copy.deepcopy(world["cfgs"]["lm-pretrain"])
    cfg.out = str(world["root"] / "peak")
    cfg.train.max_steps, cfg.train.peak_flops, cfg.train.autocast = 1, 0.0, "bf16"
    run(cfg)
    assert seen == [torch.bfloat16]


@pytest.mark.slow
def test_lm_heldout_evaluation_in_two_processes_equals_one(world, corpus):
    cfg = copy.deepcopy(world["cfgs"]["lm-pretrain"])
    cfg.heldout = copy.deepcopy(cfg.data)
    cfg.heldout[0].paths = [str(corpus["heldout"])]
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.micro_batch_size = 2, 1, 1
    # the whole split in batches of 8 rows: the last has 4, all of them process 0's (process 1 runs label-free rows)
    cfg.train.eval_batches, cfg.train.batch_size = 0, 8
    cfg.out = str(world["root"] / "eval-two")
    path = world["root"] / "eval-two.yaml"
    path.write_text(config_to_yaml(cfg))
    (world["root"] / "eval-jobs.json").write_text(json.dumps([{"config": str(path)}]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", ROOT / "tests/mm/stage_worker.py"]
    r = subprocess.run([*cmd, world["root"] / "eval-jobs.json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    cfg.out = str(world["root"] / "eval-one")
    run(cfg)

    def evals(out: str) -> list[float]:
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["eval/heldout_loss"] for x in lines if "eval/heldout_loss" in x]

    one, two = evals(cfg.out), evals(str(world["root"] / "eval-two"))
    assert len(one) == 1 and len(two) == 1
    assert two == pytest.approx(one, rel=2e-5)
    tokens = [
        json.loads((world["root"] / d / "summary.json").read_text())["heldout_tokens"]
        for d in ("eval-one", "eval-two")
    ]
    assert tokens[0] == tokens[1] > 0  # every row counted once: each process its rows, pads count for nothing


def test_a_mllama_checkpoint_read_lazily_equals_its_eager_load(tmp_path):
    import importlib.util

    from mm.formats.hf_mllama import load_hf_mllama

    spec = importlib.util.spec_from_file_location("mllama_tests", Path(__file__).with_name("test_mllama.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.save_tiny_mllama(tmp_path / "mllama")
    whole = load_hf_mllama(tmp_path / "mllama")
    with record_init() as rec:
        lazy = load_hf_mllama(tmp_path / "mllama", device="meta")
    rec.bind(lazy)
    assert set(rec.sources) >= {n for n, _ in lazy.named_parameters() if not n.startswith("image_encoder.")}
    materialize(lazy, rec, torch.device("cpu"))
    want, got = whole.state_dict(), lazy.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]


def sparse_hf_lm(path: Path, name: str, tokenizer: Path, shard_bytes: int = 4 << 30) -> None:
    """An HF Llama directory of the `name` preset in bf16 whose weight shards are sparse files: real headers,
    data holes (no disk used); enough to build and shard a stage on the meta device, never to read values."""
    from mm.formats.hf_llama import config_to_hf, hf_name_map

    cfg = preset(name)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16)))
    with torch.device("meta"):
        sd = Transformer(cfg).state_dict()
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for hf, ours in hf_name_map(cfg).items():
        n = 2 * sd[ours].numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][hf] = tuple(sd[ours].shape)
        size += n
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for key, shape in group.items():
            n = 2 * int(torch.Size(shape).numel())
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    Tokenizer.from_file(tokenizer).save(path)


@pytest.mark.slow
def test_the_90b_image_stage_builds_on_meta_and_shards_with_its_70b_lm_read_lazily(tmp_path, corpus):
    sparse_hf_lm(tmp_path / "llama3-70b", "llama3-70b", corpus["tokenizer"])
    shapes = synth_shapes(tmp_path, n=4, seed=0, split="train")
    torchrun(
        4,
        ROOT / "configs/stages/image_pretrain_90b.yaml",
        tmp_path,
        "shard",
        f"lm={tmp_path / 'llama3-70b'}",
        f"data.train=[{shapes}]",
        "train.num_threads=1",
        f"out={tmp_path / 'run'}",
    )
    cfg = load_config(
        stage_class("image-pretrain").config_class, ROOT / "configs/stages/image_pretrain_90b.yaml"
    )
    with torch.device("meta"):
        from mm.stages.image import build_model

        cfg.image_encoder.weights = None
        lm = Transformer(preset("llama3-70b"))
        whole = 4 * sum(p.numel() for p in build_model(cfg, lm, 0).parameters())
    got = reports(tmp_path, 4)
    for r in got:
        print(
            f"rank {r['rank']}: {r['param_bytes'] / 2**30:.2f} GiB of parameters (of {whole / 2**30:.1f} GiB), "
            f"resident {r['rss_start_kib'] / 2**10:.0f} -> {r['rss_built_kib'] / 2**10:.0f} MiB"
        )
        assert r["all_meta"] and r["sharded"]
        assert r["param_bytes"] == pytest.approx(whole / 4, rel=1e-2)
        assert r["rss_built_kib"] - r["rss_start_kib"] < 1024 * 2**10
