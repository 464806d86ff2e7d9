"""The shapes world: its vocabulary, caption wording, prompt formats and the LM text corpus.

The world (see `shared/design.md`, "The embedded default: the shapes world") has objects of a shape, a colour
and a size; images hold one or two of them, videos one moving object, speech clips speak sentences of the
world. The constants and helpers here are the single source of that vocabulary and of the exact wording of
captions, so the image, video and speech generators and the LM text corpus all agree.

Prompt formats (the text that precedes a stage's target; the LM text corpus contains lines in each format so
the frozen LM already knows them):

- `IMAGE_PROMPT` = "Caption: ", e.g. `Caption: a large red circle and a small blue square`.
- `VIDEO_PROMPT` = "Video: ", e.g. `Video: a red circle moves left`.
- `ASR_PROMPT` = "Repeat after me in English: " (the paper's ASR prompt), e.g.
  `Repeat after me in English: there is a small green triangle.`. The corpus also holds repeat lines
  (`COPY_FRACTION` of them): a sentence, then the prompt and the same sentence,
  `there is a small green triangle. Repeat after me in English: there is a small green triangle.`, which teach
  the LM to copy from its context. The speech stage relies on it: its rows are the speech embeddings (in the
  first sentence's place), then the prompt and the transcript.

Held-out colour-shape pairs (`HELDOUT_PAIRS`) never occur in image, video or speech training data but do occur
in the text corpus (compositional generalisation is measured on them).

Images (`synth_shapes`): splits `train` and `heldout` (new images of training pairs only; the main figure) and
`heldout_pairs` (every image holds at least one held-out pair), written as PNGs, a JSONL manifest and
WebDataset tar shards (`mm.datasets.images` reads both).

Videos (`synth_motion`): one object moving in a straight line left, right, up or down; H.264 mp4 clips with
the same splits, manifest and shard layout (`mm.datasets.video` reads both).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "ASR_PROMPT",
    "COLORS",
    "COLOR_SHAPE_PAIRS",
    "COPY_FRACTION",
    "DEFAULT_IMAGE_COUNTS",
    "DEFAULT_MOTION_COUNTS",
    "DEFAULT_TEXT_LINES",
    "DEFAULT_VARIANT_COUNT",
    "DIRECTIONS",
    "HELDOUT_PAIRS",
    "IMAGE_PROMPT",
    "IMAGE_SPLITS",
    "MOTION_FPS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TRAIN_PAIRS",
    "VARIANT_KINDS",
    "VIDEO_PROMPT",
    "MotionClip",
    "Scene",
    "SceneObject",
    "caption",
    "caption_attribute_report",
    "draw_object",
    "encode_mp4",
    "is_heldout",
    "motion_caption",
    "motion_clip",
    "object_phrase",
    "parse_caption",
    "random_scene",
    "random_sentence",
    "render_scene",
    "synth_motion",
    "synth_shapes",
    "synth_shapes_variants",
    "synth_text",
]

# Colour name -> RGB (design.md). Dict order is the canonical colour order.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# (colour, shape) pairs kept out of all image, video and speech training data; present in the text corpus.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("purple", "circle"),
    ("orange", "square"),
)

# All 18 (colour, shape) pairs in canonical order, and the 15 that training media may use.
COLOR_SHAPE_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in COLOR_SHAPE_PAIRS if p not in HELDOUT_PAIRS)

IMAGE_PROMPT = "Caption: "
VIDEO_PROMPT = "Video: "
ASR_PROMPT = "Repeat after me in English: "

# Share of corpus lines that repeat a sentence after `ASR_PROMPT` ("{sentence} Repeat after me in English:
# {sentence}"): without them the corpus never repeats anything within a line, so the LM never learns to copy
# from its context, and embeddings spliced into its input (the speech stage) cannot steer what it writes.
# Measured with the demo LM (configs/lm/tiny.yaml), repeating 200 held-out sentences given as text: 25% of the
# lines and 500 steps copy the form but not the words (WER 0.28, no sentence exact); 50% and 500 steps: WER 0.21;
# 50% and 1,500 steps: WER 0.00, every sentence exact (the copying mechanism forms between 1,000 and 1,500 steps).
COPY_FRACTION = 0.5

SPLITS: tuple[str, ...] = ("train", "heldout")
# Default corpus sizes (lines) for the demo: enough for a tiny LM to learn the grammar.
DEFAULT_TEXT_LINES: dict[str, int] = {"train": 20000, "heldout": 1000}

# Spatial relations used by the two-object sentence templates.
_RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    """Raise ValueError unless value is one of the allowed words."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _a(word: str) -> str:
    """The indefinite article for a word: "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def is_heldout(color: str, shape: str) -> bool:
    """True if (color, shape) is one of the held-out pairs."""
    return (color, shape) in HELDOUT_PAIRS


def object_phrase(size: str, color: str, shape: str) -> str:
    """Return the phrase for one object, e.g. "a large red circle"."""
    _check(size, SIZES, "size")
    _check(color, tuple(COLORS), "color")
    _check(shape, SHAPES, "shape")
    return f"a {size} {color} {shape}"


def caption(objects: Sequence[Sequence[str]]) -> str:
    """Caption for (size, color, shape) objects given left to right: "a large red circle and a small blue square"."""
    if not objects:
        raise ValueError("caption needs at least one object")
    phrases = []
    for obj in objects:
        if isinstance(obj, str) or len(obj) != 3:
            raise ValueError(f"each object must be a (size, color, shape) triple, got {obj!r}")
        phrases.append(object_phrase(*obj))
    return " and ".join(phrases)


def parse_caption(text: str) -> list[tuple[str, str, str]] | None:
    """(size, colour, shape) objects of an image caption, left to right; None if it is not one."""
    objects = []
    for phrase in text.strip().split(" and "):
        words = phrase.split()
        if len(words) != 4 or words[0] not in ("a", "an") or words[1] not in SIZES:
            return None
        if words[2] not in COLORS or words[3] not in SHAPES:
            return None
        objects.append((words[1], words[2], words[3]))
    return objects


def caption_attribute_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float | int]:
    """Exact match and per-attribute accuracy of image captions against the world's references.

    size / colour / shape: over every reference object, the predicted object in the same left-to-right slot
    has that word; count: the number of objects is right; order (two-object references whose predicted objects
    are the same two objects in either order): they are in the reference's left-to-right order.
    """
    counts = dict.fromkeys(("size", "color", "shape", "objects", "count", "order", "order_n", "parsed"), 0)
    for pred, ref in zip(preds, refs, strict=True):
        want = parse_caption(ref)
        if want is None:
            raise ValueError(f"reference caption {ref!r} is not a caption of the shapes world")
        got = parse_caption(pred) or []
        counts["parsed"] += int(bool(got))
        counts["count"] += int(len(got) == len(want))
        for i, obj in enumerate(want):
            counts["objects"] += 1
            for j, key in enumerate(("size", "color", "shape")):
                counts[key] += int(i < len(got) and got[i][j] == obj[j])
        if len(want) == 2 and len(got) == 2 and sorted(got) == sorted(want) and want[0] != want[1]:
            counts["order_n"] += 1
            counts["order"] += int(got == want)
    n, objs = max(1, len(refs)), max(1, counts["objects"])
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / n,
        "size_accuracy": counts["size"] / objs,
        "color_accuracy": counts["color"] / objs,
        "shape_accuracy": counts["shape"] / objs,
        "count_accuracy": counts["count"] / n,
        "order_accuracy": counts["order"] / max(1, counts["order_n"]),
        "order_n": counts["order_n"],
        "well_formed": counts["parsed"] / n,
        "n": len(refs),
    }


def motion_caption(color: str, shape: str, direction: str) -> str:
    """Caption of a video, e.g. "a red circle moves left" ("an orange ..." before a vowel)."""
    _check(color, tuple(COLORS), "color")
    _check(shape, SHAPES, "shape")
    _check(direction, DIRECTIONS, "direction")
    return f"{_a(color)} {color} {shape} moves {direction}"


def _pairs(allow_heldout: bool) -> tuple[tuple[str, str], ...]:
    """The colour-shape pairs a generator may draw from."""
    return COLOR_SHAPE_PAIRS if allow_heldout else TRAIN_PAIRS


def _random_object(rng: random.Random, allow_heldout: bool, pair: tuple[str, str] | None = None) -> tuple:
    """Draw a (size, color, shape) triple, optionally with a fixed (color, shape)."""
    color, shape = pair if pair is not None else rng.choice(_pairs(allow_heldout))
    return rng.choice(SIZES), color, shape


def random_sentence(
    rng: random.Random, *, allow_heldout: bool = True, pair: tuple[str, str] | None = None
) -> str:
    """A plain sentence of the world ("there is a small green triangle."); the speech transcripts use these.

    With `allow_heldout=False` no held-out pair is mentioned; `pair` forces the (first) object's colour-shape.
    """
    size, color, shape = _random_object(rng, allow_heldout, pair)
    kind = rng.randrange(7)
    if kind == 0:
        return f"there is {object_phrase(size, color, shape)}."
    if kind == 1:
        return f"the {shape} is {color}."
    if kind == 2:
        return f"the {size} {shape} is {color}."
    if kind == 3:
        return f"i see {object_phrase(size, color, shape)}."
    if kind == 4:
        return f"the {color} {shape} moves {rng.choice(DIRECTIONS)}."
    # Two objects: a spatial relation, or a list.
    _, color2, shape2 = _random_object(rng, allow_heldout)
    if kind == 5:
        return f"{_a(color)} {color} {shape} is {rng.choice(_RELATIONS)} {_a(color2)} {color2} {shape2}."
    return f"{caption([(size, color, shape), (rng.choice(SIZES), color2, shape2)])}."


def _random_line(rng: random.Random, pair: tuple[str, str] | None = None) -> str:
    """One line (document) of the text corpus: a repeat line, a line in one of the prompt formats, or a sentence."""
    if rng.random() < COPY_FRACTION:  # in-context copying: a sentence, the ASR prompt, the same sentence
        sentence = random_sentence(rng, pair=pair)
        return f"{sentence} {ASR_PROMPT}{sentence}"
    r = rng.random()
    if r < 0.35:  # image caption with the stage's prompt, one or two objects
        objects = [_random_object(rng, True, pair)]
        if rng.random() < 0.5:
            objects.append(_random_object(rng, True))
        text = caption(objects)
        return IMAGE_PROMPT + text if r < 0.30 else text
    if r < 0.55:  # video caption
        color, shape = pair if pair is not None else rng.choice(COLOR_SHAPE_PAIRS)
        text = motion_caption(color, shape, rng.choice(DIRECTIONS))
        return VIDEO_PROMPT + text if r < 0.50 else text
    sentence = random_sentence(rng, pair=pair)
    return ASR_PROMPT + sentence if r < 0.65 else sentence


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write lines atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_seed(seed: int, split: str) -> str:
    """Seed of a split's RNG: each split draws from its own stream of the same distribution."""
    return f"mm.shapes.text/{split}/{seed}"


