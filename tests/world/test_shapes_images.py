"""The shapes world's images (mm.world.images.synth_shapes): layout, captions, held-out pairs, outputs."""

import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from mm.datasets.images import image_decoder
from mm.datasets.media import MediaTextDataset, iter_webdataset
from mm.datasets.tiling import TileTransform
from mm.world import (
    COLORS,
    DEFAULT_IMAGE_COUNTS,
    HELDOUT_PAIRS,
    IMAGE_SPLITS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    VARIANT_KINDS,
    Scene,
    SceneObject,
    caption,
    random_scene,
    render_scene,
    synth_shapes,
    synth_shapes_variants,
)

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
    ds = MediaTextDataset(manifest, image_decoder(TileTransform(32, 4)))
    from_manifest = [ds[i] for i in range(len(ds))]
    shards = str(manifest.parent / "heldout_pairs-*.tar")
    from_shards = list(iter_webdataset(shards, image_decoder(TileTransform(32, 4))))
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


# ------------------------------------------------------------------------------------- robustness variants

NV = 32


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    return out, {kind: synth_shapes_variants(out, n=NV, seed=0, kind=kind) for kind in VARIANT_KINDS}


def scene_of(rec):
    objs = tuple(SceneObject(o["size"], o["color"], o["shape"], tuple(o["bbox"])) for o in rec["objects"])
    return Scene(rec["width"], rec["height"], tuple(rec["background"]), objs)


def nearest_colour(pixel):
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], pixel)))


