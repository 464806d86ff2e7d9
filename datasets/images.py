"""Image-text pairs: JSONL manifests, WebDataset tar shards, safe image decoding and the bad-input policy.

Two ways to store pairs (design.md, datasets room):

- A JSONL manifest, one record per line: `{"image": "train/000001.png", "text": "a large red circle", ...}`.
  `image` is relative to the manifest's folder (or absolute); other fields are kept as `meta`.
  `ImageTextDataset` is a map-style dataset over it, with a seeded, resumable order (`sample_order`).
- WebDataset tar shards: members grouped by key (the member name up to the first dot of its file name, as
  WebDataset does), an image (`.jpg`, `.jpeg`, `.png`) plus a caption (`.txt`, or `.json` with a string `text`
  field). `iter_webdataset` / `ImageTextShards` stream them with `tarfile`: members are read into memory and
  never extracted, so member names such as `../x.png` are harmless.

Decoding (`decode_image`) opens the header first and rejects images with 0 pixels or more than `max_pixels`
(default 64 megapixels) before decoding any pixel data, so a decompression bomb costs nothing; EXIF orientation
is applied, as transformers' `load_image` does. Colour-mode conversion is the transform's job (`TileTransform`).

Bad input policy: a sample that cannot be used (missing file, zero-byte file or zero-size image, corrupt or
truncated data, too many pixels, no caption, ...) is skipped; `SkipStats` counts skips per reason, keeps the
first few sources per reason and logs each (the first 20 per reason at WARNING, later ones at DEBUG). Once at
least `min_tried` samples were tried, a skipped fraction above `max_bad_fraction` (default 0.05) raises
`TooManyBadSamples` naming the counts: a mostly broken dataset stops the run instead of silently shrinking it.
With DataLoader workers each worker counts (and checks) its own share.

Manifest problems found at construction are reported once, not counted as tried samples: records that are not
JSON objects with an `image` string and a non-empty `text` string are skipped with a warning naming file and
line; entries whose image file does not exist are dropped with one warning giving the count and the first few
paths. A missing manifest raises FileNotFoundError; a manifest left with no usable entry raises ValueError.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .tiling import TiledImage

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadSample",
    "ImageTextDataset",
    "ImageTextRecord",
    "ImageTextShards",
    "SkipStats",
    "TooManyBadSamples",
    "decode_image",
    "decode_image_group",
    "expand_shards",
    "iter_webdataset",
    "read_manifest",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000
# Members larger than this are skipped without being read (a 64-megapixel PNG rarely exceeds it).
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png")
_TEXT_EXTENSIONS: tuple[str, ...] = ("txt", "json")
_MAX_EXAMPLES = 5  # sources kept per skip reason
_MAX_LOGGED = 20  # skips logged at WARNING per reason (later ones at DEBUG)


def _derive_seed(*parts: object) -> int:
    """A 64-bit seed derived from the parts (stable across runs and Python versions)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


# ------------------------------------------------------------------------------------------ bad-input policy


class BadSample(Exception):
    """A sample that must be skipped; `reason` is a short key (e.g. "corrupt"), `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TooManyBadSamples(RuntimeError):
    """More than `max_bad_fraction` of the samples tried were skipped."""


@dataclass
class SkipStats:
    """Samples tried and skipped (per reason, with the first few sources); enforces `max_bad_fraction`."""

    max_bad_fraction: float = 0.05
    min_tried: int = 20
    what: str = "samples"  # how the error names the data, e.g. "samples of manifest train.jsonl"
    tried: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")

    @property
    def n_skipped(self) -> int:
        """Total skipped samples."""
        return sum(self.skipped.values())

    def ok(self) -> None:
        """Record (and check) a good sample: early skips can push the fraction over the limit at `min_tried`."""
        self.tried += 1
        self.check()

    def skip(self, reason: str, source: str, detail: str = "") -> None:
        """Record, log and check one skipped sample."""
        self.tried += 1
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < _MAX_EXAMPLES:
            kept.append(source)
        level = logging.WARNING if self.skipped[reason] <= _MAX_LOGGED else logging.DEBUG
        logger.log(level, "skipped %s (%s%s)", source, reason, f": {detail}" if detail else "")
        self.check()

    def check(self) -> None:
        """Raise TooManyBadSamples if the skipped fraction is above the limit (after `min_tried` samples)."""
        if self.tried < self.min_tried or self.n_skipped <= self.max_bad_fraction * self.tried:
            return
        reasons = ", ".join(
            f"{r}: {n} (e.g. {', '.join(self.examples[r][:3])})" for r, n in self.skipped.items()
        )
        raise TooManyBadSamples(
            f"{self.n_skipped} of {self.tried} {self.what} tried were skipped "
            f"({self.n_skipped / self.tried:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}); {reasons}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict summary (for logs and reports)."""
        return {
            "tried": self.tried,
            "skipped": self.n_skipped,
            "skipped_by_reason": dict(self.skipped),
            "examples": {r: list(v) for r, v in self.examples.items()},
        }