def synth_text(
    out_dir: str | os.PathLike[str], n: int | None = None, seed: int = 0, split: str = "train"
) -> Path:
    """Write the LM text corpus to `out_dir/text/{split}.txt` (one document per line) and return its path.

    Lines are image captions (one or two objects, with or without `IMAGE_PROMPT`), video captions (with or
    without `VIDEO_PROMPT`), plain sentences (with or without `ASR_PROMPT`), and repeat lines (about
    `COPY_FRACTION` of them: `{sentence} {ASR_PROMPT}{sentence}`, the same sentence twice), drawn with
    `random.Random` seeded from (seed, split): the same (n, seed, split) gives identical bytes, and the
    heldout split is a fresh sample of the same distribution. The world is small, so many heldout lines also
    occur in train; it measures the LM's fit to the grammar, not novelty. When n >= 18, every colour-shape
    pair, held-out ones included, is mentioned at least once (for smaller n, the held-out pairs first).
    `n` defaults to `DEFAULT_TEXT_LINES[split]`.
    """
    _check(split, SPLITS, "split")
    if n is None:
        n = DEFAULT_TEXT_LINES[split]
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(_split_seed(seed, split))
    cover = [*HELDOUT_PAIRS, *TRAIN_PAIRS][:n]
    lines = [_random_line(rng, pair) for pair in cover]
    lines += [_random_line(rng) for _ in range(n - len(cover))]
    rng.shuffle(lines)
    path = Path(out_dir) / "text" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_lines(path, lines)
    return path


