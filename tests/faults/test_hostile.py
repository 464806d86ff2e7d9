"""Hostile files: pickles that would run code, safetensors with wrong dtypes or shapes, tar members named
outside their folder, decompression bombs, and special-token strings in user text."""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mm.datasets.collate import ImageCaptionCollator
from mm.datasets.images import image_decoder
from mm.datasets.media import MediaTextDataset, iter_webdataset
from mm.datasets.skips import SkipStats
from mm.datasets.tiling import TileTransform
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.formats.bundle import load_adapter_weights
from mm.formats.timm import load_timm_weights
from mm.lm import SPECIAL_TOKENS, Tokenizer, Transformer, load_hf, preset, save_hf
from mm.models.multimodal import MultimodalLM
from mm.prompts import IMAGE_PROMPT
from mm.training.checkpoint import load_checkpoint, save_checkpoint


class _RunsCode:
    """Unpickling this calls os.system (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png(color=(200, 30, 30), size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_pickles_that_run_code_are_refused_everywhere(tmp_path, faults):
    marker = tmp_path / "pwned"
    evil = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": _RunsCode(marker)}, evil)
    vit = ImageEncoder(ImageEncoderConfig(tile_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)).vit
    with pytest.raises(ValueError, match=r"vit.pth: refused to load.*safetensors"):
        load_timm_weights(vit, evil)
    faults.record("hostile", what="pickle weights file")

    # A sharded (DCP) checkpoint folder whose metadata, or one of whose non-tensor items, runs code:
    # DCP itself reads both with plain pickle; mm's reader refuses them.
    import pickle

    from mm.training.dcp import UnsafeCheckpoint, load_state

    ck = save_checkpoint(
        tmp_path / "ckpts",
        1,
        state={"model": {"w": torch.ones(2)}, "optimizer": {"lr": 0.5}},
        trainer_state={"step": 1},
    )
    assert load_checkpoint(ck)["model"]["w"].tolist() == [1.0, 1.0]
    evil_item = {"model": {"w": torch.ones(2)}, "optimizer": {"lr": _RunsCode(marker)}}
    bad = save_checkpoint(tmp_path / "ckpts", 2, state=evil_item, trainer_state={"step": 2})
    with pytest.raises(UnsafeCheckpoint, match="optimizer.lr needs code to load"):
        load_state({"model": {"w": torch.zeros(2)}, "optimizer": {"lr": 0.0}}, bad / "dcp")
    metadata = ck / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata: refused: the checkpoint metadata names"):
        load_checkpoint(ck)
    faults.record("hostile", what="pickle in a sharded checkpoint (metadata, item)")

    # An HF folder with only a pickle checkpoint.
    lm_dir = tmp_path / "lm"
    save_hf(Transformer(preset("nano")), lm_dir)
    (lm_dir / "model.safetensors").unlink()
    torch.save({"x": _RunsCode(marker)}, lm_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded"):
        load_hf(lm_dir)
    faults.record("hostile", what="pickle HF checkpoint")
    assert not marker.exists()  # no code ran


def test_safetensors_with_wrong_dtype_or_shape_name_the_key(tmp_path, faults):
    lm_dir = tmp_path / "lm"
    save_hf(Transformer(preset("nano")), lm_dir)
    sd = load_file(str(lm_dir / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    for i, (bad, pattern) in enumerate(
        (
            (sd[key].to(torch.int32), r"up_proj.weight.*dtype I32, expected a float dtype"),
            (sd[key][:, :-1].contiguous(), r"up_proj.weight.*has shape .*expected"),
        )
    ):
        broken = tmp_path / f"lm_{i}"
        shutil.copytree(lm_dir, broken)
        save_file({**sd, key: bad}, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=pattern):
            load_hf(broken)
        faults.record("hostile", what="safetensors LM dtype/shape")

    lm = Transformer(preset("nano"))
    enc = ImageEncoder(
        ImageEncoderConfig(tile_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, out_dim=64)
    )
    model = MultimodalLM(lm, enc, xattn_every=2, image_token_id=3)
    adapter = {k: v.clone() for k, v in model.adapter_state().items()}
    name = "image_xattn.1.attention.wq.weight"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for bad, pattern in (
        (adapter[name].to(torch.float16), r"wq.weight has dtype torch.float16, expected torch.float32"),
        (adapter[name][:-1].contiguous(), r"wq.weight has shape"),
    ):
        save_file({**adapter, name: bad}, str(bundle / "adapter.safetensors"))
        with pytest.raises(ValueError, match=pattern):
            load_adapter_weights(model, bundle)
        faults.record("hostile", what="safetensors adapter dtype/shape")

    timm_file = tmp_path / "vit.safetensors"
    vit_sd = {k: v.clone() for k, v in enc.vit.state_dict().items()}
    save_file({**vit_sd, "cls_token": vit_sd["cls_token"].to(torch.int64)}, str(timm_file))
    with pytest.raises(ValueError, match=r"'cls_token' has dtype torch.int64"):
        load_timm_weights(enc.vit, timm_file)
    faults.record("hostile", what="safetensors timm dtype")


def test_tar_members_named_outside_the_folder_are_skipped_and_never_written(tmp_path, faults):
    work = tmp_path / "data"
    work.mkdir()
    shard = work / "evil-00000.tar"
    members = [
        ("good.png", _png()),
        ("good.txt", b"a small red square"),
        ("../escape.png", _png()),
        ("../escape.txt", b"a small red square"),
        ("/tmp/absolute.png", _png()),
        ("/tmp/absolute.txt", b"a small red square"),
        ("sub/../../up.png", _png()),
        ("sub/../../up.txt", b"a small red square"),
    ]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = set(tmp_path.rglob("*")) | set(Path("/tmp").glob("absolute*"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        stats = SkipStats(0.9)
        samples = list(iter_webdataset(shard, image_decoder(), stats=stats))
    finally:
        os.chdir(cwd)
    assert [s["key"] for s in samples] == ["good"]
    assert stats.as_dict()["skipped_by_reason"] == {"unsafe_name": 3}
    assert set(tmp_path.rglob("*")) | set(Path("/tmp").glob("absolute*")) == before
    faults.record("hostile", 3, what="tar member outside its folder")


def test_decompression_bomb_is_rejected_by_its_header(tmp_path, faults, caplog):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb, optimize=True)  # 144 Mpixel, a few kB on disk
    assert bomb.stat().st_size < 200_000
    good = tmp_path / "good.png"
    good.write_bytes(_png())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(json.dumps({"image": p.name, "text": "a small red square"}) for p in (bomb, good)) + "\n"
    )
    ds = MediaTextDataset(manifest, image_decoder(TileTransform(16, 2)), max_bad_fraction=0.9)
    assert ds.load(0) is None and ds.load(1) is not None
    assert ds.stats.as_dict()["skipped_by_reason"] == {"too_large": 1}
    assert "bomb.png" in caplog.text
    faults.record("hostile", what="decompression bomb")


def test_special_token_strings_in_user_text_stay_text(corpus, faults):
    tok = Tokenizer.from_file(corpus["tokenizer"])
    specials = tok.special_ids
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"a red {s} circle {s}")
        assert not set(ids) & specials, s
        assert tok.decode(ids) == f"a red {s} circle {s}"
    faults.record("hostile", len(SPECIAL_TOKENS), what="special-token string in text")
    col = ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=2)
    sample = {
        "tiles": torch.zeros(1, 3, 16, 16),
        "aspect_ratio_id": 1,
        "text": "<|image|> a red <|image|> circle",
    }
    batch = col([sample])
    assert int((batch["tokens"] == tok.image_id).sum()) == 1  # the prompt's own slot only
    mask = batch["cross_attention_mask"]
    assert mask.shape[2] == 1
    faults.record("hostile", what="<|image|> in a caption")