# What PIL raises for bytes it cannot use (UnidentifiedImageError is an OSError; plugins raise SyntaxError for a
# broken header or chunk, struct.error / EOFError for data that ends early, zlib.error for a corrupt stream).
# Anything else (TypeError, AttributeError, ...) is a bug and propagates.
_PIL_DATA_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
)
# PIL's EXIF parser on a malformed EXIF block (tag tables indexed with bad offsets, rationals with 0 denominators).
_EXIF_ERRORS: tuple[type[Exception], ...] = (
    *_PIL_DATA_ERRORS,
    KeyError,
    IndexError,
    TypeError,
    ZeroDivisionError,
)
# What PIL raises when a decoded image cannot be converted (e.g. `convert("RGB")` of a mode it has no conversion
# for: ValueError) or a lazily read part of the file fails (OSError) inside the transform.
_PIL_CONVERT_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes safely (size checked from the header first); raise BadSample if unusable."""
    if len(data) == 0:
        raise BadSample("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS)
        raise BadSample("too_large", str(e)) from None
    except _PIL_DATA_ERRORS as e:  # UnidentifiedImageError, or a plugin's error parsing a broken header
        raise BadSample("corrupt", f"{type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height == 0:
        raise BadSample("empty", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise BadSample("too_large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    try:
        image.load()
    except Image.DecompressionBombError as e:  # a plugin that learns the true size only while loading
        raise BadSample("too_large", str(e)) from None
    except _PIL_DATA_ERRORS as e:  # truncated or corrupt pixel data
        raise BadSample("corrupt", f"{type(e).__name__}: {e}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except _EXIF_ERRORS:  # a broken EXIF block (PIL's parser only; no code of ours runs here): keep the image
        pass
    return image


def _make_sample(image: Image.Image, transform: Callable[[Image.Image], Any] | None) -> dict[str, Any]:
    """The image part of a sample: a TiledImage's fields, or the transform's output under `image`.

    Only PIL's errors for an image it cannot convert count as a bad sample ("transform"); any other error of the
    transform (TypeError, AttributeError, ...) is a bug and propagates."""
    if transform is None:
        return {"image": image}
    try:
        out = transform(image)
    except _PIL_CONVERT_ERRORS as e:  # e.g. a colour mode PIL cannot convert to RGB
        raise BadSample("transform", f"{type(e).__name__}: {e}") from None
    if isinstance(out, TiledImage):
        return {"tiles": out.tiles, "aspect_ratio_id": out.aspect_ratio_id, "aspect_ratio": out.aspect_ratio}
    return {"image": out}


# ------------------------------------------------------------------------------------------------ manifests


@dataclass(frozen=True)
class ImageTextRecord:
    """One manifest entry: the image's resolved path, its caption and any other fields of the record."""

    image: Path
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_manifest(path: str | os.PathLike[str]) -> list[ImageTextRecord]:
    """Records of a JSONL manifest (see the module docstring); malformed lines are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image-text manifest {path} does not exist")
    root = path.parent
    records = []
    bad = 0
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"not JSON ({e.msg})"
            else:
                reason = _record_problem(rec)
            if reason is not None:
                bad += 1
                if bad <= _MAX_EXAMPLES:
                    logger.warning("%s:%d: skipped manifest record: %s", path, lineno, reason)
                continue
            image = Path(rec["image"])
            meta = {k: v for k, v in rec.items() if k not in ("image", "text")}
            records.append(ImageTextRecord(image if image.is_absolute() else root / image, rec["text"], meta))
    if bad:
        logger.warning(
            "%s: skipped %d malformed records (need an 'image' and a non-empty 'text' string)", path, bad
        )
    return records


def _record_problem(rec: Any) -> str | None:
    """Why a parsed manifest line is unusable, or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        return "no 'image' string"
    if not isinstance(rec.get("text"), str) or not rec["text"]:
        return "no non-empty 'text' string"
    return None


