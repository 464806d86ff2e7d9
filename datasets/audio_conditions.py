"""Audio as users have it: seeded transforms of a mono float waveform (what `mm.datasets.audio.decode_audio`
returns: a 1-D float32 torch tensor, 16 kHz by default) that put speech in the conditions real recordings have,
for training with them and for measuring WER per condition.

- `add_noise`: white, pink or babble noise at an exact signal-to-noise ratio (over the whole clip);
- `set_level`: the clip's RMS level in dBFS (full scale = 1.0), clipped to [-1, 1] as a recorder clips;
- `telephone`: the 8 kHz telephone band (resampled to 8 kHz and back, 300-3400 Hz band-pass, G.711 mu-law);
- `insert_silence`: digital silence of given lengths at given times;
- `encode_decode`: a lossy MP3 or OGG/Vorbis file (written with soundfile/libsndfile) read back through
  `decode_audio`, so that the reader's own path decodes it.

`CONDITIONS` names the conditions a stage trains and evaluates with (`clean`, `snr20`, `snr10`, `snr5`,
`babble10`, `quiet`, `loud`, `telephone`, `mp3`, `ogg`, `silences`); `apply_condition(name, wave, seed)` applies
one with a generator seeded from (name, seed), so a clip's condition is the same in every run and process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio

from .audio import SAMPLE_RATE, decode_audio
from .seeding import derive_seed

__all__ = [
    "CONDITIONS",
    "ENCODINGS",
    "NOISE_KINDS",
    "Condition",
    "add_noise",
    "apply_condition",
    "check_wave",
    "encode",
    "encode_decode",
    "insert_silence",
    "rms_dbfs",
    "set_level",
    "telephone",
]

NOISE_KINDS: tuple[str, ...] = ("white", "pink", "babble")
# format -> (soundfile format, subtype): the lossy formats users send, written by libsndfile (>= 1.1 for MP3)
ENCODINGS: dict[str, tuple[str, str]] = {"mp3": ("MP3", "MPEG_LAYER_III"), "ogg": ("OGG", "VORBIS")}


def check_wave(wave: torch.Tensor, what: str = "wave") -> torch.Tensor:
    """`wave` as a float32 1-D tensor; ValueError if it is not one, is empty or holds NaN/inf samples."""
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, torch.Tensor):
        raise ValueError(f"{what}: expected a 1-D float tensor (a mono waveform), got {type(wave).__name__}")
    if wave.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D mono waveform, got shape {tuple(wave.shape)}")
    if not wave.is_floating_point():
        raise ValueError(f"{what}: expected float samples in [-1, 1], got dtype {wave.dtype}")
    if wave.numel() == 0:
        raise ValueError(f"{what}: empty waveform (0 samples)")
    if not bool(torch.isfinite(wave).all()):
        raise ValueError(f"{what}: holds NaN or infinite samples")
    return wave.float()


def _check_rate(sample_rate: int, minimum: int = 1) -> None:
    if not isinstance(sample_rate, int) or sample_rate < minimum:
        raise ValueError(f"sample_rate={sample_rate!r}; expected an integer rate in Hz >= {minimum}")


def rms_dbfs(wave: torch.Tensor) -> float:
    """RMS level of a waveform in dB relative to full scale 1.0 (-inf for digital silence)."""
    power = float(check_wave(wave).double().pow(2).mean())
    return 10 * math.log10(power) if power > 0 else -math.inf


def _noise(kind: str, wave: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Unscaled noise of `kind`, the length of `wave`."""
    n = wave.numel()
    if kind == "white":
        return torch.randn(n, generator=rng, dtype=torch.float64)
    if kind == "pink":  # 1/f power: white noise's spectrum divided by sqrt(f) (DC removed)
        spec = torch.fft.rfft(torch.randn(n, generator=rng, dtype=torch.float64))
        f = torch.arange(spec.numel(), dtype=torch.float64)
        spec = spec / f.clamp(min=1).sqrt()
        spec[0] = 0
        return torch.fft.irfft(spec, n)
    if (
        kind == "babble"
    ):  # several talkers: time-reversed, circularly shifted copies of the speech, unintelligible
        w = wave.double()
        shifts = torch.randint(0, n, (6,), generator=rng).tolist()
        return sum(torch.roll(w.flip(0), s) for s in shifts)
    raise ValueError(f"noise kind={kind!r}; allowed: {', '.join(NOISE_KINDS)}")


