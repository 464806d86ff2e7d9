"""The spoken shapes world (`shared/design.md`): sentences of the world (`grammar.random_sentence`) spoken by
espeak-ng, resampled to 16 kHz mono 16-bit WAV; transcript = the sentence.

Splits (`synth_speech`):

- `train`: voice `en-us`, speed 140-180 words per minute, pitch 30-70 (uniform integers per clip); sentences of
  the training partition only, and never a held-out colour-shape pair (`grammar.HELDOUT_PAIRS`).
- `heldout_sentences`: same voice and ranges, sentences of the held-out partition: their text never occurs in
  `train` (the partition is fixed by a hash of the sentence text, `is_heldout_sentence`, about 10% of them).
- `heldout_voices`: sentences of the training partition (new clips) spoken by `HELDOUT_VOICES`, other espeak-ng
  English voices and variants never heard in training (clip i uses voice i mod 7), same speed/pitch ranges.
- `untrained_forms`: sentences in forms the world's sentences never take (`untrained_sentence`: "a red circle
  moves down.", "the green square is small.", ...), training voice: do transcripts follow the audio or the
  forms the LM knows?
- `untrained_voices`: sentences of the training partition spoken by `UNTRAINED_VOICES`, voices and variants
  outside training and outside `heldout_voices`.
- `train_scrambled`: scrambled sequences of the world's words (`corpus.scrambled_sentence`: no sentence form
  at all), training voice, marked `asr_only` (no Spanish): the speech stage hears every word in every position,
  meant to make the adapter pass on words rather than sentence forms (measured in the demo's speech stage, one
  run: it did not, untrained forms WER 0.452 -> 0.504, so the demo does not train on them).
- `questions_train` / `questions_heldout`: spoken questions of the design's table (`corpus.draw_question`:
  canonical and training wordings / canonical only; training voice) about a scene given in text, with the
  record's `context` (the scene: "a large red circle.") and `answer` ("red"), `family`; the training split never
  mentions a held-out colour-shape pair.

Files: `out_dir/speech/{split}/{i:06d}.wav`, a JSONL manifest `out_dir/speech/{split}.jsonl` (`audio` relative
to the manifest's folder, `text`, `voice`, `speed`, `pitch`, `seconds`, and `spanish`: the text's translation by
`mm.world.spanish.to_spanish`, the speech translation target, where the grammar has one; questions have none) and WebDataset shards
`out_dir/speech/{split}-{k:05d}.tar` (`.wav`, `.txt`, `.json`) that `mm.datasets.audio` reads. Clip i of a split
has its own RNG, so the same (n, seed, split) gives identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
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

from .corpus import draw_question, scrambled_sentence
from .files import write_split
from .grammar import DIRECTIONS, SIZES, random_object, random_sentence
from .spanish import to_spanish

__all__ = [
    "DEFAULT_SPEECH_COUNTS",
    "HELDOUT_VOICES",
    "SPEECH_SPLITS",
    "TRAIN_VOICE",
    "UNTRAINED_VOICES",
    "EspeakMissing",
    "espeak_wave",
    "is_heldout_sentence",
    "speech_clip_params",
    "merge_manifests",
    "synth_long_recording",
    "synth_speech",
    "untrained_sentence",
]

SPEECH_SPLITS: tuple[str, ...] = (
    "train",
    "heldout_sentences",
    "heldout_voices",
    "untrained_forms",
    "untrained_voices",
    "train_scrambled",
    "questions_train",
    "questions_heldout",
)
DEFAULT_SPEECH_COUNTS: dict[str, int] = {
    "train": 3000,
    "heldout_sentences": 200,
    "heldout_voices": 210,
    "untrained_forms": 200,
    "untrained_voices": 200,
    "train_scrambled": 1000,
    "questions_train": 1000,
    "questions_heldout": 200,
}
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
# Voices outside training and outside `heldout_voices` (the untrained_voices split).
UNTRAINED_VOICES: tuple[str, ...] = ("en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us+m7", "en-us+f3")
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


def untrained_sentence(rng: random.Random) -> str:
    """A sentence of the world's words in a form `grammar.random_sentence` never writes (6 forms, uniformly)."""
    size, colour, shape = random_object(rng, False)
    form = rng.randrange(6)
    if form == 0:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape} moves {rng.choice(DIRECTIONS)}."
    if form == 1:
        return f"the {size} {colour} {shape} moves {rng.choice(DIRECTIONS)}."
    if form == 2:
        return f"the {colour} {shape} is {size}."
    if form == 3:
        return f"i see the {colour} {shape}."
    if form == 4:
        return f"the {shape} is {rng.choice(SIZES)}."
    _, colour2, shape2 = random_object(rng, False)
    return f"the {colour} {shape} and the {colour2} {shape2}."


