"""Video data: uniform frame sampling equals decord's frames at the expected indices, short clips repeat frames,
bad files are skipped and counted with their path, shards and manifests read the same clips, and the
moving-shapes world keeps its promises (held-out pairs, directions, sizes, reproducible bytes)."""

import io
import json
import logging
import time

import decord
import numpy as np
import pytest
from PIL import Image

from mm.datasets.media import MediaTextDataset, iter_webdataset
from mm.datasets.skips import BadSample, TooManyBadSamples
from mm.datasets.tiling import TileTransform
from mm.datasets.video import decode_clip, sample_frame_indices, tile_clip, video_decoder
from mm.world import DIRECTIONS, HELDOUT_PAIRS, encode_mp4, motion_clip, synth_motion


def numbered_clip(n: int, side: int = 32) -> bytes:
    """A clip whose frame k shows a bar at column 2k mod side (so a frame's content names its index)."""
    frames = []
    for k in range(n):
        a = np.full((side, side, 3), 230, np.uint8)
        a[:, (2 * k) % side : (2 * k) % side + 2] = (20, 20, 200)
        frames.append(Image.fromarray(a))
    return encode_mp4(frames)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    return {
        "root": root,
        "train": synth_motion(root, n=12, seed=0, split="train", shard_size=5),
        "pairs": synth_motion(root, n=6, seed=0, split="heldout_pairs"),
    }


def test_uniform_indices_are_span_centres_and_short_clips_repeat():
    assert sample_frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_frame_indices(10, 4) == [1, 3, 6, 8]
    assert sample_frame_indices(5, 16) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


@pytest.mark.parametrize("n_total,n_frames", [(12, 5), (13, 8), (5, 16)])
def test_decoded_frames_are_decords_frames_at_the_sampled_indices(tmp_path, n_total, n_frames):
    path = tmp_path / "clip.mp4"
    path.write_bytes(numbered_clip(n_total))
    frames, info = decode_clip(path, n_frames)
    want = sample_frame_indices(n_total, n_frames)
    assert info["indices"] == want and info["n_source_frames"] == n_total and not info["variable_frame_rate"]
    assert frames.shape == (n_frames, 32, 32, 3) and frames.dtype == np.uint8
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    for k, i in enumerate(want):  # decord's own frame i, decoded on its own
        np.testing.assert_array_equal(frames[k], reader[i].asnumpy())
    # The same from bytes (shards) and through the image transform: one tiling per frame.
    frames_b, _ = decode_clip(path.read_bytes(), n_frames)
    np.testing.assert_array_equal(frames_b, frames)
    tiled = tile_clip(frames, TileTransform(16, 4))
    assert tiled["frames"].shape == (n_frames, 4, 3, 16, 16) and tiled["aspect_ratio"] == (2, 2)


def test_a_width_decord_cannot_copy_is_decoded_by_the_fallback(tmp_path):
    path = tmp_path / "w72.mp4"
    path.write_bytes(encode_mp4([Image.new("RGB", (72, 64), (10 * k, 100, 50)) for k in range(6)]))
    frames, info = decode_clip(path, 3)
    assert frames.shape == (3, 64, 72, 3) and info["indices"] == [1, 3, 5]
    assert abs(int(frames[2, 10, 10, 0]) - 50) <= 3  # frame 5's red channel


def zero_frame_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        c.start_encoding()  # header and an empty track, no frame
    data = buf.getvalue()
    assert data
    return data


