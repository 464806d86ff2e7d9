"""Image-text pairs (the media-text source of mm.datasets.media with mm.datasets.images' decoder): manifests,
shards, safe decoding and the bad-input policy."""

import io
import json
import logging
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mm.datasets.images import DEFAULT_MAX_PIXELS, image_decoder
from mm.datasets.media import MediaTextDataset, iter_webdataset, read_manifest
from mm.datasets.skips import SkipStats, TooManyBadSamples
from mm.datasets.streams import open_stream
from mm.datasets.tars import expand_shards
from mm.datasets.tiling import CLIP_MEAN, CLIP_STD, TileTransform

TILE = 16


def pairs(manifest, transform=None, *, max_pixels=DEFAULT_MAX_PIXELS, **kw) -> MediaTextDataset:
    """The image-text pairs of a manifest."""
    return MediaTextDataset(manifest, image_decoder(transform, max_pixels=max_pixels), **kw)


def shard_pairs(shards, transform=None, **kw):
    """The image-text pairs of shards, in stored order."""
    return iter_webdataset(shards, image_decoder(transform), **kw)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(width: int = 24, height: int = 16, color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (width, height), color))


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (CRC fixed): a decompression-bomb header on tiny data."""
    data = bytearray(png)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_bytes(mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).convert(mode)
    return encode(image, "JPEG")


def write_manifest(folder, entries):
    path = folder / "pairs.jsonl"
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


@pytest.fixture
def mixed(tmp_path):
    """A manifest with 7 good images in various modes and 5 bad ones, plus 2 missing files and 2 bad lines."""
    img = tmp_path / "img"
    img.mkdir()
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8, :8] = (10, 200, 30, 255)  # opaque top-left quarter, the rest fully transparent
    files = {
        "rgb.png": png_bytes(),
        "grey.png": encode(Image.new("L", (20, 20), 77)),
        "palette.png": encode(Image.new("RGB", (20, 20), (0, 0, 255)).convert("P")),
        "rgba.png": encode(Image.fromarray(rgba, mode="RGBA")),
        "cmyk.jpg": jpeg_bytes("CMYK"),
        "rgb.jpg": jpeg_bytes(),
        "wide.png": png_bytes(64, 16),
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "truncated.jpg": jpeg_bytes()[:300],
        "empty.png": b"",
        "bomb.png": with_png_size(png_bytes(), 100_000, 100_000),  # beyond PIL's own limit
        "big.png": with_png_size(png_bytes(), 9_000, 9_000),  # 81 Mpx: beyond our 64 Mpx default only
    }
    for name, data in files.items():
        (img / name).write_bytes(data)
    entries = [
        {"image": f"img/{name}", "text": f"caption of {name}", "id": k} for k, name in enumerate(files)
    ]
    entries.insert(3, {"image": "img/gone1.png", "text": "missing"})
    entries.insert(5, {"image": str(tmp_path / "img" / "gone2.png"), "text": "missing too"})
    entries.insert(1, "this is not json")
    entries.insert(2, {"image": "img/rgb.png", "text": ""})  # empty caption: malformed
    return write_manifest(tmp_path, entries)


def test_read_manifest_resolves_paths_and_keeps_metadata(tmp_path, caplog):
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = write_manifest(
        tmp_path,
        [
            {"image": "a.png", "text": "a red thing", "objects": [1, 2]},
            {"image": str(tmp_path / "a.png"), "text": "absolute"},
            "",
            "[1, 2]",
            {"text": "no image"},
        ],
    )
    with caplog.at_level(logging.WARNING):
        records = read_manifest(path, "image")
    assert [(r.media, r.text, r.meta) for r in records] == [
        (tmp_path / "a.png", "a red thing", {"objects": [1, 2]}),
        (tmp_path / "a.png", "absolute", {}),
    ]
    assert "pairs.jsonl:4: skipped manifest record: a JSON list" in caplog.text
    assert "pairs.jsonl:5: skipped manifest record: no 'image' string" in caplog.text
    assert "skipped 2 malformed records" in caplog.text
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl", "image")


def test_bad_inputs_are_skipped_with_exact_counts(mixed, caplog, faults):
    with caplog.at_level(logging.WARNING):
        ds = pairs(mixed, TileTransform(TILE, 4), max_bad_fraction=1.0)
    assert "dropped 2 of 14 entries whose image file is missing" in caplog.text
    assert "gone1.png" in caplog.text and ds.missing[1].endswith("gone2.png")
    assert len(ds) == 12
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        samples = [ds.load(i) for i in range(len(ds))]
    good = [s["source"].rsplit("/", 1)[1] for s in samples if s is not None]
    assert good == ["rgb.png", "grey.png", "palette.png", "rgba.png", "cmyk.jpg", "rgb.jpg", "wide.png"]
    assert ds.stats.tried == 12
    assert dict(ds.stats.skipped) == {"corrupt": 2, "empty": 1, "too_large": 2}
    assert [p.rsplit("/", 1)[1] for p in ds.stats.examples["corrupt"]] == ["corrupt.png", "truncated.jpg"]
    assert "big.png (too_large: 9000x9000 = 81000000 pixels > max_pixels=64000000)" in caplog.text
    assert "empty.png (empty: zero-byte file)" in caplog.text
    # Bad entries are remembered: asking again neither decodes nor counts them again.
    assert ds.load(8) is None and ds.stats.tried == 12
    # ds[i] moves on to the next usable entry so batches keep their size.
    sample = ds[7]  # corrupt.png -> truncated.jpg, empty.png, bomb.png, big.png are bad -> wraps to rgb.png
    assert sample["index"] == 0 and sample["text"] == "caption of rgb.png"
    faults.record("corrupt", ds.stats.n_skipped + len(ds.missing), what="image files (PNG, JPEG, missing)")


def test_samples_hold_tiles_text_and_source(mixed):
    ds = pairs(mixed, TileTransform(TILE, 4), max_bad_fraction=1.0)
    by_name = {s["source"].rsplit("/", 1)[1]: s for s in (ds.load(i) for i in range(len(ds))) if s}
    s = by_name["wide.png"]  # 64x16 with 16-px tiles: the 1x4 grid, no resize
    assert (
        s["tiles"].shape == (4, 3, TILE, TILE) and s["aspect_ratio_id"] == 4 and s["aspect_ratio"] == (1, 4)
    )
    assert s["text"] == "caption of wide.png" and s["index"] == 6
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(
        s["tiles"][0],
        ((torch.tensor([200.0, 30, 30]).view(3, 1, 1) / 255 - mean) / std).expand(3, TILE, TILE),
    )
    # Greyscale, palette and RGBA images become RGB; transparency is composited on white.
    grey = by_name["grey.png"]["tiles"][0, :, 0, 0]
    torch.testing.assert_close(grey, (77 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    blue = by_name["palette.png"]["tiles"][0, :, 0, 0]
    torch.testing.assert_close(
        blue, (torch.tensor([0.0, 0, 1]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    )
    rgba = by_name["rgba.png"]["tiles"]  # 16x16: one tile, no resize
    assert rgba.shape == (1, 3, TILE, TILE)
    torch.testing.assert_close(
        rgba[0, :, 0, 0], (torch.tensor([10.0, 200, 30]) / 255 - mean.flatten()) / std.flatten()
    )
    torch.testing.assert_close(rgba[0, :, 15, 15], (1 - mean.flatten()) / std.flatten())
    assert by_name["cmyk.jpg"]["tiles"].shape[1:] == (3, TILE, TILE)
    # Without a transform the decoded PIL image is returned.
    raw = pairs(mixed, max_bad_fraction=1.0).load(0)
    assert isinstance(raw["image"], Image.Image) and raw["image"].size == (24, 16)


def test_pixel_limit_is_configurable(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(24, 16))
    path = write_manifest(tmp_path, [{"image": "a.png", "text": "x"}])
    assert pairs(path, max_pixels=384).load(0) is not None
    ds = pairs(path, max_pixels=383, max_bad_fraction=1.0)
    assert ds.load(0) is None and dict(ds.stats.skipped) == {"too_large": 1}


def test_too_many_bad_samples_raises_with_counts(tmp_path):
    (tmp_path / "good.png").write_bytes(png_bytes())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    entries = [{"image": "bad.png", "text": "b"}] * 2 + [{"image": "good.png", "text": "g"}] * 30
    ds = pairs(write_manifest(tmp_path, entries))
    for i in range(19):  # 2 bad of 19 tried: not checked before 20 samples
        ds.load(i)
    with pytest.raises(TooManyBadSamples, match=r"2 of 20 samples of manifest .*pairs.jsonl.* corrupt: 2"):
        ds.load(19)
    # 1 bad in 20 (5%) is within the default limit.
    ds = pairs(write_manifest(tmp_path, entries[1:]))
    assert sum(ds.load(i) is not None for i in range(len(ds))) == 30


def test_skip_stats_summary():
    stats = SkipStats(max_bad_fraction=0.5, min_tried=4)
    stats.ok()
    stats.skip("corrupt", "a.png", "bad header")
    stats.skip("corrupt", "b.png")
    stats.ok()
    assert stats.as_dict() == {
        "tried": 4,
        "skipped": 2,
        "skipped_by_reason": {"corrupt": 2},
        "examples": {"corrupt": ["a.png", "b.png"]},
    }
    with pytest.raises(TooManyBadSamples, match="3 of 5"):
        stats.skip("empty", "c.png")
    with pytest.raises(ValueError, match="max_bad_fraction"):
        SkipStats(max_bad_fraction=1.5)


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        pairs(tmp_path / "missing.jsonl")
    path = write_manifest(tmp_path, [{"image": "gone.png", "text": "x"}, "garbage"])
    with pytest.raises(ValueError, match="pairs.jsonl has no usable entries"):
        pairs(path)
    (tmp_path / "bad.png").write_bytes(b"junk")
    ds = pairs(write_manifest(tmp_path, [{"image": "bad.png", "text": "x"}]))
    with pytest.raises(ValueError, match="every entry was skipped"):
        ds[0]


def test_sample_order_is_a_seeded_permutation(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    ds = pairs(write_manifest(tmp_path, [{"image": "a.png", "text": str(k)} for k in range(50)]))
    order = ds.sample_order(seed=1, epoch=0)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == ds.sample_order(seed=1, epoch=0)
    assert order != ds.sample_order(seed=1, epoch=1) and order != ds.sample_order(seed=2, epoch=0)


# ------------------------------------------------------------------------------------------------ shards


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                add_member(tar, name, data)


@pytest.fixture
def shards(tmp_path):
    """Two good shards with some broken samples, and one truncated shard."""
    write_shard(
        tmp_path / "s-00000.tar",
        [
            ("000.png", png_bytes(color=(255, 0, 0))),
            ("000.txt", b"a red one\n"),
            ("sub", None),  # a folder member: ignored
            ("sub/001.jpg", jpeg_bytes()),
            ("sub/001.json", json.dumps({"text": "from json", "id": 1}).encode()),
            ("002.png", b"\x89PNG broken member"),
            ("002.txt", b"broken image"),
            ("003.png", png_bytes()),  # no caption
            ("004.png", png_bytes()),
            ("004.json", b'{"caption": "wrong field"}'),
        ],
    )
    write_shard(
        tmp_path / "s-00001.tar",
        [
            (
                "../evil.png",
                png_bytes(color=(0, 255, 0)),
            ),  # a name outside the folder: skipped, never written
            ("../evil.txt", b"a green one"),
            ("005.txt", b"text without image"),
            ("006.seg.png", png_bytes()),  # not an image extension we read
            ("006.png", png_bytes(8, 8)),
            ("006.txt", b"small"),
        ],
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k in range(3):
            add_member(tar, f"{k:03d}.png", png_bytes())
            add_member(tar, f"{k:03d}.txt", f"truncated shard {k}".encode())
    # Each sample takes 4 blocks of 512 bytes (header + data, twice): cut inside the second sample's PNG data.
    (tmp_path / "s-00002.tar").write_bytes(buf.getvalue()[: 4 * 512 + 512 + 40])
    return tmp_path


def test_webdataset_shards_with_exact_skip_counts(shards, tmp_path, faults):
    stats = SkipStats(max_bad_fraction=1.0)
    samples = list(shard_pairs(str(shards / "s-*.tar"), TileTransform(TILE, 4), stats=stats))
    assert [s["text"] for s in samples] == [
        "a red one",
        "from json",
        "small",
        "truncated shard 0",
    ]
    assert [s["key"] for s in samples] == ["000", "sub/001", "006", "000"]
    assert samples[0]["source"] == f"{shards / 's-00000.tar'}:000"
    assert samples[1]["meta"] == {"text": "from json", "id": 1}
    assert samples[0]["tiles"].shape == (2, 3, TILE, TILE)  # 24x16 -> 1x2 tiles of 16
    assert dict(stats.skipped) == {
        "corrupt": 1,
        "no_text": 1,
        "bad_text": 1,
        "no_image": 1,
        "broken_shard": 1,
        "unsafe_name": 1,
    }
    assert stats.tried == 10
    assert stats.examples["broken_shard"] == [str(shards / "s-00002.tar")]
    assert not (tmp_path.parent / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    faults.record("corrupt", stats.n_skipped, what="image shard samples")


def test_shards_bad_fraction_and_oversized_members(shards):
    stats = SkipStats(max_bad_fraction=0.05, min_tried=10, what="samples of shards")
    with pytest.raises(TooManyBadSamples, match="6 of 10 samples of shards"):
        list(shard_pairs(sorted(shards.glob("s-*.tar")), stats=stats))
    # Members over max_member_bytes are not read (the PNGs here have 77-85 bytes, the captions < 20).
    stats = SkipStats(max_bad_fraction=1.0)
    out = list(shard_pairs(shards / "s-00001.tar", stats=stats, max_member_bytes=50))
    assert out == [] and dict(stats.skipped) == {"unsafe_name": 1, "too_large": 1, "no_image": 1}


def test_expand_shards(shards):
    names = [p.name for p in expand_shards(str(shards / "s-{00000..00002}.tar"))]
    assert names == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert [p.name for p in expand_shards(shards)] == names
    assert [p.name for p in expand_shards([shards / "s-00001.tar", str(shards / "s-0000[02].tar")])] == [
        "s-00001.tar",
        "s-00000.tar",
        "s-00002.tar",
    ]
    with pytest.raises(FileNotFoundError, match="s-00008.tar does not exist"):
        expand_shards(str(shards / "s-{00008..00009}.tar"))
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards(str(shards / "x-*.tar"))


def test_shard_stream_shuffles_shards_per_epoch_splits_ranks_and_skips_as_in_stored_order(shards):
    """The source's shard stream: the shard order is shuffled per epoch (fixed by the seed), process `rank` of
    `world` reads every `world`-th position, and the samples and skips are those of reading in stored order."""
    paths = [str(p) for p in sorted(shards.glob("s-0000[01].tar"))]
    kw = {"seed": 3, "shuffle_window": 1, "max_bad_fraction": 1.0}
    ds, again = open_stream(paths, image_decoder(), **kw), open_stream(paths, image_decoder(), **kw)
    n = len(ds)
    first = [[s.dataset.locate(s.index(e * n))[0] for e in range(8)] for s in (ds, again)]
    assert first[0] == first[1] and set(first[0]) == {0, 1}  # the first shard of each epoch
    ranks = [open_stream(paths, image_decoder(), rank=r, world=2, **kw) for r in range(2)]
    split = sorted((s["position"], s["source"]) for r in ranks for s in (r.next() for _ in range(n)))
    assert split == [(g, ds.sample(g)["source"]) for g in range(2 * n)]
    seq = SkipStats(max_bad_fraction=1.0)
    stored = [s["text"] for s in shard_pairs(paths, stats=seq)]
    assert stored == ["a red one", "from json", "small"] and seq.n_skipped == 5
    assert {ds.sample(g)["text"] for g in range(n)} == set(stored)
    assert ds.stats()["skipped_by_reason"] == dict(seq.skipped)
    with pytest.raises(ValueError, match="rank"):
        open_stream(paths, image_decoder(), rank=2, world=2, **kw)


@pytest.mark.parametrize("bug", [TypeError, AttributeError])
def test_a_bug_in_the_transform_propagates_and_is_not_counted_as_bad_data(tmp_path, bug):
    """Only PIL's refusals count as bad images: an error of our own transform stops the reader (manifest and
    shard alike), while PIL refusing a conversion (ValueError) is a skip with reason "transform"."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    manifest = write_manifest(tmp_path, [{"image": "a.png", "text": "a red thing"}])
    write_shard(tmp_path / "s-00000.tar", [("000.png", png_bytes()), ("000.txt", b"a red thing")])

    def buggy(image):
        raise bug("a bug in our transform")

    ds = pairs(manifest, buggy, max_bad_fraction=1.0)
    with pytest.raises(bug, match="a bug in our transform"):
        ds.load(0)
    assert ds.stats.tried == 0 and not ds.stats.skipped
    stats = SkipStats(max_bad_fraction=1.0)
    with pytest.raises(bug, match="a bug in our transform"):
        list(shard_pairs(str(tmp_path / "s-00000.tar"), buggy, stats=stats))
    assert stats.tried == 0 and not stats.skipped

    def unconvertible(image):  # PIL itself refuses: "conversion from La to L not supported"
        return TileTransform(TILE, 4)(image.convert("La"))

    ds = pairs(manifest, unconvertible, max_bad_fraction=1.0)
    assert ds.load(0) is None and dict(ds.stats.skipped) == {"transform": 1}
