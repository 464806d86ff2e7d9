"""The video path end to end: with the video gates at 0 the model equals the image model exactly; a real (tiny)
video stage through `mm train` leaves the LM and the whole image path bit-identical, trains and saves only the
aggregator and the video cross-attention, `mm verify-frozen` passes and fails when the LM or the image path
changes, loading refuses a changed image path, and `mm describe` prints one caption per video."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm.adapters.temporal_aggregator import AggregatorConfig
from mm.app.cli import main as mm_main  # in-process CLI: a subprocess costs seconds of imports
from mm.datasets.media import MediaTextDataset
from mm.datasets.video import VideoCaptionCollator, video_decoder
from mm.formats.bundle import verify_frozen
from mm.lm import Tokenizer, Transformer, preset, save_hf
from mm.models.multimodal import MediaInput, video_xattn_layer_ids
from mm.models.video import describe_clips
from mm.prompts import VIDEO_PROMPT
from mm.stages.image import ImageStageConfig
from mm.stages.image_model import load_image_bundle
from mm.stages.video_model import FrozenImagePathChanged, attach_video, load_video_bundle
from mm.training.checkpoint import list_checkpoints, load_checkpoint
from mm.training.config import load_config
from mm.training.runner import run as run_stage
from mm.world import synth_motion, synth_shapes
from mm.world.scoring import motion_report

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VIDEO_ARGS = [
    "aggregator.merge=2",
    "aggregator.n_latents=4",
    "aggregator.depth=1",
    "aggregator.n_heads=2",
    "data.n_frames=4",
    "train.batch_size=4",
    "train.max_steps=4",
    "train.save_every=2",
    "train.eval_every=2",
    "train.num_threads=1",
    "train.peak_flops=1e9",
    "eval_samples=4",
    "curve_samples=4",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus):
    """A nano LM, a 4-step image-pretrain bundle, and a few moving-shapes clips."""
    root = tmp_path_factory.mktemp("vidworld")
    tok = Tokenizer.from_file(corpus["tokenizer"])
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    save_hf(lm, root / "lm")
    tok.save(root / "lm")
    shapes = synth_shapes(root, n=16, seed=0, split="train")
    cfg = load_config(
        ImageStageConfig,
        ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml",
        [
            f"lm={root / 'lm'}",
            f"out={root / 'image'}",
            f"data.train=[{shapes}]",
            "image_encoder.embed_dim=32",
            "image_encoder.depth=2",
            "image_encoder.num_heads=2",
            "image_encoder.intermediate_layers=[0]",
            "xattn.every=1",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.save_every=2",
            "train.peak_flops=1e9",
            "eval_samples=0",
        ],
    )
    run_stage(cfg)
    return {
        "root": root,
        "lm": root / "lm",
        "image": root / "image" / "final",
        "train": synth_motion(root, n=12, seed=0, split="train"),
        "heldout": synth_motion(root, n=4, seed=0, split="heldout"),
        "pairs": synth_motion(root, n=3, seed=0, split="heldout_pairs"),
    }


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "run"
    lm_before, image_before = files(world["lm"]), files(world["image"])
    args = [
        BIN / "mm",
        "train",
        "--config",
        ROOT / "configs" / "stages" / "video_tiny.yaml",
        f"init_from={world['image']}",
        "--data",
        world["train"],
        f"data.heldout=[{world['heldout']},{world['pairs']}]",
        "--out",
        out,
        *VIDEO_ARGS,
    ]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"out": out, "lm_before": lm_before, "image_before": image_before, "stdout": r.stdout}


def test_video_cross_attention_placement():
    assert video_xattn_layer_ids([3, 7, 11, 15, 19, 23, 27, 31], 4) == [15, 31]
    assert video_xattn_layer_ids([1, 3], 1) == [1, 3]
    assert video_xattn_layer_ids([1, 3], 2) == [3]
    with pytest.raises(ValueError, match="only 2 image cross-attention layers"):
        video_xattn_layer_ids([1, 3], 4)


def test_video_gates_at_zero_equal_the_image_model_exactly(world):
    image_model, tok, transform, meta = load_image_bundle(world["image"])
    agg = AggregatorConfig(merge=2, n_latents=4, depth=1, n_heads=2)
    model = attach_video(image_model, tok, agg, list(image_model.xattn_layers))
    model.eval()
    col = VideoCaptionCollator(tok, VIDEO_PROMPT, max_tiles=meta["max_tiles"], merge=2)
    ds = MediaTextDataset(world["heldout"], video_decoder(transform, n_frames=4))
    batch = col([ds[0], ds[1]])
    pixels = (
        torch.randn(2, 1, meta["max_tiles"], 3, meta["tile_size"], meta["tile_size"]),
        torch.ones(2, 1, dtype=torch.long),
        torch.ones(2, 1, meta["max_tiles"], dtype=torch.long),
    )
    seen = torch.ones(2, batch["tokens"].shape[1], 1, meta["max_tiles"], dtype=torch.long)
    frames = (batch["video_frames"], batch["video_aspect_ratio_ids"], batch["video_aspect_ratio_mask"])
    video = {"video": MediaInput(model.encode("video", *frames), batch["video_cross_attention_mask"])}
    assert all(
        float(p.detach().abs().sum()) == 0
        for n, p in model.named_parameters()
        if "video_xattn" in n and "gate" in n
    )
    with torch.no_grad():
        for extra in ({}, {"image": MediaInput(image_model.encode("image", *pixels), seen)}):
            want = image_model(batch["tokens"], extra)
            got = model(batch["tokens"], {**extra, **video})
            assert torch.equal(got, want)
        for n, p in model.named_parameters():  # open the video gates: the video now changes the logits
            if "video_xattn" in n and "gate" in n:
                p.fill_(0.5)
        assert not torch.allclose(model(batch["tokens"], video), image_model(batch["tokens"]))


def test_lm_and_image_path_bit_identical_after_a_real_video_stage(world, trained):
    assert files(world["lm"]) == trained["lm_before"]
    assert files(world["image"]) == trained["image_before"]
    s = json.loads((trained["out"] / "summary.json").read_text())
    assert s["step"] == 4 and s["lm_fingerprint_start"] == s["lm_fingerprint_end"]
    assert s["image_fingerprint_start"] == s["image_fingerprint_end"]
    assert set(s["eval"]) == {"heldout", "heldout_pairs"} and s["eval"]["heldout"]["n"] == 4
    assert json.loads(trained["stdout"])["step"] == 4
    model, _, _, _ = load_video_bundle(trained["out"] / "final")
    image_model, _, _, _ = load_image_bundle(world["image"])
    own = model.state_dict()
    for k, v in image_model.state_dict().items():  # LM and image path as the image bundle has them
        assert torch.equal(own[k], v), k


def test_only_the_video_parts_train_and_are_saved(trained):
    ckpts = list_checkpoints(trained["out"] / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    ck = load_checkpoint(ckpts[-1])
    assert {k.split(".")[0] for k in ck["model"]} == {"video_aggregator", "video_xattn"}
    assert ck["optimizer"]["state"] and not any(
        k.split(".")[0] not in ("video_aggregator", "video_xattn") for k in ck["optimizer"]["state"]
    )
    bundle = load_file(str(trained["out"] / "final" / "adapter.safetensors"))
    assert {k.split(".")[0] for k in bundle} == {"video_aggregator", "video_xattn"}
    model, _, _, _ = load_video_bundle(trained["out"] / "final")
    own = model.state_dict()
    for k, v in ck["model"].items():
        assert torch.equal(own[k], v), k
    assert any(float(v.abs().max()) > 0 for k, v in bundle.items() if "gate" in k)  # the gates moved
    metrics = [json.loads(x) for x in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert "eval/heldout_exact_match" in metrics[1] and len(metrics) == 4


def test_verify_frozen_passes_then_fails_on_a_changed_image_path_or_lm(world, trained, tmp_path, capsys):
    final = trained["out"] / "final"
    r = subprocess.run([BIN / "mm", "verify-frozen", final], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("OK") and "image path" in r.stdout, r.stdout + r.stderr
    meta = json.loads((final / "mm_config.json").read_text())
    # A copy of the image bundle with one value changed.
    image2 = tmp_path / "image2"
    shutil.copytree(world["image"], image2)
    sd = load_file(str(image2 / "adapter.safetensors"))
    key = next(k for k in sd if k.startswith("image_xattn") and k.endswith("wq.weight"))
    sd[key][0, 0] += 1e-3
    save_file(sd, str(image2 / "adapter.safetensors"))
    b2 = tmp_path / "video2"
    shutil.copytree(final, b2)
    (b2 / "mm_config.json").write_text(json.dumps({**meta, "image_bundle": str(image2)}))
    capsys.readouterr()
    assert mm_main(["verify-frozen", str(b2)]) == 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and "image path" in out
    with pytest.raises(FrozenImagePathChanged, match="refusing"):
        load_video_bundle(b2)
    # A copy of the LM with one value changed.
    lm2 = tmp_path / "lm2"
    shutil.copytree(world["lm"], lm2)
    sd = load_file(str(lm2 / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(sd, str(lm2 / "model.safetensors"), metadata={"format": "pt"})
    b3 = tmp_path / "video3"
    shutil.copytree(final, b3)
    (b3 / "mm_config.json").write_text(json.dumps({**meta, "lm_path": str(lm2)}))
    ok, msg = verify_frozen(b3)
    assert not ok and "LM at" in msg


def test_describe_cli_one_line_per_video_and_bad_input(world, trained, tmp_path, capsys):
    videos = sorted((world["root"] / "motion" / "heldout").glob("*.mp4"))[:3]
    r = subprocess.run(
        [BIN / "mm", "describe", "--checkpoint", trained["out"] / "final", *videos],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    # The same captions as describing the clips read through the dataset (same frames, same model).
    model, tok, transform, meta = load_video_bundle(trained["out"] / "final")
    ds = MediaTextDataset(world["heldout"], video_decoder(transform, n_frames=meta["video"]["n_frames"]))
    col = VideoCaptionCollator(tok, meta["video"]["prompt"], max_tiles=meta["video"]["max_tiles"], merge=2)
    expected = describe_clips(model, col, [ds.load(i) for i in range(3)])
    assert [" ".join(c.splitlines()).strip() for c in expected] == [x.strip() for x in lines]  # one line each
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 10)
    capsys.readouterr()
    assert mm_main(["describe", "--checkpoint", str(trained["out"] / "final"), str(videos[0]), str(bad)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and str(bad) in out.err


def test_motion_report_scores_words_by_role():
    r = motion_report(
        ["a red circle moves left", "a red square moves up", "a blue"],
        ["a red circle moves left", "a red circle moves down", "a blue square moves up"],
    )
    assert r["exact_match"] == pytest.approx(1 / 3)
    assert r["color_accuracy"] == pytest.approx(2 / 3) and r["shape_accuracy"] == pytest.approx(1 / 3)
    assert r["direction_accuracy"] == pytest.approx(1 / 3)


def test_frozen_frame_features_follow_the_stage_autocast(world):
    from mm.models.video import ClipFeatures

    image_model, tok, transform, meta = load_image_bundle(world["image"])
    model = attach_video(image_model, tok, AggregatorConfig(merge=2, n_latents=4, depth=1, n_heads=2), [1])
    col = VideoCaptionCollator(tok, VIDEO_PROMPT, max_tiles=meta["max_tiles"], merge=2)
    clips = [MediaTextDataset(world["heldout"], video_decoder(transform, n_frames=4))[0]]
    plain, _ = ClipFeatures(model, col, cache=False)(clips)
    bf16, _ = ClipFeatures(
        model, col, cache=False, context=lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    )(clips)
    assert plain.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), plain, atol=0.1, rtol=0.1)
