"""Training sample streams: a resumed stream yields exactly the samples an uninterrupted one does (manifest
and shards, across epoch boundaries); bad files are skipped, not repeated."""

import pytest

from mm.datasets.images import image_decoder
from mm.datasets.streams import ManifestStream, ShardStream, open_stream
from mm.datasets.tiling import TileTransform
from mm.world import synth_shapes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    manifest = synth_shapes(root, n=10, seed=0, split="train", shard_size=4)  # 3 shards: 4 + 4 + 2
    return {"manifest": manifest, "shards": sorted((root / "shapes").glob("train-*.tar"))}


def texts(stream, n):
    return [stream.next()["text"] for _ in range(n)]


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_resumed_stream_continues_exactly(world, kind):
    tf = TileTransform(32, 2)
    paths = [str(world["manifest"])] if kind == "manifest" else [str(p) for p in world["shards"]]
    full = open_stream(paths, image_decoder(tf), seed=3)
    assert isinstance(full, ManifestStream if kind == "manifest" else ShardStream)
    ref = texts(full, 27)  # crosses two epoch boundaries
    a = open_stream(paths, image_decoder(tf), seed=3)
    first = texts(a, 13)
    state = a.state_dict()
    b = open_stream(paths, image_decoder(tf), seed=3)
    b.load_state_dict(state)
    assert first + texts(b, 14) == ref
    assert sorted(ref[:10]) == sorted(ref[10:20])  # every epoch visits every sample once
    assert ref[:10] != ref[10:20]  # in a new order


def test_bad_file_is_skipped_once(world, tmp_path):
    import json

    lines = world["manifest"].read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for r in rows:
        r["image"] = str(world["manifest"].parent / r["image"])
    rows[0]["image"] = str(bad)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = open_stream([str(m)], image_decoder(TileTransform(32, 2)), seed=0, max_bad_fraction=0.5)
    got = texts(s, 27)
    assert len(got) == 27 and s.stats()["skipped"] == 1


def test_open_stream_rejects_mixed_inputs(world):
    with pytest.raises(ValueError, match="one JSONL manifest, or WebDataset shards"):
        open_stream([str(world["manifest"]), str(world["shards"][0])], image_decoder(TileTransform(32, 2)))
    with pytest.raises(ValueError, match="no training data"):
        open_stream([], image_decoder(TileTransform(32, 2)))


def test_cached_stream_decodes_each_sample_once_and_yields_the_same(world):
    tf = TileTransform(32, 2)
    plain = open_stream([str(world["manifest"])], image_decoder(tf), seed=5)
    cached = open_stream([str(world["manifest"])], image_decoder(tf), seed=5, cache=True)
    calls = {"n": 0}
    real = cached.dataset.load

    def counting(i):
        calls["n"] += 1
        return real(i)

    cached.dataset.load = counting
    for _ in range(25):
        a, b = plain.next(), cached.next()
        assert a["text"] == b["text"] and (a["tiles"] == b["tiles"]).all()
    assert calls["n"] == 10  # ten entries, decoded once each over 2.5 epochs
