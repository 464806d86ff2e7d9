"""The shapes world's videos: one object moving in a straight line left, right, up or down.

`synth_motion` writes H.264 mp4 clips with the image splits (`IMAGE_SPLITS`), a JSONL manifest and WebDataset
shards (`mm.datasets.video` reads both).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .files import split_count, write_split
from .grammar import DIRECTIONS, HELDOUT_PAIRS, TRAIN_PAIRS, check_word, motion_caption
from .images import draw_object

__all__ = ["DEFAULT_MOTION_COUNTS", "MOTION_FPS", "MotionClip", "encode_mp4", "motion_clip", "synth_motion"]

# Default clip counts per split for the demo.
DEFAULT_MOTION_COUNTS: dict[str, int] = {"train": 2000, "heldout": 200, "heldout_pairs": 120}
MOTION_FPS = 8
_MOTION_FRAMES = (8, 16)  # frames per clip
_MOTION_SIDE = (64, 128)  # square frame side in px (even: H.264 4:2:0 needs even sides)
_MOTION_OBJECT = (0.20, 0.30)  # object side / frame side
_MOTION_TRAVEL = (0.4, 1.0)  # distance travelled / the most the frame allows


@dataclass(frozen=True)
class MotionClip:
    """One clip of the world: frame side, background, object, its straight path and the frame count."""

    side: int
    n_frames: int
    background: tuple[int, int, int]
    color: str
    shape: str
    direction: str
    object_side: int
    start: tuple[int, int]  # top-left corner of the object's box in the first frame
    end: tuple[int, int]  # ... and in the last frame

    @property
    def caption(self) -> str:
        """The caption, e.g. "a red circle moves left"."""
        return motion_caption(self.color, self.shape, self.direction)

    def box(self, k: int) -> tuple[int, int, int, int]:
        """The object's box in frame k (linear interpolation from start to end, rounded to px)."""
        t = k / max(1, self.n_frames - 1)
        x = round(self.start[0] + (self.end[0] - self.start[0]) * t)
        y = round(self.start[1] + (self.end[1] - self.start[1]) * t)
        return (x, y, x + self.object_side, y + self.object_side)

    def frames(self) -> list[Image.Image]:
        """The clip's frames as RGB images."""
        out = []
        for k in range(self.n_frames):
            image = Image.new("RGB", (self.side, self.side), self.background)
            draw_object(ImageDraw.Draw(image), self.color, self.shape, self.box(k))
            out.append(image)
        return out

    def as_dict(self) -> dict:
        """JSON form of the clip's parameters."""
        return {
            "text": self.caption,
            "color": self.color,
            "shape": self.shape,
            "direction": self.direction,
            "side": self.side,
            "n_frames": self.n_frames,
            "fps": MOTION_FPS,
            "background": list(self.background),
            "object_side": self.object_side,
            "start": list(self.start),
            "end": list(self.end),
        }


def motion_clip(rng: random.Random, pair: tuple[str, str], direction: str) -> MotionClip:
    """Draw a clip of (colour, shape) moving in `direction`: size, path and length from `rng`."""
    check_word(direction, DIRECTIONS, "direction")
    side = 2 * rng.randint(_MOTION_SIDE[0] // 2, _MOTION_SIDE[1] // 2)
    n_frames = rng.randint(*_MOTION_FRAMES)
    background = (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))
    obj = round(rng.uniform(*_MOTION_OBJECT) * side)
    room = side - obj  # the box's top-left coordinate lies in [0, room]
    travel = round(rng.uniform(*_MOTION_TRAVEL) * room)
    a = rng.randint(0, room - travel)  # along the motion axis: from a to a + travel (or back)
    b = rng.randint(0, room)  # across it: fixed
    first, last = (a, a + travel) if direction in ("right", "down") else (a + travel, a)
    if direction in ("left", "right"):
        start, end = (first, b), (last, b)
    else:
        start, end = (b, first), (b, last)
    return MotionClip(side, n_frames, background, pair[0], pair[1], direction, obj, start, end)


def _motion_for(seed: int, split: str, i: int) -> MotionClip:
    """Clip i of a split: its own RNG, so the first k clips do not depend on n."""
    rng = random.Random(f"mm.shapes.motion/{split}/{seed}/{i}")
    if split == "heldout_pairs":
        pair = HELDOUT_PAIRS[i % len(HELDOUT_PAIRS)]
    else:
        pair = rng.choice(TRAIN_PAIRS)
    return motion_clip(rng, pair, DIRECTIONS[i % len(DIRECTIONS)])


def encode_mp4(frames: Sequence[Image.Image], fps: int = MOTION_FPS, crf: int = 18, gop: int = 0) -> bytes:
    """Encode RGB frames of one even size as H.264 (libx264, yuv420p) in an mp4 container (PyAV).

    `gop` > 0 sets the key-frame interval (0: libx264's default, 250).
    """
    import av  # PyAV: FFmpeg with libx264

    if not frames:
        raise ValueError("encode_mp4 needs at least one frame")
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"H.264 4:2:0 needs even frame sides, got {width}x{height}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread: the same frames give the same bytes.
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        if gop > 0:
            stream.options = {**stream.options, "g": str(gop), "keyint_min": str(gop)}
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def synth_motion(
    out_dir: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    shard_size: int = 1000,
) -> Path:
    """Write n moving-object clips of the world; return the manifest `out_dir/motion/{split}.jsonl`.

    Each clip: 8-16 frames at 8 fps, square 64-128 px (even sides), plain light background, one object (side
    20-30% of the frame) moving in a straight line; H.264 mp4 at `out_dir/motion/{split}/{i:06d}.mp4`, plus
    WebDataset shards `out_dir/motion/{split}-{k:05d}.tar` (`.mp4`, `.txt` caption, `.json` with `text` and the
    clip's parameters). Manifest lines: `video` (relative to the manifest's folder), `text` (e.g. "a red
    circle moves left") and the parameters. Clip i moves `DIRECTIONS[i % 4]`; `train` and `heldout` draw
    training pairs only, in `heldout_pairs` clip i shows `HELDOUT_PAIRS[i % 3]`. Same (n, seed, split), same
    bytes (from a fresh process: with decord's FFmpeg loaded too, libx264 may differ in a few bits); files of
    an earlier, larger run of the split are removed. `n` defaults to `DEFAULT_MOTION_COUNTS[split]`.
    """
    n = split_count(split, n, shard_size, DEFAULT_MOTION_COUNTS)

    def sample(i: int) -> tuple[bytes, dict]:
        """Clip i: mp4 bytes and parameters."""
        clip = _motion_for(seed, split, i)
        return encode_mp4(clip.frames()), clip.as_dict()

    return write_split(Path(out_dir) / "motion", split, n, shard_size, ("video", "mp4"), sample)
