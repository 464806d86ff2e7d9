"""Video-text pairs: JSONL manifests and WebDataset shards of video clips, decoded with decord on the CPU, N frames
sampled uniformly, each frame tiled by the image transform (Llama 3 paper §7.5; `paper-notes.md` §4: "up to 64
uniformly sampled frames, each encoded by the image encoder").

Storage mirrors the image pairs (`mm.datasets.images`):

- A JSONL manifest, one record per line: `{"video": "train/000001.mp4", "text": "a red circle moves left", ...}`;
  `video` is relative to the manifest's folder (or absolute); other fields are kept as `meta`.
- WebDataset tar shards: members grouped by key, a video (`.mp4`, `.avi`, `.mov`, `.mkv`, `.webm`) plus a
  caption (`.txt`, or `.json` with a string `text`). Members are read into memory, never extracted.

Frame sampling (`sample_frame_indices`): the clip is cut into N equal spans and the frame at the centre of each
span is taken, index floor((k + 1/2) * n_total / N) for k = 0..N-1. A clip with fewer than N frames repeats
frames deterministically by the same rule (5 frames asked for 16 give 0,0,0,1,1,1,2,2,2,2,3,3,3,4,4,4). Only the
sampled frames are decoded (`VideoReader.get_batch` seeks to the key frame before each one), so a 10,000-frame
clip costs about N short decodes, not 10,000. Clips with a variable frame rate are sampled uniformly in time
(the frame shown at the centre of each span, from decord's frame timestamps). Frames keep the clip's size
whatever it is; every frame goes through the same `TileTransform` as images (a clip's frames share one grid).

Bad input follows the image policy (`SkipStats`): a missing, zero-byte, corrupt, truncated-beyond-use,
zero-frame or non-video file is skipped, counted per reason and logged with its path; a skipped fraction above
`max_bad_fraction` (after `min_tried` samples) stops the run with `TooManyBadSamples`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .collate import cross_attention_mask_from_tokens
from .images import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_PIXELS,
    BadSample,
    ManifestSamples,
    SkipStats,
    _derive_seed,
    _group_text,
    _read_groups,
    _with_text,
    expand_shards,
)
from .streams import SampleStream, check_paths, open_shards
from .text import IGNORE_INDEX
from .tiling import TiledImage

__all__ = [
    "MAX_FRAMES",
    "VIDEO_EXTENSIONS",
    "VideoCaptionCollator",
    "VideoTextDataset",
    "VideoTextRecord",
    "VideoTextShards",
    "decode_clip",
    "decode_video_group",
    "iter_video_webdataset",
    "open_video_stream",
    "read_video_manifest",
    "sample_frame_indices",
    "tile_clip",
]

logger = logging.getLogger(__name__)

MAX_FRAMES = 64  # the paper samples up to 64 frames
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "mov", "mkv", "webm")
_MAX_EXAMPLES = 5
_VFR_TOLERANCE = 0.01  # relative spread of frame durations above which a clip counts as variable frame rate


# ------------------------------------------------------------------------------------------------ sampling


def sample_frame_indices(n_total: int, n_frames: int) -> list[int]:
    """Indices of `n_frames` uniformly sampled frames of a clip of `n_total`: the centre of each equal span."""
    if n_total < 1 or n_frames < 1:
        raise ValueError(f"need n_total >= 1 and n_frames >= 1, got n_total={n_total}, n_frames={n_frames}")
    return [min(n_total - 1, (2 * k + 1) * n_total // (2 * n_frames)) for k in range(n_frames)]


def _sample_by_time(starts: np.ndarray, ends: np.ndarray, n_frames: int) -> list[int]:
    """Variable frame rate: the frame on screen at the centre of each of `n_frames` equal time spans."""
    t0, t1 = float(starts[0]), float(ends[-1])
    centres = t0 + (np.arange(n_frames) + 0.5) * (t1 - t0) / n_frames
    idx = np.searchsorted(starts, centres, side="right") - 1
    return [int(i) for i in np.clip(idx, 0, len(starts) - 1)]


def decode_clip(
    source: str | os.PathLike[str] | bytes, n_frames: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode `n_frames` uniformly sampled frames -> (n_frames, H, W, 3) uint8 and info; BadSample if unusable.

    `source` is a file path or the file's bytes. Info: `indices` (the sampled frame indices), `n_source_frames`,
    `fps` (decord's average), `variable_frame_rate`.
    """
    import decord  # imported on first use: it loads FFmpeg

    errors = _decord_errors()
    if not 1 <= n_frames <= MAX_FRAMES:
        raise ValueError(f"n_frames must be in [1, {MAX_FRAMES}], got {n_frames}")
    if isinstance(source, bytes):
        if len(source) == 0:
            raise BadSample("empty", "zero-byte file")
        handle: Any = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BadSample("missing", "file does not exist") from None
        except OSError as e:
            raise BadSample("unreadable", f"{type(e).__name__}: {e}") from None
        if size == 0:
            raise BadSample("empty", "zero-byte file")
        handle = str(path)
    try:
        reader = decord.VideoReader(handle, ctx=decord.cpu(0), num_threads=1)
    except errors as e:  # RuntimeError("Error reading ...") or DECORDError for anything FFmpeg cannot open
        raise BadSample("not_video", f"cannot open as video: {str(e).splitlines()[0][:200]}") from None
    n_total = len(reader)
    if n_total == 0:
        raise BadSample("no_frames", "the video stream has 0 frames")
    indices = sample_frame_indices(n_total, n_frames)
    variable = False
    if n_total > 2:
        try:
            stamps = np.asarray(reader.get_frame_timestamp(range(n_total)), dtype=np.float64)  # (n, 2)
        except errors:  # no usable timestamps: sample by index
            stamps = None
        if stamps is not None and stamps.shape == (n_total, 2):
            durations = np.diff(stamps[:, 0])
            if durations.size and durations.min() > 0:
                spread = (durations.max() - durations.min()) / durations.mean()
                variable = bool(spread > _VFR_TOLERANCE)
            if variable:
                indices = _sample_by_time(stamps[:, 0], stamps[:, 1], n_frames)
    unique = sorted(set(indices))
    try:
        batch = reader.get_batch(unique).asnumpy()  # (len(unique), H, W, 3): only these frames are decoded
    except errors as e:
        if "DECORDArrayCopyFromTo" not in str(e):  # truncated or corrupt frame data
            first = str(e).splitlines()[0][:200]
            raise BadSample("corrupt", f"cannot decode frames {unique[:4]}...: {first}") from None
        # decord 0.6.0 cannot copy out frames of some widths (16, 24, 48, 72 px, ...): decode those with PyAV.
        batch = _decode_with_pyav(source, unique)
    if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3 or 0 in batch.shape:
        raise BadSample("corrupt", f"decoded frames have shape {tuple(batch.shape)}")
    height, width = batch.shape[1:3]
    if height * width > max_pixels:
        raise BadSample("too_large", f"{width}x{height} frames > max_pixels={max_pixels}")
    frames = batch[[unique.index(i) for i in indices]]
    info = {
        "indices": indices,
        "n_source_frames": n_total,
        "fps": float(reader.get_avg_fps()),
        "variable_frame_rate": variable,
    }
    return frames, info


