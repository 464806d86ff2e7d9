"""Dirty data in a real adapter-stage run: a few percent of corrupt, truncated, empty and mis-labelled image files
(PNG and JPEG) are skipped with exact counts per reason and the run finishes; above the configured bad fraction
the run stops with an error that gives the counts and example paths."""

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mm.datasets.skips import TooManyBadSamples
from mm.lm import Tokenizer, Transformer, preset, save_hf
from mm.stages.image import ImageStageConfig
from mm.training.config import load_config
from mm.training.runner import run as run_stage
from mm.world import synth_shapes

ROOT = Path(__file__).resolve().parents[2]
N = 60


@pytest.fixture(scope="module")
def dirty(corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dirty")
    tok = Tokenizer.from_file(corpus["tokenizer"])
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size)), root / "lm")
    tok.save(root / "lm")
    manifest = synth_shapes(root, n=N, seed=1, split="train")
    records = [json.loads(x) for x in manifest.read_text().splitlines()]
    folder = manifest.parent

    def png_as_jpeg(rec: dict) -> None:  # mis-labelled but valid: a JPEG behind a .png name is decoded
        path = folder / rec["image"]
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG")
        path.write_bytes(buf.getvalue())

    damage = {
        3: ("corrupt", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))),
        17: ("corrupt", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])),  # truncated PNG
        29: ("empty", lambda p: p.write_bytes(b"")),
        41: ("corrupt", lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")),  # a WAV header named .png
    }
    for i, (_, hurt) in damage.items():
        hurt(folder / records[i]["image"])
    png_as_jpeg(records[50])
    jpeg = folder / "train" / "jpeg_000.jpg"  # and a truncated real JPEG entry
    Image.open(folder / records[0]["image"]).convert("RGB").save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    records.append({"image": "train/jpeg_000.jpg", "text": records[0]["text"]})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = {"corrupt": 4, "empty": 1}  # damage above + the truncated JPEG
    return {"root": root, "manifest": manifest, "expected": expected, "n": len(records)}


def cfg_for(dirty: dict, out: Path, *extra: str) -> ImageStageConfig:
    return load_config(
        ImageStageConfig,
        ROOT / "configs" / "stages" / "image_pretrain_tiny.yaml",
        [
            f"lm={dirty['root'] / 'lm'}",
            f"out={out}",
            f"data.train=[{dirty['manifest']}]",
            "image_encoder.embed_dim=32",
            "image_encoder.depth=2",
            "image_encoder.num_heads=2",
            "image_encoder.intermediate_layers=[0]",
            "train.batch_size=4",
            "train.max_steps=15",  # 60 draws: one pass over the 56 good entries and past every bad one
            "train.save_every=100",
            "train.peak_flops=1e9",
            "eval_samples=0",
            *extra,
        ],
    )


def test_dirty_images_are_skipped_with_exact_counts_and_the_run_finishes(dirty, tmp_path, caplog, faults):
    summary = run_stage(cfg_for(dirty, tmp_path / "run", "data.max_bad_fraction=0.25"))
    assert summary["stopped"] == "max_steps" and summary["step"] == 15
    skips = summary["data_skips"]
    assert skips["skipped_by_reason"] == dirty["expected"]
    assert skips["skipped"] == 5 and skips["tried"] == 15 * 4 + 5  # every draw, plus each bad file once
    for paths in skips["examples"].values():
        for p in paths:
            assert p in caplog.text  # logged with its path
    assert (tmp_path / "run" / "final" / "adapter.safetensors").is_file()
    faults.record("corrupt", skips["skipped"], what="PNG/JPEG in an adapter-stage run")


def test_above_the_bad_fraction_the_run_stops_with_counts(dirty, tmp_path, faults):
    with pytest.raises(TooManyBadSamples, match=r"of \d+ samples of manifest .*train.jsonl.*corrupt: \d"):
        run_stage(cfg_for(dirty, tmp_path / "run", "data.max_bad_fraction=0.02"))
    assert not (tmp_path / "run" / "final").exists()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    faults.record("corrupt", what="bad fraction exceeded")
