"""Video-text pairs: JSONL manifests and WebDataset shards of video clips, decoded with decord on the CPU, N frames
sampled uniformly, each frame tiled by the image transform (Llama 3 paper §7.5; `paper-notes.md` §4: "up to 64
uniformly sampled frames, each encoded by the image encoder").

Storage is the media-text source's (`mm.datasets.media` with `video_decoder`): a JSONL manifest names each clip
under `video` (`{"video": "train/000001.mp4", "text": "a red circle moves left", ...}`); a WebDataset shard
holds it as a `.mp4`, `.avi`, `.mov`, `.mkv` or `.webm` member next to its caption.

Frame sampling (`sample_frame_indices`): the clip is cut into N equal spans and the frame at the centre of each
span is taken, index floor((k + 1/2) * n_total / N) for k = 0..N-1. A clip with fewer than N frames repeats
frames deterministically by the same rule (5 frames asked for 16 give 0,0,0,1,1,1,2,2,2,2,3,3,3,4,4,4). Only the
sampled frames are decoded (`VideoReader.get_batch` seeks to the key frame before each one), so a 10,000-frame
clip costs about N short decodes, not 10,000. Clips with a variable frame rate are sampled uniformly in time
(the frame shown at the centre of each span, from decord's frame timestamps). Frames keep the clip's size
whatever it is; every frame goes through the same `TileTransform` as images (a clip's frames share one grid).

Bad input follows the readers' policy (`mm.datasets.skips`): a missing, zero-byte, corrupt,
truncated-beyond-use, zero-frame or non-video file is skipped, counted per reason and logged with its path; a
skipped fraction above `max_bad_fraction` (after `min_tried` samples) stops the run with `TooManyBadSamples`.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .collate import cross_attention_mask_from_tokens
from .images import DEFAULT_MAX_PIXELS
from .media import MediaDecoder
from .skips import BadSample
from .text import IGNORE_INDEX
from .tiling import TiledImage

__all__ = [
    "MAX_FRAMES",
    "VIDEO_EXTENSIONS",
    "VideoCaptionCollator",
    "clip_sample",
    "decode_clip",
    "sample_frame_indices",
    "tile_clip",
    "video_decoder",
]

MAX_FRAMES = 64  # the paper samples up to 64 frames
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "mov", "mkv", "webm")
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


def clip_sample(
    media: str | os.PathLike[str] | bytes,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    n_frames: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Decode and (with a transform) tile one clip (a file path or the file's bytes): `frames` and the grid
    (`tile_clip`), or `raw_frames` (n_frames, H, W, 3) uint8 without a transform; plus `frame_indices`,
    `n_source_frames` and `fps`. Raise BadSample if unusable."""
    frames, info = decode_clip(media, n_frames, max_pixels=max_pixels)
    sample = {"raw_frames": frames} if transform is None else tile_clip(frames, transform)
    sample.update(frame_indices=info["indices"], n_source_frames=info["n_source_frames"], fps=info["fps"])
    return sample


def video_decoder(
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    n_frames: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> MediaDecoder:
    """The media-text source's decoder of video: `n_frames` uniformly sampled frames per clip (`clip_sample`)."""
    if not 1 <= n_frames <= MAX_FRAMES:
        raise ValueError(f"n_frames must be in [1, {MAX_FRAMES}], got {n_frames}")
    decode = functools.partial(clip_sample, transform=transform, n_frames=n_frames, max_pixels=max_pixels)
    return MediaDecoder("video", VIDEO_EXTENSIONS, decode, "mm.video.order", "clips", transform=transform)


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