# --------------------------------------------------------------------------------------------------- images

IMAGE_SPLITS: tuple[str, ...] = ("train", "heldout", "heldout_pairs")
# Default image counts per split for the demo.
DEFAULT_IMAGE_COUNTS: dict[str, int] = {"train": 4000, "heldout": 200, "heldout_pairs": 200}
# Image sides (px), object sides as fractions of the shorter image side, per size word.
_IMAGE_SIDE = (64, 256)
_OBJECT_SIDE: dict[str, tuple[float, float]] = {"small": (0.15, 0.25), "large": (0.35, 0.50)}
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


def _image_size(rng: random.Random, bucket: int) -> tuple[int, int]:
    """(width, height): bucket 0-3 landscape, 4-7 portrait, aspect ratio in [1, 1.75), ..., [3.25, 4]."""
    lo_side, hi_side = _IMAGE_SIDE
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
        return max(2, round(rng.uniform(*_OBJECT_SIDE[size]) * short))

    return _placed_scene(rng, width, height, background, chosen, sizes, side)


def _placed_scene(
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


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata (reproducible bytes)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _remove_stale(folder: Path, pattern: str, keep: int) -> None:
    """Delete files of a previous, larger run: names matching pattern whose number is >= keep."""
    if not folder.is_dir():
        return
    regex = re.compile(pattern)
    for p in folder.iterdir():
        m = regex.fullmatch(p.name)
        if m and int(m.group(1)) >= keep:
            p.unlink()


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
    _check(split, IMAGE_SPLITS, "split")
    if n is None:
        n = DEFAULT_IMAGE_COUNTS[split]
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be at least 1, got n={n}, shard_size={shard_size}")
    root = Path(out_dir) / "shapes"
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    _remove_stale(image_dir, r"(\d+)\.png", n)
    _remove_stale(root, re.escape(split) + r"-(\d{5})\.tar", n_shards)
    lines = []
    for k in range(n_shards):
        shard = root / f"{split}-{k:05d}.tar"
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{shard.name}.", suffix=".tmp")
        try:
            with (
                os.fdopen(fd, "wb") as f,
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ):
                for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
                    scene = _scene_for(seed, split, i)
                    buf = io.BytesIO()
                    render_scene(scene).save(buf, format="PNG")
                    png = buf.getvalue()
                    name = f"{i:06d}"
                    (image_dir / f"{name}.png").write_bytes(png)
                    meta = {
                        "text": scene.caption,
                        "width": scene.width,
                        "height": scene.height,
                        "background": list(scene.background),
                        "objects": [o.as_dict() for o in scene.objects],
                    }
                    lines.append(json.dumps({"image": f"{split}/{name}.png", **meta}))
                    _tar_add(tar, f"{name}.png", png)
                    _tar_add(tar, f"{name}.txt", scene.caption.encode("utf-8"))
                    _tar_add(
                        tar, f"{name}.json", json.dumps({"split": split, "index": i, **meta}).encode("utf-8")
                    )
            os.replace(tmp, shard)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    manifest = root / f"{split}.jsonl"
    _write_lines(manifest, lines)
    return manifest


# --------------------------------------------------------------------------------------------------- videos

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
    _check(direction, DIRECTIONS, "direction")
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
    bytes (from a fresh process: with decord's FFmpeg loaded too, libx264 may differ in a few bits); files of an earlier, larger run of the split are removed. `n` defaults to
    `DEFAULT_MOTION_COUNTS[split]`.
    """
    _check(split, IMAGE_SPLITS, "split")
    if n is None:
        n = DEFAULT_MOTION_COUNTS[split]
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be at least 1, got n={n}, shard_size={shard_size}")
    root = Path(out_dir) / "motion"
    clip_dir = root / split
    clip_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    _remove_stale(clip_dir, r"(\d+)\.mp4", n)
    _remove_stale(root, re.escape(split) + r"-(\d{5})\.tar", n_shards)
    lines = []
    for k in range(n_shards):
        shard = root / f"{split}-{k:05d}.tar"
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{shard.name}.", suffix=".tmp")
        try:
            with (
                os.fdopen(fd, "wb") as f,
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ):
                for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
                    clip = _motion_for(seed, split, i)
                    mp4 = encode_mp4(clip.frames())
                    name = f"{i:06d}"
                    (clip_dir / f"{name}.mp4").write_bytes(mp4)
                    meta = clip.as_dict()
                    lines.append(json.dumps({"video": f"{split}/{name}.mp4", **meta}))
                    _tar_add(tar, f"{name}.mp4", mp4)
                    _tar_add(tar, f"{name}.txt", clip.caption.encode("utf-8"))
                    _tar_add(
                        tar, f"{name}.json", json.dumps({"split": split, "index": i, **meta}).encode("utf-8")
                    )
            os.replace(tmp, shard)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    manifest = root / f"{split}.jsonl"
    _write_lines(manifest, lines)
    return manifest


# ------------------------------------------------------------------------------------- robustness variants

# Kinds of `synth_shapes_variants`: the world's scenes, drawn in ways the training images never are.
VARIANT_KINDS: tuple[str, ...] = ("jpeg", "antialias", "sizes")
DEFAULT_VARIANT_COUNT = 100
_JPEG_QUALITY = (40, 85)
_SUPERSAMPLE = 4  # "antialias": drawn at 4x the size, then downsampled
_RESAMPLE: dict[str, Image.Resampling] = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_EDGE_FRACTION = 0.2  # "sizes": object sides lie in the lowest or highest fifth of their size word's range


def _variant_size(rng: random.Random, i: int) -> tuple[int, int]:
    """(width, height) of "sizes" image i: exact 1:1, exact 4:1 and 1:4, or both sides drawn independently."""
    lo, hi = _IMAGE_SIDE
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
    lo, hi = _OBJECT_SIDE[size]
    a, b = math.ceil(lo * short - 1e-9), math.floor(hi * short + 1e-9)
    span = max(1, int((b - a) * _EDGE_FRACTION))
    return rng.randint(a, a + span) if rng.random() < 0.5 else rng.randint(b - span, b)


def _edge_scene(rng: random.Random, width: int, height: int) -> Scene:
    """A scene of training pairs at a given size, with object sides near the ends of their ranges."""
    background = (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))
    n_objects = rng.choice((1, 2))
    chosen = [rng.choice(TRAIN_PAIRS) for _ in range(n_objects)]
    sizes = [rng.choice(SIZES) for _ in range(n_objects)]
    return _placed_scene(
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
    _check(kind, VARIANT_KINDS, "variant kind")
    if n is None:
        n = DEFAULT_VARIANT_COUNT
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    root = Path(out_dir) / "shapes"
    folder = f"variants_{kind}"
    image_dir = root / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(image_dir, r"(\d+)\.(?:png|jpg)", n)
    lines = []
    for i in range(n):
        scene, data, ext, variant = _variant_image(seed, kind, i)
        name = f"{i:06d}.{ext}"
        (image_dir / name).write_bytes(data)
        meta = {
            "text": scene.caption,
            "width": scene.width,
            "height": scene.height,
            "background": list(scene.background),
            "objects": [o.as_dict() for o in scene.objects],
            "variant": variant,
        }
        lines.append(json.dumps({"image": f"{folder}/{name}", **meta}))
    manifest = root / f"{folder}.jsonl"
    _write_lines(manifest, lines)
    return manifest