def speech_clip_params(seed: int, split: str, i: int) -> dict:
    """Sentence, voice, speed and pitch of clip i of a split (its own RNG: independent of n); a question split's
    clips add the scene (`context`), the `answer` and the question `family`."""
    if split not in SPEECH_SPLITS:
        raise ValueError(f"unknown speech split {split!r}; expected one of {', '.join(SPEECH_SPLITS)}")
    rng = random.Random(f"mm.shapes.speech/{split}/{seed}/{i}")
    if split.startswith("questions_"):
        phrasings = ("canonical", "train") if split == "questions_train" else ("canonical",)
        context, question, answer, family = draw_question(
            rng, phrasings=phrasings, allow_heldout=split != "questions_train"
        )
        voice = {"voice": TRAIN_VOICE, "speed": rng.randint(*SPEED_WPM), "pitch": rng.randint(*PITCH)}
        return {"text": question, **voice, "context": context, "answer": answer, "family": family}
    if split == "train_scrambled":
        text = scrambled_sentence(rng)
        voice = {"voice": TRAIN_VOICE, "speed": rng.randint(*SPEED_WPM), "pitch": rng.randint(*PITCH)}
        return {"text": text, **voice, "asr_only": True}
    if split == "untrained_forms":
        text = untrained_sentence(rng)
        return {
            "text": text,
            "voice": TRAIN_VOICE,
            "speed": rng.randint(*SPEED_WPM),
            "pitch": rng.randint(*PITCH),
        }
    want_heldout = split == "heldout_sentences"
    while True:  # rejection sampling into the split's sentence partition
        text = random_sentence(rng, allow_heldout=False)
        if is_heldout_sentence(text) == want_heldout:
            break
    voice = TRAIN_VOICE
    if split == "heldout_voices":
        voice = HELDOUT_VOICES[i % len(HELDOUT_VOICES)]
    elif split == "untrained_voices":
        voice = UNTRAINED_VOICES[i % len(UNTRAINED_VOICES)]
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
        meta = {**params[i], "seconds": round(seconds, 4)}
        if "answer" not in meta and not meta.get("asr_only"):  # questions and scrambled words have none
            meta["spanish"] = to_spanish(params[i]["text"])
        return wav, meta

    return write_split(Path(out_dir) / "speech", split, n, shard_size, ("audio", "wav"), sample)


LONG_RECORDING_PAUSE_S = (0.6, 1.5)


def synth_long_recording(out_dir: str | os.PathLike[str], seconds: float = 60.0, seed: int = 0) -> Path:
    """Write `out_dir/speech/long_recording.wav`: sentences of the held-out partition (training voice) with
    pauses of 0.6-1.5 s between them until the recording is at least `seconds` long, and beside it
    `long_recording.json` (`sentences` in order, `text` = them joined, `seconds`, each sentence's `start`)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    rng = random.Random(f"mm.shapes.speech/long/{seed}")
    parts: list[np.ndarray] = []
    sentences: list[str] = []
    starts: list[float] = []
    total = 0
    while total < seconds * SAMPLE_RATE:
        while True:
            text = random_sentence(rng, allow_heldout=False)
            if is_heldout_sentence(text):
                break
        wav, _ = espeak_wave(text, TRAIN_VOICE, rng.randint(*SPEED_WPM), rng.randint(*PITCH))
        wave, _ = sf.read(io.BytesIO(wav), dtype="float32")
        if parts:
            pause = np.zeros(int(rng.uniform(*LONG_RECORDING_PAUSE_S) * SAMPLE_RATE), dtype=np.float32)
            parts.append(pause)
            total += pause.size
        starts.append(round(total / SAMPLE_RATE, 3))
        parts.append(wave)
        sentences.append(text)
        total += wave.size
    folder = Path(out_dir) / "speech"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "long_recording.wav"
    sf.write(path, np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    meta = {
        "audio": path.name,
        "sentences": sentences,
        "text": " ".join(sentences),
        "seconds": round(total / SAMPLE_RATE, 3),
        "starts": starts,
        "voice": TRAIN_VOICE,
    }
    (folder / "long_recording.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def merge_manifests(out_dir: str | os.PathLike[str], splits: list[str], name: str) -> Path:
    """Write `out_dir/speech/{name}.jsonl`: the records of the splits' manifests in order (one training manifest
    of several kinds of clips, e.g. sentences and spoken questions; the audio paths stay relative to the
    folder)."""
    folder = Path(out_dir) / "speech"
    lines: list[str] = []
    for split in splits:
        manifest = folder / f"{split}.jsonl"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} does not exist (write the {split!r} split first)")
        lines += [line for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = folder / f"{name}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