def add_noise(wave: torch.Tensor, snr_db: float, rng: torch.Generator, kind: str = "white") -> torch.Tensor:
    """`wave` plus `kind` noise scaled so that 10 log10(signal power / noise power) = `snr_db` exactly (powers
    over the whole clip; samples are not clipped)."""
    wave = check_wave(wave)
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db={snr_db!r}; expected a finite number of dB")
    signal_power = float(wave.double().pow(2).mean())
    if signal_power == 0:
        raise ValueError("add_noise: the waveform is digital silence; a signal-to-noise ratio needs a signal")
    noise = _noise(kind, wave, rng)
    noise_power = float(noise.pow(2).mean())
    if noise_power == 0:  # babble of a clip whose copies cancel: fall back to white noise
        noise = torch.randn(wave.numel(), generator=rng, dtype=torch.float64)
        noise_power = float(noise.pow(2).mean())
    scale = math.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return (wave.double() + scale * noise).float()


def set_level(wave: torch.Tensor, dbfs: float, clip: bool = True) -> torch.Tensor:
    """`wave` scaled to an RMS level of `dbfs` dB full scale; with `clip`, samples beyond +-1 clip as a recorder's."""
    wave = check_wave(wave)
    if not math.isfinite(dbfs) or dbfs > 0:
        raise ValueError(f"dbfs={dbfs!r}; expected a finite level <= 0 dB full scale")
    level = rms_dbfs(wave)
    if level == -math.inf:
        raise ValueError("set_level: the waveform is digital silence; it has no level to scale")
    out = wave.double() * 10 ** ((dbfs - level) / 20)
    return (out.clamp(-1, 1) if clip else out).float()


# A sharp resampling filter (Kaiser window, cut-off at 0.94 of the lower Nyquist frequency: 3760 Hz at 8 kHz):
# torchaudio's default leaves about 1 % of broadband power between 3.96 and 4.04 kHz.
_SHARP = {
    "lowpass_filter_width": 32,
    "rolloff": 0.94,
    "resampling_method": "sinc_interp_kaiser",
    "beta": 14.77,
}


def telephone(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, mu_law: bool = True) -> torch.Tensor:
    """The telephone channel: resampled to 8 kHz (nothing above 4 kHz survives), band-passed to 300-3400 Hz
    (two biquads each side), optionally G.711 mu-law quantised (8 bits), and resampled back to `sample_rate`."""
    wave = check_wave(wave)
    _check_rate(sample_rate, minimum=8000)
    narrow = torchaudio.functional.resample(wave, sample_rate, 8000, **_SHARP)
    for _ in range(2):
        narrow = torchaudio.functional.highpass_biquad(narrow, 8000, 300.0)
        narrow = torchaudio.functional.lowpass_biquad(narrow, 8000, 3400.0)
    narrow = narrow.clamp(-1, 1)
    if mu_law:
        codes = torchaudio.functional.mu_law_encoding(narrow, 256)
        narrow = torchaudio.functional.mu_law_decoding(codes, 256)
    return torchaudio.functional.resample(narrow, 8000, sample_rate, **_SHARP).float()