class ManifestSamples(Dataset):
    """Shared behaviour of the manifest datasets (image, video, audio): `load(i)` -> sample or None (a bad entry is
    counted in `stats` once and remembered), `ds[i]` moves on to the next usable entry, and a seeded epoch order.
    Subclasses set `records`, `manifest`, `stats`, `_bad`, `kind` and `order_tag`, and implement `_source` and
    `_decode` (which raises BadSample for an unusable entry)."""

    kind = "media-text"
    order_tag = "mm.order"

    def _source(self, record: Any) -> Path:
        """The media file of a record."""
        raise NotImplementedError

    def _decode(self, record: Any) -> dict[str, Any]:
        """The sample of a record (without text, source and index); raise BadSample if unusable."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> dict[str, Any] | None:
        """Sample of entry i, or None if it is unusable (counted in `stats` the first time)."""
        if i in self._bad:
            return None
        record = self.records[i]
        try:
            sample = self._decode(record)
        except BadSample as e:
            self._bad.add(i)
            self.stats.skip(e.reason, str(self._source(record)), e.detail)
            return None
        self.stats.ok()
        sample.update(text=record.text, source=str(self._source(record)), index=i)
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} entries")
        for k in range(n):
            sample = self.load((i + k) % n)
            if sample is not None:
                return sample
        raise ValueError(
            f"{self.kind} manifest {self.manifest}: every entry was skipped ({self.stats.as_dict()})"
        )

    def sample_order(self, seed: int, epoch: int) -> list[int]:
        """A permutation of the entries, fixed by (seed, epoch)."""
        order = list(range(len(self.records)))
        random.Random(_derive_seed(self.order_tag, seed, epoch)).shuffle(order)
        return order


class ImageTextDataset(ManifestSamples):
    """Map-style dataset over a JSONL manifest: `ds[i]` -> dict(tiles, aspect_ratio_id, aspect_ratio, text, ...).

    With a `TileTransform` each sample holds `tiles` (n_tiles, 3, S, S), `aspect_ratio_id`, `aspect_ratio`; with
    `transform=None` it holds the decoded PIL image under `image`; any other transform's output goes to `image`.
    Every sample also has `text`, `source` (the image path) and `index` (the manifest entry used).

    `load(i)` returns None for an unusable entry (counted in `stats`); `ds[i]` instead moves on to the next usable
    entry (i+1, i+2, ... wrapping around), so batches keep their size. Entries found bad are remembered and
    not decoded or counted again. `sample_order(seed, epoch)` is the training order; the trainer keeps its
    position in it to resume.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = 0.05,
        min_tried: int = 20,
    ) -> None:
        self.manifest = Path(manifest)
        records = read_manifest(self.manifest)
        missing = [r.image for r in records if not r.image.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:_MAX_EXAMPLES])
            logger.warning(
                "%s: dropped %d of %d entries whose image file is missing (first: %s)",
                self.manifest,
                len(missing),
                len(records),
                shown,
            )
            gone = set(missing)
            records = [r for r in records if r.image not in gone]
        if not records:
            raise ValueError(f"image-text manifest {self.manifest} has no usable entries")
        self.records = records
        self.missing = [str(p) for p in missing]
        self.transform = transform
        self.max_pixels = max_pixels
        self.stats = SkipStats(max_bad_fraction, min_tried, what=f"samples of manifest {self.manifest}")
        self._bad: set[int] = set()

    kind = "image-text"
    order_tag = "mm.images.order"

    def _source(self, record: ImageTextRecord) -> Path:
        """The image file."""
        return record.image

    def _decode(self, record: ImageTextRecord) -> dict[str, Any]:
        """Read, decode and transform the image."""
        try:
            data = record.image.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing", "file disappeared after the manifest was read") from None
        except OSError as e:
            raise BadSample("unreadable", f"{type(e).__name__}: {e}") from None
        return _make_sample(decode_image(data, self.max_pixels), self.transform)


# --------------------------------------------------------------------------------------------------- shards

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(spec: str) -> list[str]:
    """Expand numeric ranges "{000..009}" (WebDataset's shard notation), zero-padded like the first bound."""
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = spec[: m.start()], spec[m.end() :]
    out = []
    for k in range(int(lo), int(hi) + 1):
        out += _expand_braces(f"{head}{k:0{width}d}{tail}")
    return out


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Shard paths from a path, a glob ("train-*.tar"), a brace range ("train-{00000..00009}.tar"), or a list."""
    specs = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    paths: list[Path] = []
    for spec in specs:
        for item in _expand_braces(os.fspath(spec)):
            if any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"no shard matches {item!r}")
                paths += [Path(p) for p in found]
            elif Path(item).is_dir():
                found = sorted(p for p in Path(item).iterdir() if fnmatch.fnmatch(p.name, "*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard folder {item} holds no .tar file")
                paths += found
            elif Path(item).is_file():
                paths.append(Path(item))
            else:
                raise FileNotFoundError(f"shard {item} does not exist")
    if not paths:
        raise ValueError(f"no shards given ({shards!r})")
    return paths


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, WebDataset style: "dir/abc.seg.png" -> ("dir/abc", "seg.png")."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def unsafe_member_name(name: str) -> bool:
    """True for a tar member name that is absolute or climbs out of its folder ("../x.png", "/etc/x.png")."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/")


