"""`mm plan` covers every stage: the model is built by the stage's own `build` on the meta device (shapes only),
its parameter counts equal an eager build's, and the FSDP units are the stage's declared `ParallelPlan`."""

import copy

import pytest
import torch

import mm.stages  # noqa: F401  (registers every stage)
from mm.app import plan as P
from mm.app.plan_activations import ACTIVATION_STAGES
from mm.lm import Tokenizer
from mm.training.config import config_to_yaml
from mm.training.runner import stage_for
from mm.training.stage import STAGES as REGISTRY

COMMON = [
    "train.max_steps=2",
    "train.batch_size=4",
    "train.save_every=2",
    "train.seed=3",
    "train.num_threads=1",
]
STAGES = list(REGISTRY)  # every stage of mm/stages


@pytest.fixture(scope="module")
def configs(tmp_path_factory, corpus, stage_configs):
    """Every stage's config file, over a nano LM, tiny data and an image bundle."""
    root = tmp_path_factory.mktemp("plan-stages")
    files = {}
    for name, cfg in stage_configs(root, corpus, COMMON, n=8).items():
        cfg.out = str(root / "out" / name)
        if name == "lm-pretrain":  # the plan's vocabulary is `tokenizer.vocab_size` (no tokenizer is read)
            cfg.tokenizer.vocab_size = Tokenizer.from_file(cfg.tokenizer.path).vocab_size
        files[name] = (root / f"{name}.yaml", cfg)
        files[name][0].write_text(config_to_yaml(cfg))
    return files


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_is_planned_from_its_own_build(configs, name):
    path, cfg = configs[name]
    stage = P.load_stage(str(path))
    assert all(p.is_meta for p in stage.model.parameters())
    p = P.plan(stage, gpus=2, gpu_memory_gib=80, seq_len=64, batch=2, config=str(path))
    eager = stage_for(copy.deepcopy(cfg))
    eager.check_common()
    eager.check()
    eager.build(torch.device("cpu"))
    total = sum(t.numel() for t in eager.model.parameters())
    trainable = sum(t.numel() for _, t in eager.trainable())
    assert p["stage"] == name
    assert (p["params"]["total"], p["params"]["trainable"]) == (total, trainable)
    assert p["params"]["frozen"] == total - trainable
    sharded = eager.parallel_plan().fsdp_units is not None
    assert p["sharding"].startswith("FSDP2") == sharded
    assert (p["fsdp_buffers_gib"] > 0) == sharded or total < 1e6
    assert (p["activations_gib"] is not None) == (name in ACTIVATION_STAGES)
    assert (p["max_batch"] is not None) == (name in ACTIVATION_STAGES)
    assert p["grads_gib"] == p["params_gib"] or p["params"]["frozen"] > 0
    table = P.format_table(p)
    assert name in table and "largest micro-batch that fits:" in table