def _decord_errors() -> tuple[type[Exception], ...]:
    """What decord raises for a file FFmpeg cannot open or decode: its own `RuntimeError("Error reading ...")`,
    `DECORDError` from a failed check in the C++ library, `DECORDLimitReachedError` (too many corrupt frames)."""
    from decord._ffi.base import DECORDError, DECORDLimitReachedError

    return (RuntimeError, DECORDError, DECORDLimitReachedError)


def _decode_with_pyav(source: str | os.PathLike[str] | bytes, indices: list[int]) -> np.ndarray:
    """Frames at sorted `indices` (decode order, as decord counts them) as (n, H, W, 3) uint8, with PyAV."""
    import av

    wanted, out = set(indices), {}
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    out[k] = frame.to_ndarray(format="rgb24")
                if k >= indices[-1]:
                    break
    except (av.error.FFmpegError, OSError) as e:  # corrupt or truncated data, unreadable file
        raise BadSample(
            "corrupt", f"cannot decode frames {indices[:4]}... ({type(e).__name__}: {e})"
        ) from None
    if len(out) != len(wanted):
        raise BadSample("corrupt", f"only {len(out)} of the frames {indices[:4]}... could be decoded")
    return np.stack([out[k] for k in indices])


def tile_clip(frames: np.ndarray, transform: Callable[[Image.Image], Any]) -> dict[str, Any]:
    """Frames (F, H, W, 3) uint8 through the image transform -> `frames` (F, n_tiles, 3, S, S) and the grid.

    The frames are decoded RGB arrays (bad files were refused by `decode_clip`): an error of the transform is a
    bug, not bad data, and propagates."""
    tiled = []
    for frame in frames:
        out = transform(Image.fromarray(frame))
        if not isinstance(out, TiledImage):
            raise TypeError(f"the video transform must return a TiledImage, got {type(out).__name__}")
        tiled.append(out)
    return {
        "frames": torch.stack([t.tiles for t in tiled]),  # (F, n_tiles, 3, S, S)
        "aspect_ratio_id": tiled[0].aspect_ratio_id,
        "aspect_ratio": tiled[0].aspect_ratio,
    }


