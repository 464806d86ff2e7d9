"""The spoken shapes world (`shared/design.md`): sentences of the world (`grammar.random_sentence`) spoken by
espeak-ng, resampled to 16 kHz mono 16-bit WAV; transcript = the sentence.

Splits (`synth_speech`):

- `train`: voice `en-us`, speed 140-180 words per minute, pitch 30-70 (uniform integers per clip); sentences of
  the training partition only, and never a held-out colour-shape pair (`grammar.HELDOUT_PAIRS`).
- `heldout_sentences`: same voice and ranges, sentences of the held-out partition: their text never occurs in
  `train` (the partition is fixed by a hash of the sentence text, `is_heldout_sentence`, about 10% of them).
- `heldout_voices`: sentences of the training partition (new clips) spoken by `HELDOUT_VOICES`, other espeak-ng
  English voices and variants never heard in training (clip i uses voice i mod 7), same speed/pitch ranges.

Files: `out_dir/speech/{split}/{i:06d}.wav`, a JSONL manifest `out_dir/speech/{split}.jsonl` (`audio` relative
to the manifest's folder, `text`, `voice`, `speed`, `pitch`, `seconds`, and `spanish`: the text's translation by
`mm.world.spanish.to_spanish`, the speech translation target) and WebDataset shards
`out_dir/speech/{split}-{k:05d}.tar` (`.wav`, `.txt`, `.json`) that `mm.datasets.audio` reads. Clip i of a split
has its own RNG, so the same (n, seed, split) gives identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from .files import write_split
from .grammar import random_sentence
from .spanish import to_spanish

__all__ = [
    "DEFAULT_SPEECH_COUNTS",
    "HELDOUT_VOICES",
    "SPEECH_SPLITS",
    "TRAIN_VOICE",
    "EspeakMissing",
    "espeak_wave",
    "is_heldout_sentence",
    "speech_clip_params",
    "synth_speech",
]

SPEECH_SPLITS: tuple[str, ...] = ("train", "heldout_sentences", "heldout_voices")
DEFAULT_SPEECH_COUNTS: dict[str, int] = {"train": 3000, "heldout_sentences": 200, "heldout_voices": 210}
TRAIN_VOICE = "en-us"
# Other espeak-ng English voices (accents) and variants of en-us (other speakers' formants), never trained on.
HELDOUT_VOICES: tuple[str, ...] = (
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en-us+m3",
    "en-us+f2",
)
SPEED_WPM = (140, 180)
PITCH = (30, 70)
SAMPLE_RATE = 16_000
_HELDOUT_SENTENCE_SHARE = 26  # of 256: about 10% of the sentences are held out


class EspeakMissing(FileNotFoundError):
    """espeak-ng is not installed."""


def _espeak() -> str:
    """Path of the espeak-ng binary, or EspeakMissing saying how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissing(
            "espeak-ng is not installed, and `mm data synth --kind speech` needs it to speak the shapes world. "
            "Install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu; `make venv` does this when run as "
            "root), `brew install espeak-ng` (macOS) or `dnf install espeak-ng` (Fedora), then run again."
        )
    return exe


def is_heldout_sentence(text: str) -> bool:
    """True if a sentence belongs to the held-out partition (a fixed hash of its text; about 10%)."""
    return hashlib.sha256(f"mm.speech.sentence/{text}".encode()).digest()[0] < _HELDOUT_SENTENCE_SHARE


def speech_clip_params(seed: int, split: str, i: int) -> dict:
    """Sentence, voice, speed and pitch of clip i of a split (its own RNG: independent of n)."""
    if split not in SPEECH_SPLITS:
        raise ValueError(f"unknown speech split {split!r}; expected one of {', '.join(SPEECH_SPLITS)}")
    rng = random.Random(f"mm.shapes.speech/{split}/{seed}/{i}")
    want_heldout = split == "heldout_sentences"
    while True:  # rejection sampling into the split's sentence partition
        text = random_sentence(rng, allow_heldout=False)
        if is_heldout_sentence(text) == want_heldout:
            break
    voice = HELDOUT_VOICES[i % len(HELDOUT_VOICES)] if split == "heldout_voices" else TRAIN_VOICE
    return {"text": text, "voice": voice, "speed": rng.randint(*SPEED_WPM), "pitch": rng.randint(*PITCH)}


def espeak_wave(text: str, voice: str, speed: int, pitch: int) -> tuple[bytes, float]:
    """Speak `text` with espeak-ng; return 16 kHz mono 16-bit PCM WAV bytes and the duration in seconds."""
    exe = _espeak()
    proc = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(
            f"espeak-ng failed for voice {voice!r} (exit {proc.returncode}): {proc.stderr.decode()[:200]}"
        )
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    if sr != SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, sr, SAMPLE_RATE)
    buf = io.BytesIO()
    sf.write(buf, mono.clamp(-1, 1).numpy(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue(), mono.numel() / SAMPLE_RATE


def synth_speech(
    out_dir: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    shard_size: int = 1000,
    workers: int | None = None,
) -> Path:
    """Write n spoken clips of the world; return the manifest `out_dir/speech/{split}.jsonl` (module docstring).

    `n` defaults to `DEFAULT_SPEECH_COUNTS[split]`; espeak-ng runs in `workers` parallel processes (default: the
    CPU count). Files of an earlier, larger run of the split are removed.
    """
    if split not in SPEECH_SPLITS:
        raise ValueError(f"unknown speech split {split!r}; expected one of {', '.join(SPEECH_SPLITS)}")
    _espeak()
    if n is None:
        n = DEFAULT_SPEECH_COUNTS[split]
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be at least 1, got n={n}, shard_size={shard_size}")
    params = [speech_clip_params(seed, split, i) for i in range(n)]

    def speak(i: int) -> tuple[bytes, float]:
        p = params[i]
        return espeak_wave(p["text"], p["voice"], p["speed"], p["pitch"])

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        clips = list(pool.map(speak, range(n)))

    def sample(i: int) -> tuple[bytes, dict]:
        """Clip i: WAV bytes and metadata (with the Spanish of its text)."""
        wav, seconds = clips[i]
        return wav, {**params[i], "seconds": round(seconds, 4), "spanish": to_spanish(params[i]["text"])}

    return write_split(Path(out_dir) / "speech", split, n, shard_size, ("audio", "wav"), sample)