def insert_silence(
    wave: torch.Tensor,
    seconds: float | Sequence[float],
    where: float | Sequence[float],
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """`wave` with digital silence of `seconds` inserted at each time `where` (seconds into the original clip;
    0 = before it, its duration = after it); one length for all places or one per place."""
    wave = check_wave(wave)
    _check_rate(sample_rate)
    places = [float(where)] if isinstance(where, int | float) else [float(w) for w in where]
    lengths = (
        [float(seconds)] * len(places) if isinstance(seconds, int | float) else [float(s) for s in seconds]
    )
    if len(lengths) != len(places):
        raise ValueError(
            f"insert_silence: {len(lengths)} lengths for {len(places)} places; give one or one each"
        )
    duration = wave.numel() / sample_rate
    pieces, prev = [], 0
    for at, length in sorted(zip(places, lengths, strict=True)):
        if not 0 <= at <= duration:
            raise ValueError(f"insert_silence: where={at} s is outside the clip (0 to {duration:.3f} s)")
        if not (math.isfinite(length) and length >= 0):
            raise ValueError(f"insert_silence: seconds={length!r}; expected a finite length >= 0")
        cut = round(at * sample_rate)
        pieces += [wave[prev:cut], wave.new_zeros(round(length * sample_rate))]
        prev = cut
    return torch.cat([*pieces, wave[prev:]])


def encode(wave: torch.Tensor, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The bytes of `wave` as an `fmt` file ("mp3" or "ogg"/Vorbis), written by libsndfile through soundfile."""
    wave = check_wave(wave)
    _check_rate(sample_rate)
    if fmt not in ENCODINGS:
        raise ValueError(f"format={fmt!r}; allowed: {', '.join(ENCODINGS)}")
    container, subtype = ENCODINGS[fmt]
    if subtype not in sf.available_subtypes(container):
        raise RuntimeError(
            f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}; soundfile>=0.12 bundles one that can"
        )
    buf = io.BytesIO()
    sf.write(buf, wave.clamp(-1, 1).numpy(), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def encode_decode(wave: torch.Tensor, fmt: str, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """`wave` after a round trip through an `fmt` file ("mp3" or "ogg"): encoded, then read by `decode_audio`."""
    return decode_audio(encode(wave, fmt, sample_rate), sample_rate)


def _frame_db(wave: torch.Tensor, frame: int) -> torch.Tensor:
    """RMS level (dB) of consecutive `frame`-sample frames."""
    n = wave.numel() // frame
    power = wave[: n * frame].double().reshape(n, frame).pow(2).mean(1)
    return 10 * torch.log10(power + 1e-12)


def _long_pauses(wave: torch.Tensor, rng: torch.Generator, sample_rate: int) -> torch.Tensor:
    """The `silences` condition: 0.5-1.5 s of silence before the speech, 1-2 s after it, and 1.5-3 s at the
    quietest 20 ms frame of the middle half (most often a pause between words)."""
    frame = sample_rate // 50
    db = _frame_db(wave, frame)
    lo, hi = len(db) // 4, max(len(db) // 4 + 1, 3 * len(db) // 4)
    middle = (lo + int(db[lo:hi].argmin())) * frame + frame // 2 if len(db) else wave.numel() // 2
    u = torch.rand(3, generator=rng, dtype=torch.float64).tolist()
    lengths = [0.5 + u[0], 1.5 + 1.5 * u[1], 1.0 + u[2]]
    places = [0.0, min(middle, wave.numel()) / sample_rate, wave.numel() / sample_rate]
    return insert_silence(wave, lengths, places, sample_rate)


@dataclass(frozen=True)
class Condition:
    """A named recording condition: `apply(wave, generator, sample_rate) -> wave`, with a one-line description."""

    name: str
    description: str
    apply: Callable[[torch.Tensor, torch.Generator, int], torch.Tensor]


def _conditions() -> dict[str, Condition]:
    c = [
        Condition("clean", "the clip as it is", lambda w, g, sr: w),
        Condition("snr20", "white noise at 20 dB SNR", lambda w, g, sr: add_noise(w, 20.0, g)),
        Condition("snr10", "white noise at 10 dB SNR", lambda w, g, sr: add_noise(w, 10.0, g)),
        Condition("snr5", "white noise at 5 dB SNR", lambda w, g, sr: add_noise(w, 5.0, g)),
        Condition("babble10", "babble at 10 dB SNR", lambda w, g, sr: add_noise(w, 10.0, g, "babble")),
        Condition("quiet", "RMS level -35 dBFS", lambda w, g, sr: set_level(w, -35.0)),
        Condition("loud", "RMS level -6 dBFS, clipped at full scale", lambda w, g, sr: set_level(w, -6.0)),
        Condition("telephone", "8 kHz telephone band, mu-law", lambda w, g, sr: telephone(w, sr)),
        Condition("mp3", "an MP3 file, decoded", lambda w, g, sr: encode_decode(w, "mp3", sr)),
        Condition("ogg", "an OGG/Vorbis file, decoded", lambda w, g, sr: encode_decode(w, "ogg", sr)),
        Condition("silences", "long silences before, inside and after", _long_pauses),
    ]
    return {x.name: x for x in c}


CONDITIONS: dict[str, Condition] = _conditions()


def apply_condition(
    name: str, wave: torch.Tensor, seed: int = 0, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """`wave` under the condition `name` of `CONDITIONS`, its draws seeded from (name, seed)."""
    if name not in CONDITIONS:
        raise ValueError(f"audio condition {name!r} is not known; known: {', '.join(CONDITIONS)}")
    wave = check_wave(wave)
    _check_rate(sample_rate)
    gen = torch.Generator().manual_seed(derive_seed("mm.audio.condition", name, seed) % 2**63)
    return CONDITIONS[name].apply(wave, gen, sample_rate)