def _clip_sample(
    source: str | os.PathLike[str] | bytes,
    transform: Callable[[Image.Image], Any] | None,
    n_frames: int,
    max_pixels: int,
) -> dict[str, Any]:
    """Decode and (with a transform) tile one clip."""
    frames, info = decode_clip(source, n_frames, max_pixels=max_pixels)
    sample = {"raw_frames": frames} if transform is None else tile_clip(frames, transform)
    sample.update(frame_indices=info["indices"], n_source_frames=info["n_source_frames"], fps=info["fps"])
    return sample


# ------------------------------------------------------------------------------------------------ manifests


@dataclass(frozen=True)
class VideoTextRecord:
    """One manifest entry: the video's resolved path, its caption and any other fields of the record."""

    video: Path
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_video_manifest(path: str | os.PathLike[str]) -> list[VideoTextRecord]:
    """Records of a JSONL video manifest; malformed lines are skipped with a warning naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video-text manifest {path} does not exist")
    records, bad = [], 0
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                reason: str | None = f"not JSON ({e.msg})"
            else:
                if not isinstance(rec, dict):
                    reason = f"a JSON {type(rec).__name__}, not an object"
                elif not isinstance(rec.get("video"), str) or not rec["video"]:
                    reason = "no 'video' string"
                elif not isinstance(rec.get("text"), str) or not rec["text"]:
                    reason = "no non-empty 'text' string"
                else:
                    reason = None
            if reason is not None:
                bad += 1
                if bad <= _MAX_EXAMPLES:
                    logger.warning("%s:%d: skipped manifest record: %s", path, lineno, reason)
                continue
            video = Path(rec["video"])
            meta = {k: v for k, v in rec.items() if k not in ("video", "text")}
            records.append(
                VideoTextRecord(video if video.is_absolute() else path.parent / video, rec["text"], meta)
            )
    if bad:
        logger.warning("%s: skipped %d malformed records (need a 'video' and a non-empty 'text')", path, bad)
    return records


class VideoTextDataset(ManifestSamples):
    """Map-style dataset over a JSONL video manifest: `ds[i]` -> dict(frames, aspect_ratio_id, text, ...).

    With a `TileTransform` each sample holds `frames` (n_frames, n_tiles, 3, S, S), `aspect_ratio_id` and
    `aspect_ratio`; with `transform=None` it holds `raw_frames` (n_frames, H, W, 3) uint8. Every sample also has
    `text`, `source` (the video path), `index`, `frame_indices`, `n_source_frames` and `fps`. `load(i)` returns
    None for an unusable entry (counted once in `stats`); `ds[i]` moves on to the next usable entry.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        n_frames: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = 0.05,
        min_tried: int = 20,
    ) -> None:
        if not 1 <= n_frames <= MAX_FRAMES:
            raise ValueError(f"n_frames must be in [1, {MAX_FRAMES}], got {n_frames}")
        self.manifest = Path(manifest)
        records = read_video_manifest(self.manifest)
        missing = [r.video for r in records if not r.video.is_file()]
        if missing:
            logger.warning(
                "%s: dropped %d of %d entries whose video file is missing (first: %s)",
                self.manifest,
                len(missing),
                len(records),
                ", ".join(str(p) for p in missing[:_MAX_EXAMPLES]),
            )
            gone = set(missing)
            records = [r for r in records if r.video not in gone]
        if not records:
            raise ValueError(f"video-text manifest {self.manifest} has no usable entries")
        self.records = records
        self.missing = [str(p) for p in missing]
        self.transform = transform
        self.n_frames = n_frames
        self.max_pixels = max_pixels
        self.stats = SkipStats(max_bad_fraction, min_tried, what=f"clips of manifest {self.manifest}")
        self._bad: set[int] = set()

    kind = "video-text"
    order_tag = "mm.video.order"

    def _source(self, record: VideoTextRecord) -> Path:
        """The video file."""
        return record.video

    def _decode(self, record: VideoTextRecord) -> dict[str, Any]:
        """Sample, decode and tile the clip's frames."""
        return _clip_sample(record.video, self.transform, self.n_frames, self.max_pixels)