def _read_groups(
    shard: Path, stats: SkipStats, max_member_bytes: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {ext: bytes}) for consecutive members sharing a key; oversized members are noted, not read."""
    key: str | None = None
    group: dict[str, Any] = {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = _split_name(member.name)
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, group
                    key, group = split[0], {}
                ext = split[1]
                if unsafe_member_name(member.name):  # never extracted anyway: members are read in memory
                    group["_unsafe"] = f"member name {member.name!r} points outside the shard's folder"
                    continue
                if member.size > max_member_bytes:
                    group["_too_large"] = f"member {member.name} has {member.size} bytes > {max_member_bytes}"
                    continue
                f = tar.extractfile(member)
                group[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # truncated or corrupt shard
        stats.skip("broken_shard", str(shard), f"{type(e).__name__}: {e}; rest of the shard dropped")
        return
    if key is not None:
        yield key, group


def _group_text(group: dict[str, Any]) -> str:
    """The caption of a group (`.txt`, else `.json` `text`); raise BadSample if there is none."""
    if "txt" in group:
        text = group["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if "json" in group:
        try:
            rec = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadSample("bad_text", f".json is not JSON ({e})") from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
            return rec["text"].strip()
        raise BadSample("bad_text", ".json has no non-empty 'text' string")
    raise BadSample("no_text", "no .txt or .json member" if "txt" not in group else "empty .txt")


def iter_webdataset(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stats: SkipStats | None = None,
    max_bad_fraction: float = 0.05,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict[str, Any]]:
    """Samples of WebDataset tar shards in order: dict(tiles.../image, text, source="shard:key", key[, meta])."""
    paths = expand_shards(shards)
    if stats is None:
        stats = SkipStats(max_bad_fraction, what="samples of shards")
    for shard in paths:
        for key, group in _read_groups(shard, stats, max_member_bytes):
            source = f"{shard}:{key}"
            try:
                sample = decode_image_group(group, source, transform=transform, max_pixels=max_pixels)
            except BadSample as e:
                stats.skip(e.reason, source, e.detail)
                continue
            stats.ok()
            sample.update(source=source, key=key)
            yield sample


def decode_image_group(
    group: dict[str, Any],
    source: str = "",
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """The sample of one shard group ({extension: bytes}): image fields, `text` and `meta` (from `.json`);
    raise BadSample if it is unusable (`_unsafe` / `_too_large` markers, no image, no caption, bad image)."""
    if "_unsafe" in group:
        raise BadSample("unsafe_name", group["_unsafe"])
    if "_too_large" in group:
        raise BadSample("too_large", group["_too_large"])
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
    if image_ext is None:
        raise BadSample("no_image", f"members {sorted(group)} hold no {'/'.join(IMAGE_EXTENSIONS)}")
    text = _group_text(group)
    return _with_text(_make_sample(decode_image(group[image_ext], max_pixels), transform), text, group)


def _with_text(sample: dict[str, Any], text: str, group: dict[str, Any]) -> dict[str, Any]:
    """A decoded shard sample with its caption, and the group's `.json` record as `meta` when it parses."""
    sample["text"] = text
    if "json" in group:
        try:
            sample["meta"] = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return sample


class ImageTextShards(IterableDataset):
    """WebDataset shards as an IterableDataset: shard order shuffled per epoch, shards split over ranks/workers.

    Shard i of the epoch's order goes to global worker i mod (world_size * num_workers); samples within a shard
    keep their stored order. Call `set_epoch(epoch)` before each pass. `stats` counts skips in this process
    (each DataLoader worker has its own copy).

    Sequential reading (e.g. a quick pass); training reads shards by position (`mm.datasets.shards`).
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = 0.05,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shards = expand_shards(shards)
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.max_pixels = max_pixels
        self.max_member_bytes = max_member_bytes
        self.epoch = 0
        self.stats = SkipStats(max_bad_fraction, what="samples of shards")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order the next iteration uses."""
        self.epoch = epoch

    def shard_order(self, epoch: int | None = None, worker: int = 0, num_workers: int = 1) -> list[Path]:
        """The shards this rank's `worker` reads in `epoch`, in reading order."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(
                _derive_seed("mm.images.shards", self.seed, self.epoch if epoch is None else epoch)
            ).shuffle(order)
        total = self.world_size * num_workers
        return order[self.rank * num_workers + worker :: total]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        shards = self.shard_order(self.epoch, worker, num_workers)
        if not shards:
            logger.warning(
                "rank %d worker %d has no shard (%d shards for %d readers)",
                self.rank,
                worker,
                len(self.shards),
                self.world_size * num_workers,
            )
            return iter(())
        return iter_webdataset(
            shards,
            self.transform,
            max_pixels=self.max_pixels,
            stats=self.stats,
            max_member_bytes=self.max_member_bytes,
        )
