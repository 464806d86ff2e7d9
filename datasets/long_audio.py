"""Long recordings cut into pieces the speech encoder can take: `split_on_silence` cuts a mono 16 kHz waveform
at pauses into consecutive pieces of at most `max_seconds` (the stage's `AudioFeatures.max_seconds`), in order.

Energy-based: the waveform is read as 10 ms frames and their RMS level in dB; a frame is silent below a threshold
set from the recording itself (between its noise floor and its loud frames, so that it works on clean audio with
digital silence and on noisy audio alike); a pause is a run of at least `min_silence_s` of silent frames. While
what is left is longer than `max_seconds`, the next cut is made in the middle of the quietest pause that fits in
the window (preferring pauses in its second half, so that pieces are not needlessly short); a window with no
pause is cut at its lowest-energy frame. With `every_pause` every pause is a cut as well (a model trained on
single sentences then hears one sentence per piece). The pieces tile the recording: no frame is dropped, except
pieces that hold no frame above the threshold (silence only), which are left out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .audio import SAMPLE_RATE

__all__ = ["frame_levels", "silence_threshold", "split_on_silence"]

FRAME_S = 0.01  # 10 ms frames (the features' hop)
SILENT_DBFS = (
    -80.0
)  # a frame this quiet is silent whatever the recording (16-bit PCM's noise is near -101 dBFS)


def _check(
    wave: torch.Tensor | np.ndarray, sample_rate: int, max_seconds: float, min_silence_s: float
) -> None:
    if not isinstance(wave, torch.Tensor | np.ndarray):
        raise ValueError(f"split_on_silence: expected a 1-D waveform tensor, got {type(wave).__name__}")
    if sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"split_on_silence: sample_rate={sample_rate!r}; expected {SAMPLE_RATE} (the speech features' rate: "
            "decode_audio resamples to it)"
        )
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise ValueError(
            f"split_on_silence: expected a non-empty 1-D mono waveform, got shape {tuple(wave.shape)}"
        )
    finite = torch.isfinite(wave).all() if isinstance(wave, torch.Tensor) else np.isfinite(wave).all()
    if not bool(finite):
        raise ValueError("split_on_silence: the waveform holds NaN or infinite samples")
    if not (math.isfinite(max_seconds) and max_seconds >= 2 * FRAME_S):
        raise ValueError(
            f"split_on_silence: max_seconds={max_seconds!r}; expected a length >= {2 * FRAME_S} s"
        )
    if not (math.isfinite(min_silence_s) and 0 < min_silence_s < max_seconds):
        raise ValueError(
            f"split_on_silence: min_silence_s={min_silence_s!r}; expected a pause length in (0, max_seconds)"
        )


def frame_levels(wave: torch.Tensor, hop: int) -> torch.Tensor:
    """RMS level in dB of consecutive `hop`-sample frames (the last one partial), float64."""
    n = wave.numel()
    frames = -(-n // hop)
    padded = torch.zeros(frames * hop, dtype=torch.float64)
    padded[:n] = wave.double()
    power = padded.reshape(frames, hop).pow(2).sum(1)
    counts = torch.full((frames,), float(hop), dtype=torch.float64)
    counts[-1] = n - (frames - 1) * hop
    return 10 * torch.log10(power / counts + 1e-20)


def silence_threshold(levels: torch.Tensor) -> float:
    """The level (dB) below which a frame is silent: 30 % of the way from the noise floor (10th percentile,
    at most 80 dB under the loud frames) to the loud frames (99th percentile), at least 40 dB under them; and
    never under `SILENT_DBFS` (a recording of silence only is silence)."""
    loud = float(torch.quantile(levels, 0.99))
    floor = max(float(torch.quantile(levels, 0.10)), loud - 80.0)
    return max(loud - 40.0, floor + 0.3 * (loud - floor), SILENT_DBFS)


def _pauses(silent: torch.Tensor, min_frames: int) -> list[tuple[int, int]]:
    """Runs [a, b) of silent frames at least `min_frames` long."""
    padded = torch.cat([torch.tensor([False]), silent, torch.tensor([False])]).to(torch.int8)
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return [(a, b) for a, b in zip(starts, ends, strict=True) if b - a >= min_frames]


def _next_cut(
    pos: int, end: int, pauses: list[tuple[int, int]], levels: torch.Tensor, min_frames: int
) -> int:
    """The frame at which to cut the window [pos, end]: the middle of its quietest pause (one in the second half
    if any; ties to the longer, then the later), else its lowest-energy frame."""
    for lo in (pos + (end - pos) // 2, pos + 1):
        best, best_key = None, None
        for a, b in pauses:
            a, b = max(a, lo), min(b, end)
            if b - a < min_frames:
                continue
            key = (-round(float(levels[a:b].mean())), b - a, b)  # quieter (to 1 dB), longer, later
            if best_key is None or key > best_key:
                best, best_key = (a + b) // 2, key
        if best is not None:
            return best
    window = levels[pos + 1 : end + 1]  # a cut at frame f splits before f: pieces of >= 1 frame
    low = torch.nonzero(window == window.min()).flatten()
    return pos + 1 + int(low[-1])


def split_on_silence(
    wave: torch.Tensor | np.ndarray,
    sample_rate: int,
    max_seconds: float,
    min_silence_s: float = 0.3,
    *,
    every_pause: bool = False,
    threshold_db: float | None = None,
) -> list[tuple[int, int]]:
    """Consecutive pieces (start, end) in samples of at most `max_seconds`, cut at pauses (module docstring); a
    piece of silence only is left out. ValueError for an empty, non-1-D or non-finite wave or a rate not 16 kHz."""
    _check(wave, sample_rate, max_seconds, min_silence_s)
    wave = torch.as_tensor(wave)
    n, hop = wave.numel(), round(FRAME_S * sample_rate)
    levels = frame_levels(wave, hop)
    threshold = silence_threshold(levels) if threshold_db is None else float(threshold_db)
    silent = levels < threshold
    min_frames = max(1, round(min_silence_s / FRAME_S))
    pauses = _pauses(silent, min_frames)
    frames, window = levels.numel(), int(max_seconds * sample_rate) // hop
    cuts = [(a + b) // 2 for a, b in pauses if 0 < a and b < frames] if every_pause else []
    bounds = [0]
    for stop in [*cuts, frames]:
        while (
            stop - bounds[-1] > window
        ):  # too long for the encoder: cut inside [bounds[-1], bounds[-1] + window]
            bounds.append(_next_cut(bounds[-1], bounds[-1] + window, pauses, levels, min_frames))
        if stop > bounds[-1]:
            bounds.append(stop)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if bool((~silent[a:b]).any()):
            out.append((a * hop, min(b * hop, n)))
    return out