# --------------------------------------------------------------------------------------------------- shards


def iter_video_webdataset(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    n_frames: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    stats: SkipStats | None = None,
    max_bad_fraction: float = 0.05,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict[str, Any]]:
    """Clips of WebDataset tar shards in stored order: dict(frames..., text, source="shard:key", key[, meta])."""
    paths = expand_shards(shards)
    if stats is None:
        stats = SkipStats(max_bad_fraction, what="clips of shards")
    for shard in paths:
        for key, group in _read_groups(shard, stats, max_member_bytes):
            source = f"{shard}:{key}"
            try:
                sample = decode_video_group(
                    group, source, transform=transform, n_frames=n_frames, max_pixels=max_pixels
                )
            except BadSample as e:
                stats.skip(e.reason, source, e.detail)
                continue
            stats.ok()
            sample.update(source=source, key=key)
            yield sample


def decode_video_group(
    group: dict[str, Any],
    source: str = "",
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    n_frames: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """The clip of one shard group ({extension: bytes}): frames, `text` and `meta` (from `.json`); raise
    BadSample if it is unusable (too large a member, no video, no caption, bad video)."""
    if "_too_large" in group:
        raise BadSample("too_large", group["_too_large"])
    ext = next((e for e in VIDEO_EXTENSIONS if e in group), None)
    if ext is None:
        raise BadSample("no_video", f"members {sorted(group)} hold no {'/'.join(VIDEO_EXTENSIONS)}")
    text = _group_text(group)
    return _with_text(_clip_sample(group[ext], transform, n_frames, max_pixels), text, group)


class VideoTextShards(IterableDataset):
    """Video WebDataset shards as an IterableDataset: shard order shuffled per epoch, split over ranks/workers.

    Sequential reading (e.g. a quick pass); training reads shards by position (`mm.datasets.shards`).
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        n_frames: int = 16,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = 0.05,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shards = expand_shards(shards)
        self.transform, self.n_frames, self.max_pixels = transform, n_frames, max_pixels
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch = 0
        self.stats = SkipStats(max_bad_fraction, what="clips of shards")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order the next iteration uses."""
        self.epoch = epoch

    def shard_order(self, epoch: int | None = None, worker: int = 0, num_workers: int = 1) -> list[Path]:
        """The shards this rank's `worker` reads in `epoch`, in reading order."""
        order = list(self.shards)
        if self.shuffle:
            e = self.epoch if epoch is None else epoch
            random.Random(_derive_seed("mm.video.shards", self.seed, e)).shuffle(order)
        total = self.world_size * num_workers
        return order[self.rank * num_workers + worker :: total]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        shards = self.shard_order(self.epoch, worker, num_workers)
        if not shards:
            logger.warning("rank %d worker %d has no video shard", self.rank, worker)
            return iter(())
        return iter_video_webdataset(
            shards, self.transform, n_frames=self.n_frames, max_pixels=self.max_pixels, stats=self.stats
        )


def open_video_stream(
    paths: Sequence[str],
    transform: Callable[[Image.Image], Any],
    *,
    n_frames: int,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    rank: int = 0,
    world: int = 1,
    shuffle_window: int = 1024,
) -> SampleStream:
    """A position-addressed stream (`SampleStream`) over one JSONL manifest, or over WebDataset shards."""
    if check_paths(paths):
        dataset = VideoTextDataset(paths[0], transform, n_frames=n_frames, max_bad_fraction=max_bad_fraction)
        return SampleStream(dataset, seed, rank=rank, world=world)
    return open_shards(
        paths,
        functools.partial(decode_video_group, transform=transform, n_frames=n_frames),
        transform=transform,
        what="clips of shards",
        seed=seed,
        shuffle_window=shuffle_window,
        max_bad_fraction=max_bad_fraction,
        rank=rank,
        world=world,
    )


# ------------------------------------------------------------------------------------------------- collate


class VideoCaptionCollator:
    """Clips + captions -> a video-stage batch: `<|begin_of_text|> <|video|> prompt caption <|end_of_text|>`.

    Returns `tokens`, `labels` (loss on the caption and the end token only), `attention_mask`,
    `video_cross_attention_mask` (B, T, 1, G) int64 over the G = n_frames / merge effective frames (the
    `<|video|>` token's range runs to the end of the row, as for images), and the pixels: `video_frames`
    (B, F, max_tiles, 3, S, S), `video_aspect_ratio_ids` (B, F), `video_aspect_ratio_mask` (B, F, max_tiles).
    """

    def __init__(self, tokenizer: Any, prompt: str, *, max_tiles: int = 4, merge: int = 1):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_tiles = max_tiles
        self.merge = merge
        head = prompt.rstrip()
        self._tail = prompt[len(head) :]  # trailing whitespace is tokenized with the caption
        self.prefix: list[int] = [tokenizer.bos_id, tokenizer.video_id, *tokenizer.encode(head)]

    def caption_ids(self, text: str) -> list[int]:
        """Token ids of a caption as it follows the prompt (without the end token)."""
        return self.tokenizer.encode(self._tail + text)

    def n_groups(self, n_frames: int) -> int:
        """Effective frames after merging every `merge` frames."""
        if n_frames % self.merge:
            raise ValueError(f"{n_frames} frames cannot be merged in groups of {self.merge}")
        return n_frames // self.merge

    def text(self, samples: Sequence[dict[str, Any]], n_frames: int) -> dict[str, torch.Tensor]:
        """`tokens`, `labels`, `attention_mask` and `video_cross_attention_mask` of the samples' captions."""
        tok = self.tokenizer
        rows = [self.prefix + self.caption_ids(s["text"]) + [tok.eos_id] for s in samples]
        start = len(self.prefix)
        B, T = len(rows), max(len(r) for r in rows)
        tokens = torch.full((B, T), tok.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, row in enumerate(rows):
            t = torch.tensor(row, dtype=torch.long)
            tokens[b, : len(row)] = t
            attention_mask[b, : len(row)] = True
            labels[b, start - 1 : len(row) - 1] = t[start:]  # position t predicts token t+1
        G = self.n_groups(n_frames)
        xmask = cross_attention_mask_from_tokens(tokens, tok.video_id, [[G]] * B, G)
        return {
            "tokens": tokens,
            "labels": labels,
            "attention_mask": attention_mask,
            "video_cross_attention_mask": xmask,
        }

    def media(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """`video_frames` (B, F, max_tiles, 3, S, S), `video_aspect_ratio_ids` (B, F), `video_aspect_ratio_mask`."""
        first = samples[0]["frames"]
        F, size = first.shape[0], first.shape[-1]
        B = len(samples)
        frames = torch.zeros(B, F, self.max_tiles, 3, size, size, dtype=torch.float32)
        ids = torch.zeros(B, F, dtype=torch.long)
        mask = torch.zeros(B, F, self.max_tiles, dtype=torch.long)
        for b, s in enumerate(samples):
            x = s["frames"]
            n = x.shape[1]
            if x.shape[0] != F or x.shape[2:] != (3, size, size) or not 1 <= n <= self.max_tiles:
                raise ValueError(
                    f"sample {b} ({s.get('source', '?')}): frames of shape {tuple(x.shape)}; expected "
                    f"({F}, 1..{self.max_tiles}, 3, {size}, {size})"
                )
            frames[b, :, :n] = x
            ids[b] = int(s["aspect_ratio_id"])
            mask[b, :, :n] = 1
        return {"video_frames": frames, "video_aspect_ratio_ids": ids, "video_aspect_ratio_mask": mask}

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        """Collate a training batch (None samples are dropped)."""
        samples = [s for s in samples if s is not None]
        if not samples:
            raise ValueError("cannot collate an empty batch (every sample was None)")
        media = self.media(samples)
        return {**self.text(samples, media["video_frames"].shape[1]), **media}
