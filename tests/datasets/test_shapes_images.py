"""The shapes world's images (mm.datasets.shapes.synth_shapes): layout, captions, held-out pairs, outputs."""

import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from mm.datasets.images import ImageTextDataset, iter_webdataset
from mm.datasets.shapes import (
    COLORS,
    DEFAULT_IMAGE_COUNTS,
    HELDOUT_PAIRS,
    IMAGE_SPLITS,
    caption,
    random_scene,
    render_scene,
    synth_shapes,
)
from mm.datasets.tiling import TileTransform

N = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    manifests = {
        "train": synth_shapes(out, n=N, seed=0, split="train", shard_size=30),
        "heldout": synth_shapes(out, n=N, seed=0, split="heldout", shard_size=30),
        "heldout_pairs": synth_shapes(out, n=N, seed=0, split="heldout_pairs", shard_size=30),
    }
    return out, manifests


def records(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_outputs_and_layout(world):
    out, manifests = world
    root = out / "shapes"
    assert manifests["train"] == root / "train.jsonl"
    assert sorted(p.name for p in root.glob("train-*.tar")) == [
        "train-00000.tar",
        "train-00001.tar",
        "train-00002.tar",
    ]
    recs = records(manifests["train"])
    assert len(recs) == N and recs[0]["image"] == "train/000000.png"
    with tarfile.open(root / "train-00002.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000060.png", "000060.txt", "000060.json"] and len(names) == 12
        meta = json.loads(tar.extractfile("000060.json").read())
        assert tar.extractfile("000060.txt").read().decode() == recs[60]["text"] == meta["text"]
        assert tar.extractfile("000060.png").read() == (root / "train" / "000060.png").read_bytes()
    assert meta["objects"] == recs[60]["objects"] and meta["split"] == "train" and meta["index"] == 60


def test_images_follow_the_world_rules(world):
    _, manifests = world
    root = manifests["train"].parent
    ratios = {"landscape": [], "portrait": []}
    for rec in records(manifests["train"]) + records(manifests["heldout_pairs"]):
        image = np.asarray(Image.open(root / rec["image"]))
        h, w = image.shape[:2]
        assert (w, h) == (rec["width"], rec["height"]) and 64 <= w <= 256 and 64 <= h <= 256
        ratios["landscape" if w >= h else "portrait"].append(max(w, h) / min(w, h))
        bg = rec["background"]
        assert all(200 <= c <= 255 for c in bg)
        assert image[0, 0].tolist() == bg or image[-1, -1].tolist() == bg
        objs = rec["objects"]
        assert 1 <= len(objs) <= 2
        assert rec["text"] == caption([(o["size"], o["color"], o["shape"]) for o in objs])
        short = min(w, h)
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 == y1 - y0
            lo, hi = (0.15, 0.25) if o["size"] == "small" else (0.35, 0.50)
            assert lo * short - 0.5 <= x1 - x0 <= hi * short + 0.5
            # The box centre is inside every shape (the triangle's apex is at the top centre).
            assert image[(y0 + y1) // 2, (x0 + x1) // 2].tolist() == list(COLORS[o["color"]])
        if len(objs) == 2:
            a, b = objs[0]["bbox"], objs[1]["bbox"]
            ca, cb = (a[0] + a[2]) / 2, (b[0] + b[2]) / 2
            assert cb - ca >= max(4, (a[2] - a[0] + b[2] - b[0]) / 4)  # left to right, well apart
            assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]
        # Only object colours and the background occur (no anti-aliasing, nothing else drawn).
        colour_pixels = sum(int(np.all(image == c, axis=-1).sum()) for c in COLORS.values())
        assert colour_pixels + int(np.all(image == bg, axis=-1).sum()) == w * h
    # Both orientations, from about 1:1 up to 4:1.
    for side in ratios.values():
        assert min(side) < 1.3 and max(side) > 3.5 and max(side) <= 4.0 + 1e-9


def test_heldout_pairs_split_rules(world):
    _, manifests = world

    def pairs(split):
        return [{(o["color"], o["shape"]) for o in r["objects"]} for r in records(manifests[split])]

    for split in ("train", "heldout"):
        assert not any(p & set(HELDOUT_PAIRS) for p in pairs(split)), split
    held = pairs("heldout_pairs")
    assert all(p & set(HELDOUT_PAIRS) for p in held)
    assert set().union(*held) >= set(HELDOUT_PAIRS)
    # The heldout split is new images of the same distribution, not copies of train.
    assert [r["text"] for r in records(manifests["heldout"])] != [
        r["text"] for r in records(manifests["train"])
    ]


def test_deterministic_and_stale_files_removed(world, tmp_path):
    out, manifests = world
    again = synth_shapes(tmp_path, n=N, seed=0, split="train", shard_size=30)
    assert again.read_bytes() == manifests["train"].read_bytes()
    for k in range(3):
        name = f"train-{k:05d}.tar"
        assert (tmp_path / "shapes" / name).read_bytes() == (out / "shapes" / name).read_bytes()
    other = synth_shapes(tmp_path / "b", n=N, seed=1, split="train")
    assert other.read_bytes() != manifests["train"].read_bytes()
    # The first images do not depend on n; a smaller run removes the larger run's extra files.
    small = synth_shapes(tmp_path, n=5, seed=0, split="train", shard_size=30)
    assert small.read_text().splitlines() == manifests["train"].read_text().splitlines()[:5]
    assert sorted(p.name for p in (tmp_path / "shapes").glob("train-*.tar")) == ["train-00000.tar"]
    assert len(list((tmp_path / "shapes" / "train").glob("*.png"))) == 5


def test_readers_agree(world):
    _, manifests = world
    manifest = manifests["heldout_pairs"]
    ds = ImageTextDataset(manifest, TileTransform(32, 4))
    from_manifest = [ds[i] for i in range(len(ds))]
    shards = str(manifest.parent / "heldout_pairs-*.tar")
    from_shards = list(iter_webdataset(shards, TileTransform(32, 4)))
    assert [s["text"] for s in from_shards] == [s["text"] for s in from_manifest]
    for a, b in zip(from_manifest, from_shards):
        assert a["aspect_ratio_id"] == b["aspect_ratio_id"] and (a["tiles"] == b["tiles"]).all()
    ids = {s["aspect_ratio_id"] for s in from_manifest}
    assert ds.stats.n_skipped == 0 and ids >= {4, 8} and len(ids) >= 3  # 1x4 and 4x1 grids among others


def test_random_scene_and_arguments(tmp_path):
    scene = random_scene(random.Random(0), bucket=3, pairs=[("red", "circle")], forced=("blue", "square"))
    assert 3.2 <= scene.width / scene.height <= 4.0  # bucket 3: landscape, 3.25:1 to 4:1 up to rounding
    assert ("blue", "square") in {(o.color, o.shape) for o in scene.objects}
    assert render_scene(scene).size == (scene.width, scene.height)
    assert IMAGE_SPLITS == ("train", "heldout", "heldout_pairs")
    assert set(DEFAULT_IMAGE_COUNTS) == set(IMAGE_SPLITS)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        synth_shapes(tmp_path, n=1, split="test")
    with pytest.raises(ValueError, match="n and shard_size"):
        synth_shapes(tmp_path, n=0)
