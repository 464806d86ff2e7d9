"""Bad configuration: unknown keys, wrong types and impossible combinations give an error that names the key
and the allowed values, before any data is read (the data paths given here do not exist, so a data error
would show that the configuration was not checked first)."""

from pathlib import Path

import pytest

from mm.app.cli import main
from mm.lm import Transformer, preset, save_hf

ROOT = Path(__file__).resolve().parents[2]
LM_CFG = ROOT / "configs" / "lm" / "tiny.yaml"
IMAGE_CFG = ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml"
CLIP_CFG = ROOT / "configs" / "encoders" / "clip_tiny.yaml"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm")
    save_hf(Transformer(preset("nano")), d)  # 2 layers
    return d


CASES = [
    # (command, config, overrides, expected message pieces)
    (
        "pretrain-lm",
        LM_CFG,
        ["train.max_stepz=3"],
        ["'train.max_stepz'", "allowed keys there", "'max_steps'"],
    ),
    ("pretrain-lm", LM_CFG, ["optim.lr=fast"], ["'optim.lr'", "'fast'"]),
    ("pretrain-lm", LM_CFG, ["model.overrides={n_kv_heads: 3}"], ["n_kv_heads=3", "allowed: [1, 2, 4]"]),
    (
        "pretrain-lm",
        LM_CFG,
        ["model.overrides={n_kv_head: 2}"],
        ["unknown keys ['n_kv_head']", "'n_kv_heads'"],
    ),
    ("pretrain-lm", LM_CFG, ["model.preset=huge"], ["unknown LM preset 'huge'", "allowed"]),
    ("train", IMAGE_CFG, ["xattn.every=5"], ["xattn.every=5", "allowed: 1..2"]),
    ("train", IMAGE_CFG, ["xattn.evry=2"], ["'xattn.evry'", "'every'"]),
    ("train", IMAGE_CFG, ["data.max_tiles=6"], ["data.max_tiles=6", "allowed: 1..4"]),
    (
        "train",
        IMAGE_CFG,
        ["image_encoder.max_tiles=6"],
        ["max_aspect_ratio_id=8", "allowed max_tiles: [1, 2, 3, 4]"],
    ),
    ("train", IMAGE_CFG, ["data.tile_size=48"], ["data.tile_size=48", "image_encoder.tile_size=64"]),
    ("train", IMAGE_CFG, ["train.batch_size=many"], ["'train.batch_size'", "'many'"]),
    ("train", IMAGE_CFG, ["image_encoder.mask_mode=loose"], ["mask_mode='loose'", "'strict', 'mllama'"]),
    (
        "train",
        IMAGE_CFG,
        ["scorers=[exact_match,mm.world.scoring:shape_attributes]"],
        ["scorers:", "'shape_attributes'", "'mm.world.scoring'"],
    ),
    ("pretrain-encoder", CLIP_CFG, ["optim.warmup=3"], ["'optim.warmup'", "'warmup_steps'"]),
]


@pytest.mark.parametrize("command,config,overrides,pieces", CASES, ids=[" ".join(c[2]) for c in CASES])
def test_bad_config_is_named_before_data_is_read(
    command, config, overrides, pieces, lm_dir, tmp_path, capsys, faults
):
    argv = [command, "--config", str(config), *overrides, f"lm={lm_dir}", f"tokenizer={lm_dir}"]
    if command == "pretrain-lm":
        argv = argv[:-2]
    if command == "pretrain-encoder":
        argv = argv[:-2] + [f"tokenizer={lm_dir}"]
    argv += ["--data", str(tmp_path / "missing-data.jsonl"), "--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    for piece in pieces:
        assert piece in err, (piece, err)
    assert "missing-data" not in err  # the configuration was refused first
    assert not (tmp_path / "out").exists()
    faults.record("configs", what=command)
