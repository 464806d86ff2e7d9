"""Robustness variants of the shapes world's images: the world's scenes, drawn in ways the training images
never are (JPEG, anti-aliased, sizes off the aspect-ratio buckets)."""

from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

from PIL import Image

from .files import remove_stale, write_lines
from .grammar import SIZES, TRAIN_PAIRS, check_word
from .images import IMAGE_SIDE, OBJECT_SIDE, Scene, SceneObject, placed_scene, random_scene, render_scene

__all__ = ["DEFAULT_VARIANT_COUNT", "VARIANT_KINDS", "synth_shapes_variants"]

# Kinds of `synth_shapes_variants`: the world's scenes, drawn in ways the training images never are.
VARIANT_KINDS: tuple[str, ...] = ("jpeg", "antialias", "sizes")
DEFAULT_VARIANT_COUNT = 100
_JPEG_QUALITY = (40, 85)
_SUPERSAMPLE = 4  # "antialias": drawn at 4x the size, then downsampled
_RESAMPLE: dict[str, Image.Resampling] = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_EDGE_FRACTION = 0.2  # "sizes": object sides lie in the lowest or highest fifth of their size word's range


def _variant_size(rng: random.Random, i: int) -> tuple[int, int]:
    """(width, height) of "sizes" image i: exact 1:1, exact 4:1 and 1:4, or both sides drawn independently."""
    lo, hi = IMAGE_SIDE
    case = i % 8
    if case == 0:  # a square of any side
        side = rng.randint(lo, hi)
        return side, side
    if case == 1:  # the smallest or the largest square
        side = rng.choice((lo, hi))
        return side, side
    if case == 2:  # exactly 4:1
        return hi, lo
    if case == 3:  # exactly 1:4
        return lo, hi
    # Each side uniform in 64..256, whatever the other (any such pair is within 4:1), with no bucket layout.
    return rng.randint(lo, hi), rng.randint(lo, hi)


def _edge_side(rng: random.Random, size: str, short: int) -> int:
    """An object side (px) near the low or the high end of the size word's range of `short` (inside it)."""
    lo, hi = OBJECT_SIDE[size]
    a, b = math.ceil(lo * short - 1e-9), math.floor(hi * short + 1e-9)
    span = max(1, int((b - a) * _EDGE_FRACTION))
    return rng.randint(a, a + span) if rng.random() < 0.5 else rng.randint(b - span, b)


def _edge_scene(rng: random.Random, width: int, height: int) -> Scene:
    """A scene of training pairs at a given size, with object sides near the ends of their ranges."""
    background = (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))
    n_objects = rng.choice((1, 2))
    chosen = [rng.choice(TRAIN_PAIRS) for _ in range(n_objects)]
    sizes = [rng.choice(SIZES) for _ in range(n_objects)]
    return placed_scene(
        rng, width, height, background, chosen, sizes, lambda size, short: _edge_side(rng, size, short)
    )


def _variant_image(seed: int, kind: str, i: int) -> tuple[Scene, bytes, str, dict]:
    """Image i of a variant kind: (scene, encoded file, extension, how it was drawn), from its own RNG."""
    rng = random.Random(f"mm.shapes.variants/{kind}/{seed}/{i}")  # not the splits' streams: new images
    buf = io.BytesIO()
    if kind == "sizes":
        scene = _edge_scene(rng, *_variant_size(rng, i))
        render_scene(scene).save(buf, format="PNG")
        return scene, buf.getvalue(), "png", {"kind": kind}
    scene = random_scene(rng, i % 8, TRAIN_PAIRS)
    if kind == "jpeg":
        quality = rng.randint(*_JPEG_QUALITY)
        render_scene(scene).save(buf, format="JPEG", quality=quality)
        return scene, buf.getvalue(), "jpg", {"kind": kind, "quality": quality}
    resample = rng.choice(sorted(_RESAMPLE))
    k = _SUPERSAMPLE
    big, shifts = [], []
    for o in scene.objects:
        # A shift of 1/4 to 3/4 px (inwards at the image's edges): square edges fall inside pixels too.
        dx, dy = (_subpixel_shift(rng, k, lo, hi, side) for lo, hi, side in _box_axes(o.bbox, scene))
        x0, y0, x1, y1 = (v * k for v in o.bbox)
        big.append(SceneObject(o.size, o.color, o.shape, (x0 + dx, y0 + dy, x1 + dx, y1 + dy)))
        shifts.append([dx / k, dy / k])
    image = render_scene(Scene(scene.width * k, scene.height * k, scene.background, tuple(big)))
    image = image.resize((scene.width, scene.height), _RESAMPLE[resample])
    image.save(buf, format="PNG")
    variant = {"kind": kind, "supersample": k, "resample": resample, "shift_px": shifts}
    return scene, buf.getvalue(), "png", variant


def _box_axes(bbox: tuple[int, int, int, int], scene: Scene) -> tuple[tuple[int, int, int], ...]:
    """(low edge, high edge, image side) of a box along x and along y."""
    return (bbox[0], bbox[2], scene.width), (bbox[1], bbox[3], scene.height)


def _subpixel_shift(rng: random.Random, k: int, lo: int, hi: int, side: int) -> int:
    """A shift in 1/k px of a box edge pair [lo, hi) in [0, side): 1/4-3/4 px, never out of the image."""
    step = rng.randint(1, k - 1)
    if lo == 0:
        return step
    if hi == side:
        return -step
    return step if rng.random() < 0.5 else -step


def synth_shapes_variants(
    out_dir: str | os.PathLike[str], n: int | None = None, seed: int = 0, kind: str = "jpeg"
) -> Path:
    """Write n images of a robustness variant; return the manifest `out_dir/shapes/variants_{kind}.jsonl`.

    The scenes are the world's (training colour-shape pairs only, one or two objects, every colour, shape and
    size word, objects within their size ranges, captions from `caption()`), drawn from their own RNG stream
    (new images, not those of any split), but shown in a way the training images never are:

    - "jpeg": `render_scene` saved as JPEG at quality 40-85 (`{i:06d}.jpg`);
    - "antialias": drawn at 4x the size and downsampled with a LANCZOS or BOX filter, so object edges blend
      into the background (`render_scene` draws without anti-aliasing);
    - "sizes": image sizes off the generator's aspect-ratio buckets (exact 1:1, 64x64 and 256x256, exact 4:1
      and 1:4, otherwise width and height each uniform in 64-256) and object sides in the lowest or highest
      fifth of their size word's range.

    Images go to `out_dir/shapes/variants_{kind}/{i:06d}.png|jpg`; manifest lines are those of
    `synth_shapes` (`image`, `text`, `width`, `height`, `background`, `objects`) plus `variant` (the kind and
    its drawing parameters). The same (n, seed, kind) gives identical bytes; files of an earlier, larger run
    are removed. `n` defaults to `DEFAULT_VARIANT_COUNT`.
    """
    check_word(kind, VARIANT_KINDS, "variant kind")
    if n is None:
        n = DEFAULT_VARIANT_COUNT
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    root = Path(out_dir) / "shapes"
    folder = f"variants_{kind}"
    image_dir = root / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(image_dir, r"(\d+)\.(?:png|jpg)", n)
    lines = []
    for i in range(n):
        scene, data, ext, variant = _variant_image(seed, kind, i)
        name = f"{i:06d}.{ext}"
        (image_dir / name).write_bytes(data)
        lines.append(json.dumps({"image": f"{folder}/{name}", **scene.as_dict(), "variant": variant}))
    manifest = root / f"{folder}.jsonl"
    write_lines(manifest, lines)
    return manifest