def test_variants_stay_within_the_world(variants):
    out, manifests = variants
    for kind, manifest in manifests.items():
        assert manifest == out / "shapes" / f"variants_{kind}.jsonl"
        recs = records(manifest)
        assert len(recs) == NV and recs[0]["image"].startswith(f"variants_{kind}/000000.")
        words = {"color": set(), "shape": set(), "size": set(), "count": set()}
        for rec in recs:
            assert rec["variant"]["kind"] == kind
            image = np.asarray(Image.open(manifest.parent / rec["image"]).convert("RGB"))
            h, w = image.shape[:2]
            assert (w, h) == (rec["width"], rec["height"]) and 64 <= w <= 256 and 64 <= h <= 256
            assert max(w, h) / min(w, h) <= 4.0
            assert all(200 <= c <= 255 for c in rec["background"])
            objs = rec["objects"]
            assert 1 <= len(objs) <= 2
            assert rec["text"] == caption([(o["size"], o["color"], o["shape"]) for o in objs])
            words["count"].add(len(objs))
            short = min(w, h)
            for o in objs:
                assert (o["color"], o["shape"]) in TRAIN_PAIRS, (kind, rec["image"])
                for key in ("color", "shape", "size"):
                    words[key].add(o[key])
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 == y1 - y0
                lo, hi = (0.15, 0.25) if o["size"] == "small" else (0.35, 0.50)
                slack = (
                    1e-9 if kind == "sizes" else 0.5
                )  # the generator rounds; "sizes" picks whole px inside
                assert lo * short - slack <= x1 - x0 <= hi * short + slack, (kind, rec["image"], o)
                # The object's colour is the one nearest the box centre (JPEG and filtering move it a little).
                assert nearest_colour(image[(y0 + y1) // 2, (x0 + x1) // 2].tolist()) == o["color"]
            if len(objs) == 2:
                a, b = objs[0]["bbox"], objs[1]["bbox"]
                assert (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2 >= max(4, (a[2] - a[0] + b[2] - b[0]) / 4)
                assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]
        # Never fewer colours, shapes, sizes or object counts than the world has.
        assert words == {"color": set(COLORS), "shape": set(SHAPES), "size": set(SIZES), "count": {1, 2}}, (
            kind
        )
        # They read like any manifest (JPEG included), nothing skipped.
        ds = MediaTextDataset(manifest, image_decoder(TileTransform(32, 4)))
        assert [ds[i]["text"] for i in range(3)] == [r["text"] for r in recs[:3]] and ds.stats.n_skipped == 0


def test_variants_are_drawn_differently(variants, world):
    _, manifests = variants
    for kind, manifest in manifests.items():
        for rec in records(manifest):
            path = manifest.parent / rec["image"]
            with Image.open(path) as im:
                assert im.format == ("JPEG" if kind == "jpeg" else "PNG")
                image = np.asarray(im.convert("RGB")).astype(int)
            plain = np.asarray(render_scene(scene_of(rec))).astype(int)
            diff = np.abs(image - plain)
            palette = [*COLORS.values(), tuple(rec["background"])]
            exact = np.any([np.all(image == c, axis=-1) for c in palette], axis=0)
            if kind == "sizes":  # drawn as the generator draws; only the sizes are new
                assert diff.max() == 0
                continue
            # The same scene (small mean difference) but not the same pixels; edges blend (off-palette pixels).
            assert 0 < diff.mean() < 8 and not exact.all(), (kind, rec["image"])
            if kind == "jpeg":
                assert 40 <= rec["variant"]["quality"] <= 85
            else:
                v = rec["variant"]
                assert v["supersample"] == 4 and v["resample"] in ("box", "lanczos")
                assert all(0.25 <= abs(d) <= 0.75 for shift in v["shift_px"] for d in shift)
    aa = [r["variant"]["resample"] for r in records(manifests["antialias"])]
    assert {"box", "lanczos"} <= set(aa)
    # Sizes: exact 1:1 (64x64 and 256x256 among them), exact 4:1 and 1:4, sizes off the generator's buckets.
    sizes = [(r["width"], r["height"]) for r in records(manifests["sizes"])]
    assert (256, 64) in sizes and (64, 256) in sizes
    assert {(64, 64), (256, 256)} & set(sizes) and sum(w == h for w, h in sizes) >= NV // 8 * 2
    off_bucket = 0
    for i, (w, h) in enumerate(sizes):
        low = 1 + 0.75 * (i % 4)  # the generator's bucket i % 8: orientation and ratio range
        landscape = i % 8 < 4
        ratio = max(w, h) / min(w, h)
        off_bucket += (w >= h) != landscape or not (low - 0.02 <= ratio <= low + 0.77)
    assert off_bucket >= NV // 4
    # Object sides near the ends of their size word's range (lowest or highest fifth, up to whole px).
    for rec in records(manifests["sizes"]):
        short = min(rec["width"], rec["height"])
        for o in rec["objects"]:
            lo, hi = (0.15, 0.25) if o["size"] == "small" else (0.35, 0.50)
            pos = ((o["bbox"][2] - o["bbox"][0]) - lo * short) / ((hi - lo) * short)
            assert pos <= 0.3 or pos >= 0.7, (rec["image"], o, pos)
    # New scenes: not those of the world's splits.
    _, splits = world
    split_objects = [r["objects"] for m in splits.values() for r in records(m)]
    for manifest in manifests.values():
        assert not any(r["objects"] in split_objects for r in records(manifest))


def test_variants_deterministic_and_arguments(variants, tmp_path):
    out, manifests = variants
    for kind, manifest in manifests.items():
        again = synth_shapes_variants(tmp_path, n=6, seed=0, kind=kind)
        assert again.read_text().splitlines() == manifest.read_text().splitlines()[:6]
        for rec in records(again):
            assert (again.parent / rec["image"]).read_bytes() == (manifest.parent / rec["image"]).read_bytes()
        other = synth_shapes_variants(tmp_path / "b", n=6, seed=1, kind=kind)
        assert other.read_text() != again.read_text()
    # A smaller run removes the larger run's extra files.
    synth_shapes_variants(tmp_path, n=2, seed=0, kind="jpeg")
    assert sorted(p.name for p in (tmp_path / "shapes" / "variants_jpeg").iterdir()) == [
        "000000.jpg",
        "000001.jpg",
    ]
    with pytest.raises(ValueError, match="unknown variant kind 'blur'"):
        synth_shapes_variants(tmp_path, n=1, kind="blur")
    with pytest.raises(ValueError, match="n must be at least 1"):
        synth_shapes_variants(tmp_path, n=0, kind="sizes")
