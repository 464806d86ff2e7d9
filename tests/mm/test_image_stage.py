"""A real (tiny) image-pretrain run: the LM stays bit-identical, the optimizer never holds an LM parameter,
checkpoints carry no LM tensor, `mm verify-frozen` passes and fails on an LM altered by one value,
`mm caption` prints one caption per image, and a bundle refuses an LM whose fingerprint changed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm.app.cli import main as mm_main  # in-process CLI: a subprocess costs seconds of imports
from mm.formats.bundle import verify_frozen
from mm.lm import Transformer, load_hf, preset, save_hf
from mm.stages.image import ImageStageConfig
from mm.stages.image_model import load_image_bundle
from mm.training.checkpoint import list_checkpoints, load_checkpoint
from mm.training.config import load_config
from mm.training.freeze import FrozenLMChanged, fingerprint
from mm.training.runner import run as run_stage
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("imgworld")
    from mm.lm import Tokenizer

    tok = Tokenizer.from_file(corpus["tokenizer"])
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    save_hf(lm, root / "lm")
    tok.save(root / "lm")
    train = synth_shapes(root, n=48, seed=0, split="train")
    heldout = synth_shapes(root, n=8, seed=0, split="heldout")
    return {"root": root, "lm": root / "lm", "train": train, "heldout": heldout}


def stage_cfg(world, out, **kw) -> ImageStageConfig:
    cfg = load_config(
        ImageStageConfig,
        ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml",
        [
            f"lm={world['lm']}",
            f"out={out}",
            f"data.train=[{world['train']}]",
            f"data.heldout=[{world['heldout']}]",
            "image_encoder.embed_dim=32",
            "image_encoder.depth=2",
            "image_encoder.num_heads=2",
            "image_encoder.intermediate_layers=[0]",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.save_every=2",
            "train.peak_flops=1e9",
            "eval_samples=4",
        ],
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    lm_files = {p.name: p.read_bytes() for p in world["lm"].iterdir()}
    before = {k: v.clone() for k, v in load_hf(world["lm"]).state_dict().items()}
    summary = run_stage(stage_cfg(world, out))
    return {"out": out, "summary": summary, "before": before, "lm_files": lm_files}


def test_lm_bit_identical_after_a_real_stage(world, trained):
    after = load_hf(world["lm"]).state_dict()
    for k, v in trained["before"].items():
        assert torch.equal(v, after[k]), k
    assert {p.name: p.read_bytes() for p in world["lm"].iterdir()} == trained["lm_files"]
    s = trained["summary"]
    assert s["lm_fingerprint_start"] == s["lm_fingerprint_end"] == fingerprint(load_hf(world["lm"]))
    assert s["step"] == 4 and "eval" in s


def test_checkpoints_hold_only_trainable_parts_and_the_lm_identity(trained):
    ckpts = list_checkpoints(trained["out"] / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    ck = load_checkpoint(ckpts[-1])
    assert ck["model"] and not any(k.startswith("lm.") for k in ck["model"])
    assert {k.split(".")[0] for k in ck["model"]} == {
        "image_encoder",
        "image_xattn",
        "image_aux",
    }  # + the head
    assert ck["trainer"]["config"]["lm_fingerprint"] == trained["summary"]["lm_fingerprint_start"]
    opt_keys = set(ck["optimizer"]["state"])
    assert opt_keys and not any(k.startswith("lm.") for k in opt_keys)
    bundle = load_file(str(trained["out"] / "final" / "adapter.safetensors"))
    assert not any(k.startswith("lm.") for k in bundle)


def test_verify_frozen_passes_then_fails_on_one_altered_value(world, trained, tmp_path, capsys):
    final = trained["out"] / "final"
    r = subprocess.run([BIN / "mm", "verify-frozen", final], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    # A copy of the bundle whose LM directory has one value changed.
    lm2 = tmp_path / "lm2"
    lm2.mkdir()
    for p in world["lm"].iterdir():
        (lm2 / p.name).write_bytes(p.read_bytes())
    sd = load_file(str(lm2 / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(sd, str(lm2 / "model.safetensors"), metadata={"format": "pt"})
    b2 = tmp_path / "bundle"
    b2.mkdir()
    (b2 / "adapter.safetensors").write_bytes((final / "adapter.safetensors").read_bytes())
    meta = json.loads((final / "mm_config.json").read_text())
    meta["lm_path"] = str(lm2)
    (b2 / "mm_config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert mm_main(["verify-frozen", str(b2)]) == 1
    assert "CHANGED" in capsys.readouterr().out
    ok, _ = verify_frozen(b2)
    assert not ok
    with pytest.raises(FrozenLMChanged, match="refusing"):
        load_image_bundle(b2)


def test_caption_cli_one_line_per_image(world, trained):
    images = sorted((world["root"] / "shapes" / "heldout").glob("*.png"))[:3]
    r = subprocess.run(
        [BIN / "mm", "caption", "--checkpoint", trained["out"] / "final", *images],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3


def test_bundle_matches_the_trained_model(world, trained):
    model, tok, transform, meta = load_image_bundle(trained["out"] / "final")
    assert meta["stage"] == "image-pretrain" and meta["image_encoder"]["weights"] is None
    ck = load_checkpoint(list_checkpoints(trained["out"] / "checkpoints")[-1])["model"]
    own = model.state_dict()
    for k, v in ck.items():
        assert torch.equal(own[k], v), k


def test_real_encoder_gates_at_zero_equal_bare_lm_and_cached_captioning_equals_recompute(world, trained):
    from mm.datasets.collate import ImageCaptionCollator
    from mm.datasets.images import image_decoder
    from mm.datasets.media import MediaTextDataset
    from mm.lm import generate
    from mm.models.media import MediaInput

    model, tok, transform, meta = load_image_bundle(trained["out"] / "final")
    ds = MediaTextDataset(world["heldout"], image_decoder(transform))
    col = ImageCaptionCollator(tok, meta["prompt"], max_tiles=meta["max_tiles"])
    batch = col([ds[0], ds[1]])
    media = {
        k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    }
    with torch.no_grad():
        saved = {k: v.clone() for k, v in model.state_dict().items() if "gate" in k}
        for k, v in model.state_dict().items():
            if k.startswith("image_xattn") and "gate" in k:
                v.zero_()
        bare = model.lm(batch["tokens"], attention_mask=batch["attention_mask"])
        assert torch.equal(
            model.forward_hf(batch["tokens"], attention_mask=batch["attention_mask"], **media), bare
        )
        model.load_state_dict(saved, strict=False)
        for k, v in model.state_dict().items():  # open the gates so the image matters
            if k.startswith("image_xattn") and "gate" in k:
                v.fill_(0.7)
        ctx = model.encode_media(media["pixel_values"], media["aspect_ratio_ids"], media["aspect_ratio_mask"])
        prefix = torch.tensor([col.prefix] * 2)
        cached = generate(model, prefix, 10, model_kwargs={"media": {"image": MediaInput(ctx)}})
        seq = prefix.clone()
        for _ in range(10):
            n = seq.shape[1]
            cam = media["cross_attention_mask"][:, 1:2].expand(-1, n, -1, -1).clone()  # a row after the image
            cam[:, 0] = 0  # the BOS before the image sees nothing
            logits = model.forward_hf(seq, **{**media, "cross_attention_mask": cam})
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert cached == seq[:, prefix.shape[1] :].tolist()


def test_image_stage_trains_from_webdataset_shards(world, tmp_path):
    shards = sorted((world["root"] / "shapes").glob("train-*.tar"))
    assert shards
    cfg = stage_cfg(world, tmp_path / "shards", eval_samples=0)
    cfg.data.train = [str(p) for p in shards]
    cfg.train.max_steps = 2
    s = run_stage(cfg)
    assert s["step"] == 2 and s["data_skips"]["skipped"] == 0
    assert (tmp_path / "shards" / "final" / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_two_process_fsdp_image_stage_equals_one_process(world, tmp_path):
    import os

    args = [
        "train",
        "--config",
        ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml",
        f"lm={world['lm']}",
        f"data.train=[{world['train']}]",
        "image_encoder.embed_dim=32",
        "image_encoder.depth=2",
        "image_encoder.num_heads=2",
        "image_encoder.intermediate_layers=[0]",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.save_every=3",
        "train.num_threads=1",
        "train.peak_flops=1e9",
        "eval_samples=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([BIN / "mm", *args, "--out", one], check=True, env=env, cwd=tmp_path, capture_output=True)
    r = subprocess.run(
        [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "mm", *args, "--out", two],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    la = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)
    ok, _ = verify_frozen(two / "final")
    assert ok
    a = load_file(str(one / "final" / "adapter.safetensors"))
    b = load_file(str(two / "final" / "adapter.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)


def test_exact_match_report_counts_attributes_by_slot():
    from mm.stages.evaluation import exact_match_report

    r = exact_match_report(
        ["a large red circle", "a small blue square and a large red circle", "a small blue"],
        ["a large red circle", "a small blue square and a large red square", "a small blue triangle"],
    )
    assert r["exact_match"] == pytest.approx(1 / 3)
    assert r["attribute_accuracy"] == pytest.approx((3 + 5 + 2) / (3 + 6 + 3))


def test_caption_attribute_report_per_attribute():
    from mm.world import caption_attribute_report, parse_caption

    assert parse_caption("a large red circle and a small blue square") == [
        ("large", "red", "circle"),
        ("small", "blue", "square"),
    ]
    assert parse_caption("a large red") is None
    refs = [
        "a large red circle",
        "a small blue square and a large red circle",
        "a small blue square and a large red circle",
        "a small yellow triangle",
    ]
    preds = [
        "a large red circle",
        "a large red circle and a small blue square",  # both objects, wrong order
        "a small blue square and a small blue square",  # the first object twice
        "a small yellow triangle and a large red circle",  # one object too many
    ]
    r = caption_attribute_report(preds, refs)
    assert r["exact_match"] == pytest.approx(1 / 4)
    assert r["count_accuracy"] == pytest.approx(3 / 4)
    # 6 reference objects (1 | 2 3 | 4 5 | 6): every attribute right in slots 1, 4 and 6 only
    for key in ("size_accuracy", "color_accuracy", "shape_accuracy"):
        assert r[key] == pytest.approx(3 / 6)
    assert (r["order_n"], r["order_accuracy"]) == (1, 0.0)
    with pytest.raises(ValueError, match="not a caption"):
        caption_attribute_report(["x"], ["a red circle"])


def test_caption_head_targets_and_loss_reach_the_image_encoder(world, tmp_path):
    from mm.adapters.caption_head import CaptionSlotHead, caption_slot_targets
    from mm.stages.image import ImageStage

    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 9, 8, -100, -100, -100]])
    assert caption_slot_targets(labels, 4).tolist() == [[5, 6, 7, -100], [9, 8, -100, -100]]

    cfg = stage_cfg(world, tmp_path)
    cfg.caption_head.weight, cfg.caption_head.bag_of_words = 0.5, 0.0
    stage = ImageStage(cfg)
    model = stage.build(torch.device("cpu"))
    assert isinstance(model.image_aux, CaptionSlotHead)
    trained = {id(p) for _, p in stage.trainable()}
    assert {id(p) for p in model.image_aux.parameters()} <= trained
    assert not trained & {id(p) for p in model.lm.parameters()}
    stage.open_data(0, 1)
    batch = stage.next_batch(4, 0)
    model.train()
    loss_h, n = stage.loss(batch)
    cfg.caption_head.weight = 0.0
    loss_0, _ = stage.loss(batch)
    assert float(loss_h.detach()) > float(loss_0.detach())  # the head adds its cross-entropy
    # with every cross-attention gate at 0 only the head's loss reaches the encoder
    model.zero_grad()
    loss_0.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.image_encoder.parameters())
    model.zero_grad()
    cfg.caption_head.weight = 0.5
    stage.loss(batch)[0].backward()
    assert float(model.image_encoder.project.weight.grad.abs().sum()) > 0
    assert float(model.image_aux.slots.grad.abs().sum()) > 0
    assert model.image_aux.bow_proj.weight.grad is None  # bag of words off: its projection is unused
    # the bag-of-words term adds to the loss and trains its projection
    cfg.caption_head.bag_of_words = 1.0
    model.zero_grad()
    loss_b, _ = stage.loss(batch)
    assert float(loss_b.detach()) > float(loss_h.detach())
    loss_b.backward()
    assert float(model.image_aux.bow_proj.weight.grad.abs().sum()) > 0


def test_export_refuses_an_encoder_mllama_does_not_have(trained, tmp_path, capsys):
    from mm.app.cli import main

    argv = [
        "export",
        "--checkpoint",
        str(trained["out"] / "final"),
        "--format",
        "hf-mllama",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not Mllama-shaped" in err and "image_encoder.stem='cnn'" in err and "canvas_position" in err
    assert not (tmp_path / "model.safetensors").exists()
    llama = [
        "export",
        "--checkpoint",
        str(trained["out"] / "final"),
        "--format",
        "hf-llama",
        "--out",
        str(tmp_path),
    ]
    assert main(llama) == 2 and "export image stages as hf-mllama" in capsys.readouterr().err


def test_a_bundle_from_before_meta_indexing_keeps_its_block_output_features(trained, tmp_path):
    """Bundles written before mm read intermediate indices as Meta does hold no `intermediate_from`: they were
    trained on block outputs, and load that way (a bundle that names its rule keeps it)."""
    import shutil

    meta = json.loads((trained["out"] / "final" / "mm_config.json").read_text())
    assert meta["image_encoder"]["intermediate_from"] == "block_input"  # what a new bundle records
    old = tmp_path / "old"
    shutil.copytree(trained["out"] / "final", old)
    del meta["image_encoder"]["intermediate_from"]
    (old / "mm_config.json").write_text(json.dumps(meta))
    new_model = load_image_bundle(trained["out"] / "final")[0]
    old_model = load_image_bundle(old)[0]
    assert old_model.image_encoder.cfg.intermediate_from == "block_output"
    pix = torch.randn(1, 1, 1, 3, 64, 64)
    args = (pix, torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, 1))
    with torch.no_grad():
        _, (before,) = old_model.image_encoder.encode(*args)  # block 0's output
        _, (first,) = new_model.image_encoder.encode(*args)  # block 0's input
        block0 = new_model.image_encoder.vit.blocks[0]
        torch.testing.assert_close(before, block0(first.flatten(1, 3)).view_as(first))
