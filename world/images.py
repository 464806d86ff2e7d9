"""The shapes world's images: scenes of one or two objects on a plain background, drawn with PIL.

`synth_shapes` writes the splits `train` and `heldout` (new images of training pairs only; the main figure) and
`heldout_pairs` (every image holds at least one held-out pair) as PNGs, a JSONL manifest and WebDataset tar
shards (`mm.datasets.images` reads both).
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .files import split_count, write_split
from .grammar import COLOR_SHAPE_PAIRS, COLORS, HELDOUT_PAIRS, SIZES, TRAIN_PAIRS, caption

__all__ = [
    "DEFAULT_IMAGE_COUNTS",
    "IMAGE_SIDE",
    "IMAGE_SPLITS",
    "OBJECT_SIDE",
    "Scene",
    "SceneObject",
    "draw_object",
    "placed_scene",
    "random_scene",
    "render_scene",
    "synth_shapes",
]

IMAGE_SPLITS: tuple[str, ...] = ("train", "heldout", "heldout_pairs")
# Default image counts per split for the demo.
DEFAULT_IMAGE_COUNTS: dict[str, int] = {"train": 4000, "heldout": 200, "heldout_pairs": 200}
# Image sides (px), object sides as fractions of the shorter image side, per size word.
IMAGE_SIDE = (64, 256)
OBJECT_SIDE: dict[str, tuple[float, float]] = {"small": (0.15, 0.25), "large": (0.35, 0.50)}
_GAP = 2  # px between two objects' boxes (along x or y)
_MAX_PLACEMENT_TRIES = 2000


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its words and its box (left, top, right, bottom) in px, right/bottom exclusive."""

    size: str
    color: str
    shape: str
    bbox: tuple[int, int, int, int]

    @property
    def center_x(self) -> float:
        """Centre x in px."""
        return (self.bbox[0] + self.bbox[2]) / 2

    def as_dict(self) -> dict:
        """JSON form: size, color, shape, bbox."""
        return {"size": self.size, "color": self.color, "shape": self.shape, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Scene:
    """One image of the world: its size, background colour and objects (left to right by centre x)."""

    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    @property
    def caption(self) -> str:
        """The caption, e.g. "a large red circle and a small blue square"."""
        return caption([(o.size, o.color, o.shape) for o in self.objects])

    def as_dict(self) -> dict:
        """JSON form: text (the caption), width, height, background, objects."""
        return {
            "text": self.caption,
            "width": self.width,
            "height": self.height,
            "background": list(self.background),
            "objects": [o.as_dict() for o in self.objects],
        }


def _image_size(rng: random.Random, bucket: int) -> tuple[int, int]:
    """(width, height): bucket 0-3 landscape, 4-7 portrait, aspect ratio in [1, 1.75), ..., [3.25, 4]."""
    lo_side, hi_side = IMAGE_SIDE
    low = 1 + 0.75 * (bucket % 4)
    ratio = rng.uniform(low, low + 0.75)
    long = rng.randint(min(math.ceil(lo_side * ratio), hi_side), hi_side)
    short = min(max(round(long / ratio), lo_side), hi_side)
    return (long, short) if bucket < 4 else (short, long)


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True if two boxes do not touch (a gap along x or y) and their centres are well apart in x."""
    apart = a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]
    dx = abs((a[0] + a[2]) - (b[0] + b[2])) / 2
    min_dx = max(4.0, ((a[2] - a[0]) + (b[2] - b[0])) / 4)  # a quarter of the two sides' sum
    return apart and dx >= min_dx


def random_scene(
    rng: random.Random, bucket: int, pairs: Sequence[tuple[str, str]], forced: tuple[str, str] | None = None
) -> Scene:
    """Draw a scene: size from aspect-ratio `bucket` (0-7), 1-2 objects of `pairs` (one is `forced` if given)."""
    width, height = _image_size(rng, bucket)
    background = (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))
    n_objects = rng.choice((1, 2))
    chosen = [rng.choice(pairs) for _ in range(n_objects)]
    if forced is not None:
        chosen[rng.randrange(n_objects)] = forced
    sizes = [rng.choice(SIZES) for _ in range(n_objects)]

    def side(size: str, short: int) -> int:  # anywhere within the size word's range
        return max(2, round(rng.uniform(*OBJECT_SIDE[size]) * short))

    return placed_scene(rng, width, height, background, chosen, sizes, side)


def placed_scene(
    rng: random.Random,
    width: int,
    height: int,
    background: tuple[int, int, int],
    chosen: Sequence[tuple[str, str]],
    sizes: Sequence[str],
    side: Callable[[str, int], int],
) -> Scene:
    """Place the objects (sides from `side(size, shorter image side)`) apart from each other, left to right."""
    n_objects = len(chosen)
    short = min(width, height)
    for attempt in range(_MAX_PLACEMENT_TRIES):
        if attempt % 50 == 0:  # (re)draw the sides: two large objects may not fit at the first sides drawn
            sides = [side(size, short) for size in sizes]
        boxes = []
        for s in sides:
            x0, y0 = rng.randint(0, width - s), rng.randint(0, height - s)
            boxes.append((x0, y0, x0 + s, y0 + s))
        if n_objects == 1 or _separated(boxes[0], boxes[1]):
            break
    else:
        raise RuntimeError(f"could not place {n_objects} objects in a {width}x{height} image")
    objects = [SceneObject(sz, c, sh, box) for sz, (c, sh), box in zip(sizes, chosen, boxes)]
    objects.sort(key=lambda o: o.center_x)
    return Scene(width, height, background, tuple(objects))


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene with PIL (no anti-aliasing): plain background, filled circle/square/triangle."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj.color, obj.shape, obj.bbox)
    return image


def draw_object(draw: ImageDraw.ImageDraw, color: str, shape: str, bbox: tuple[int, int, int, int]) -> None:
    """Fill one circle/square/triangle into its box (left, top, right, bottom), right/bottom exclusive."""
    x0, y0, x1, y1 = bbox
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # triangle: apex at the top centre, base along the bottom edge
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)


def _scene_for(seed: int, split: str, i: int) -> Scene:
    """Image i of a split: its own RNG, so the first k images do not depend on n."""
    rng = random.Random(f"mm.shapes.images/{split}/{seed}/{i}")
    if split == "heldout_pairs":
        return random_scene(rng, i % 8, COLOR_SHAPE_PAIRS, forced=HELDOUT_PAIRS[i % len(HELDOUT_PAIRS)])
    return random_scene(rng, i % 8, TRAIN_PAIRS)


def synth_shapes(
    out_dir: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    shard_size: int = 1000,
) -> Path:
    """Write n images of the world; return the manifest `out_dir/shapes/{split}.jsonl`.

    Also writes `out_dir/shapes/{split}/{i:06d}.png` and WebDataset shards `out_dir/shapes/{split}-{k:05d}.tar`
    (`{i:06d}.png`, `.txt` caption, `.json` with `text` and the metadata; `shard_size` samples each). Each
    manifest line: `image` (relative to the manifest's folder), `text` (the caption), `width`, `height`,
    `background`, `objects` (size, color, shape, bbox, left to right). Image i uses aspect-ratio bucket i % 8
    (ratios 1:1 to 4:1, landscape then portrait). `train` and `heldout` use training pairs only; in
    `heldout_pairs` image i holds `HELDOUT_PAIRS[i % 3]` (plus maybe one object of any pair). The same
    (n, seed, split) gives identical bytes; files of an earlier, larger run of the split are removed.
    `n` defaults to `DEFAULT_IMAGE_COUNTS[split]`.
    """
    n = split_count(split, n, shard_size, DEFAULT_IMAGE_COUNTS)

    def sample(i: int) -> tuple[bytes, dict]:
        """Image i: PNG bytes and metadata."""
        scene = _scene_for(seed, split, i)
        buf = io.BytesIO()
        render_scene(scene).save(buf, format="PNG")
        return buf.getvalue(), scene.as_dict()

    return write_split(Path(out_dir) / "shapes", split, n, shard_size, ("image", "png"), sample)