def test_bad_videos_are_skipped_counted_and_logged_with_their_path(tmp_path, caplog, faults):
    good = numbered_clip(9)
    files = {
        "good1.mp4": good,
        "empty.mp4": b"",
        "text.mp4": b"this is not a video at all\n" * 40,
        "truncated.mp4": good[: len(good) // 2],
        "noframes.mp4": zero_frame_mp4(),
        "good2.mp4": good,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    lines = [json.dumps({"video": name, "text": "a red circle moves left"}) for name in files]
    lines.append(json.dumps({"video": "gone.mp4", "text": "x"}))  # missing: dropped at construction
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    ds = MediaTextDataset(manifest, video_decoder(TileTransform(16, 1), n_frames=4), max_bad_fraction=1.0)
    assert len(ds) == 6 and ds.missing == [str(tmp_path / "gone.mp4")]
    with caplog.at_level(logging.WARNING):
        loaded = [ds.load(i) for i in range(len(ds))]
    assert [s is not None for s in loaded] == [True, False, False, False, False, True]
    assert loaded[0]["frames"].shape == (4, 1, 3, 16, 16) and loaded[0]["frame_indices"] == [1, 3, 5, 7]
    stats = ds.stats.as_dict()
    assert stats["tried"] == 6 and stats["skipped"] == 4
    assert stats["skipped_by_reason"]["empty"] == 1
    assert sum(stats["skipped_by_reason"].values()) == 4
    for name in ("empty.mp4", "text.mp4", "truncated.mp4", "noframes.mp4"):
        assert str(tmp_path / name) in caplog.text
    assert ds.load(1) is None and ds.stats.tried == 6  # a known bad entry is not decoded or counted again
    assert ds[1]["source"] == str(tmp_path / "good2.mp4")  # ds[i] moves on to the next usable clip
    # Too many bad clips stop the run with a clear error.
    strict = MediaTextDataset(
        manifest, video_decoder(TileTransform(16, 1), n_frames=4), max_bad_fraction=0.2, min_tried=4
    )
    with pytest.raises(TooManyBadSamples, match="skipped"):
        for i in range(len(strict)):
            strict.load(i)
    for data in (b"", b"garbage" * 10, zero_frame_mp4()):
        with pytest.raises(BadSample):
            decode_clip(data, 4)
    faults.record(
        "corrupt",
        stats["skipped"] + len(ds.missing),
        what="mp4 (empty, not video, truncated, zero-frame, missing)",
    )


def test_shards_and_manifest_hold_the_same_clips(world):
    transform = TileTransform(16, 4)
    ds = MediaTextDataset(world["train"], video_decoder(transform, n_frames=8))
    shards = sorted((world["root"] / "motion").glob("train-*.tar"))
    assert len(shards) == 3
    samples = list(iter_webdataset(shards, video_decoder(transform, n_frames=8)))
    assert len(samples) == 12
    for i, s in enumerate(samples):
        m = ds.load(i)
        assert s["text"] == m["text"] and s["meta"]["index"] == i
        assert s["frames"].shape == m["frames"].shape and (s["frames"] == m["frames"]).all()


def test_motion_world_splits_directions_and_bytes(world, tmp_path):
    train = [json.loads(x) for x in world["train"].read_text().splitlines()]
    pairs = [json.loads(x) for x in world["pairs"].read_text().splitlines()]
    assert not any((r["color"], r["shape"]) in HELDOUT_PAIRS for r in train)
    assert all((r["color"], r["shape"]) in HELDOUT_PAIRS for r in pairs)
    assert [r["direction"] for r in train[:4]] == list(DIRECTIONS)
    for r in train:
        assert 8 <= r["n_frames"] <= 16 and 64 <= r["side"] <= 128 and r["fps"] == 8
        assert 0.2 * r["side"] - 1 <= r["object_side"] <= 0.3 * r["side"] + 1
        assert (
            r["text"]
            == f"{'an' if r['color'] == 'orange' else 'a'} {r['color']} {r['shape']} moves {r['direction']}"
        )
        reader = decord.VideoReader(str(world["train"].parent / r["video"]))
        assert len(reader) == r["n_frames"] and reader[0].shape == (r["side"], r["side"], 3)
        dx, dy = r["end"][0] - r["start"][0], r["end"][1] - r["start"][1]
        want = {"left": dx < 0 == dy, "right": dx > 0 == dy, "up": dy < 0 == dx, "down": dy > 0 == dx}
        assert want[r["direction"]], r
    # The colour survives H.264: the object's centre pixel in the last frame is close to its RGB.
    clip = motion_clip(__import__("random").Random(3), ("red", "square"), "up")
    frames, _ = decode_clip(encode_mp4(clip.frames()), clip.n_frames)
    x0, y0, x1, y1 = clip.box(clip.n_frames - 1)
    assert np.abs(frames[-1, (y0 + y1) // 2, (x0 + x1) // 2].astype(int) - (220, 30, 30)).max() < 25
    # Clip i does not depend on n. (Bytes are reproducible from a fresh process; once decord's own FFmpeg is
    # loaded, libx264 may pick other code paths, so here the decoded pixels are compared.)
    again = synth_motion(tmp_path, n=3, seed=0, split="train")
    assert again.read_text().splitlines() == world["train"].read_text().splitlines()[:3]
    for k in range(3):
        name = f"train/{k:06d}.mp4"
        a, _ = decode_clip(again.parent / name, 8)
        b, _ = decode_clip(world["train"].parent / name, 8)
        assert np.abs(a.astype(int) - b).max() <= 8


@pytest.mark.slow
def test_a_10000_frame_clip_is_sampled_without_decoding_every_frame(tmp_path):
    # Noise frames (costly to decode) scrolling by one column per frame; a key frame every 25 frames.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    frames = [Image.fromarray(np.roll(noise, k, axis=1)) for k in range(10_000)]
    path = tmp_path / "long.mp4"
    path.write_bytes(encode_mp4(frames, gop=25))
    t0 = time.perf_counter()
    out, info = decode_clip(path, 8)
    sampled = time.perf_counter() - t0
    assert info["n_source_frames"] == 10_000 and info["indices"] == sample_frame_indices(10_000, 8)
    assert out.shape == (8, 64, 64, 3)
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    t0 = time.perf_counter()
    for _ in range(len(reader)):
        reader.next()
    full = time.perf_counter() - t0
    assert sampled < 0.3 * full, (sampled, full)


@pytest.mark.parametrize("bug", [TypeError, AttributeError])
def test_a_bug_in_the_frame_transform_propagates_and_is_not_counted_as_bad_data(tmp_path, bug):
    """A decoded clip's frames are valid RGB: an error of the transform is our bug and stops the reader, it is
    never skipped and counted as a bad clip."""
    (tmp_path / "a.mp4").write_bytes(numbered_clip(9))
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"video": "a.mp4", "text": "a red circle moves left"}) + "\n"
    )

    def buggy(image):
        raise bug("a bug in our transform")

    ds = MediaTextDataset(tmp_path / "m.jsonl", video_decoder(buggy, n_frames=4), max_bad_fraction=1.0)
    with pytest.raises(bug, match="a bug in our transform"):
        ds.load(0)
    assert ds.stats.tried == 0 and not ds.stats.skipped
    frames, _ = decode_clip(tmp_path / "a.mp4", 4)
    with pytest.raises(bug, match="a bug in our transform"):
        tile_clip(frames, buggy)
    # The same clip with the real transform is read: the failure above was the transform's alone.
    assert (
        MediaTextDataset(tmp_path / "m.jsonl", video_decoder(TileTransform(16, 1), n_frames=4)).load(0)
        is not None
    )
