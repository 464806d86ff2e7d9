"""Audio-text pairs: JSONL manifests and WebDataset shards of audio, decoded with soundfile, turned into 80-dim
log-mel features with torchaudio (Llama 3 paper §7.6; `paper-notes.md` §5: "80-dim log-mel features, 10 ms hop").

Storage is the media-text source's (`mm.datasets.media` with `audio_decoder`): a JSONL manifest names each clip
under `audio` (`{"audio": "train/000001.wav", "text": "the circle is red."}`), a WebDataset shard holds it as a
`.wav`, `.flac`, `.ogg` or `.mp3` member next to its text; either may give a `prompt` (the instruction before the
speech, e.g. `Translate the following sentence into French: ` for speech translation; default: the stage's ASR
prompt). Unlabeled audio (BEST-RQ) is read with `require_text=False`.

Features (`AudioFeatures`): decode (libsndfile through soundfile; we accept .wav/.flac/.ogg (Vorbis, Opus)/.mp3,
the lossy ones with their encoder delay removed by libsndfile), downmix multi-channel audio
to mono by averaging, resample to 16 kHz (`torchaudio.functional.resample`), 80 mel bins, 25 ms window, 10 ms hop,
log(mel + 1e-6), then per-utterance mean/variance normalisation of each bin (CMVN: removes the channel and
speaker's average spectrum). Audio longer than `max_seconds` is cropped to its first `max_seconds` (`crop`) or
rejected (`reject`). `spec_augment` (SpecAugment, Park et al. 2019) masks frequency bands and time spans.

Bad input follows the readers' policy (`mm.datasets.skips`): a missing, zero-byte, corrupt or truncated file, a
format soundfile cannot read or an extension we do not accept, audio shorter than `min_seconds`, a silent file
(peak below `silence_peak`) or an over-long one (with `reject`) is skipped, counted per reason and logged with
its path; a skipped fraction above `max_bad_fraction` (after `min_tried` samples) stops the run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from .media import MediaDecoder
from .seeding import derive_seed
from .skips import BadSample, read_media_file
from .text import IGNORE_INDEX

__all__ = [
    "AUDIO_EXTENSIONS",
    "SAMPLE_RATE",
    "AudioFeatures",
    "SpeechCollator",
    "audio_decoder",
    "audio_sample",
    "decode_audio",
    "spec_augment",
]

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")


# ------------------------------------------------------------------------------------------------ decoding


def decode_audio(source: str | os.PathLike[str] | bytes, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode audio (path or bytes) to a mono float32 waveform at `sample_rate`; raise BadSample if unusable."""
    name = "audio bytes"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        name = str(path)
        ext = path.suffix.lower().lstrip(".")
        if ext not in AUDIO_EXTENSIONS:
            raise BadSample("unsupported", f"extension .{ext}; accepted: {', '.join(AUDIO_EXTENSIONS)}")
        data = read_media_file(path)
    else:
        data = source
    if len(data) == 0:
        raise BadSample("empty", "zero-byte file")
    wave, sr = _read(data, name)
    if wave.shape[0] == 0:
        raise BadSample("empty", "no audio frames")
    if not np.isfinite(wave).all():
        raise BadSample("corrupt", "non-finite samples")
    mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))  # downmix: average the channels
    if sr != sample_rate:
        mono = torchaudio.functional.resample(mono, sr, sample_rate)
    return mono


def _looks_like_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync at the start."""
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


# How mpg123 (libsndfile's MP3 decoder) starts the lines it writes to stderr about a damaged stream.
_DECODER_LINES = ("Note:", "Warning:", "Error:", "[")  # "[" : "[src/libmpg123/parse.c:...]"
_FD2_LOCK = threading.Lock()


@contextlib.contextmanager
def _decoder_messages() -> Iterator[list[str]]:
    """Collect the MP3 decoder's reports: while the block runs, file descriptor 2 goes to a temporary file; then
    its decoder lines fill the list and any other line (another thread's) is written on to stderr. One thread at a
    time (the descriptor is the process's); where descriptor 2 is not open, nothing is collected."""
    messages: list[str] = []
    with _FD2_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to keep clean, nothing to collect
            yield messages
            return
        os.dup2(tmp.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = [line for line in tmp.read().decode("utf-8", "replace").splitlines() if line.strip()]
            messages.extend(line for line in lines if line.startswith(_DECODER_LINES))
            others = [line for line in lines if not line.startswith(_DECODER_LINES)]
            if others:
                os.write(2, ("\n".join(others) + "\n").encode())


def _read(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """(samples (n, channels) float32, rate) of a file's bytes; BadSample naming `name` if libsndfile cannot read
    them, or if its MP3 decoder reports a damaged stream (a truncated file, lost frames)."""
    mp3 = _looks_like_mp3(data)
    try:
        if not mp3:
            return sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        with _decoder_messages() as messages:
            out = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:  # sf.LibsndfileError: corrupt, truncated, unknown format
        why = f"{type(e).__name__}: {getattr(e, 'error_string', None) or e}"  # not the BytesIO's repr
        raise BadSample("corrupt", f"{name}: libsndfile cannot decode it ({why})") from None
    if messages:
        raise BadSample("corrupt", f"{name}: damaged MP3 stream (decoder: {'; '.join(messages[:2])})")
    return out


@dataclass
class AudioFeatures:
    """Waveform -> normalised 80-dim log-mel features (T, n_mels) at a 10 ms hop, with the length policy."""

    n_mels: int = 80
    max_seconds: float = 20.0
    too_long: str = "crop"  # crop | reject
    min_seconds: float = 0.1
    silence_peak: float = 1e-4  # peak |amplitude| below this counts as a silent file
    normalize: bool = True  # per-utterance mean/variance normalisation per mel bin

    def __post_init__(self) -> None:
        if self.too_long not in ("crop", "reject"):
            raise ValueError(f"too_long={self.too_long!r}; allowed: crop, reject")
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, win_length=400, hop_length=160, n_mels=self.n_mels
        )

    def __repr__(self) -> str:
        return (
            f"AudioFeatures(n_mels={self.n_mels}, max_seconds={self.max_seconds}, too_long={self.too_long}, "
            f"min_seconds={self.min_seconds}, silence_peak={self.silence_peak}, normalize={self.normalize})"
        )

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz waveform (n,) -> features (T, n_mels); raise BadSample for silent/short/long audio."""
        seconds = wave.numel() / SAMPLE_RATE
        if seconds < self.min_seconds:
            raise BadSample("too_short", f"{seconds:.3f} s < min_seconds={self.min_seconds}")
        if float(wave.abs().max()) < self.silence_peak:
            raise BadSample("silent", f"peak amplitude {float(wave.abs().max()):.2e} < {self.silence_peak}")
        if seconds > self.max_seconds:
            if self.too_long == "reject":
                raise BadSample("too_long", f"{seconds:.2f} s > max_seconds={self.max_seconds}")
            wave = wave[: int(self.max_seconds * SAMPLE_RATE)]
        with torch.no_grad():
            feats = (self._mel(wave.float()) + 1e-6).log().T  # (T, n_mels)
            if self.normalize:
                feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
        return feats.contiguous()

    def load(self, source: str | os.PathLike[str] | bytes) -> torch.Tensor:
        """Decode and featurise one file (path or bytes)."""
        return self(decode_audio(source))


def spec_augment(
    feats: torch.Tensor,
    generator: torch.Generator,
    *,
    freq_masks: int = 2,
    freq_width: int = 10,
    time_masks: int = 2,
    time_width: float = 0.05,
) -> torch.Tensor:
    """SpecAugment on (T, F) features: `freq_masks` bands of up to `freq_width` bins and `time_masks` spans of
    up to `time_width` x T frames set to 0 (the normalised mean); returns a new tensor."""
    out = feats.clone()
    T, F = out.shape
    for _ in range(freq_masks):
        w = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
        f0 = int(torch.randint(0, max(1, F - w), (1,), generator=generator))
        out[:, f0 : f0 + w] = 0
    max_t = max(1, int(time_width * T))
    for _ in range(time_masks):
        w = int(torch.randint(0, max_t + 1, (1,), generator=generator))
        t0 = int(torch.randint(0, max(1, T - w), (1,), generator=generator))
        out[t0 : t0 + w] = 0
    return out


# ---------------------------------------------------------------------------------------------- the source


def audio_sample(
    media: str | os.PathLike[str] | bytes, *, features: AudioFeatures, keep_wave: bool = False
) -> dict[str, Any]:
    """The `features` of a clip from a file path or the file's bytes (and its 16 kHz `wave` with `keep_wave`);
    raise BadSample if unusable."""
    wave = decode_audio(media)
    return {"features": features(wave), "wave": wave} if keep_wave else {"features": features(wave)}


def audio_decoder(features: AudioFeatures | None = None, *, keep_wave: bool = False) -> MediaDecoder:
    """The media-text source's decoder of audio: log-mel `features` (T, n_mels) by `features` (default
    `AudioFeatures()`), and with `keep_wave` the decoded waveform too (for audio conditions applied later)."""
    features = features or AudioFeatures()
    decode = functools.partial(audio_sample, features=features, keep_wave=keep_wave)
    transform: Any = (features, "wave") if keep_wave else features  # the cache key tells the two apart
    return MediaDecoder("audio", AUDIO_EXTENSIONS, decode, "mm.audio.order", "clips", transform=transform)


# ------------------------------------------------------------------------------------------------- collate


class SpeechCollator:
    """Samples -> a speech-stage batch. Row layout (paper §7.6, speech spliced in as token embeddings):

        <|begin_of_text|> <|speech_start|> [n speech slots] <|speech_end|> prompt text <|end_of_text|> pad...

    A spoken-question row (a sample with a `context`, the prompt `DIALOGUE_PROMPT`) has the context's text between
    `<|begin_of_text|>` and `<|speech_start|>` and no prompt after `<|speech_end|>`: the layout of the corpus's
    question lines `{scene} {question} {answer}`, the speech in the question's place.

    The speech comes first and the prompt follows it, as the LM text corpus's repeat lines have it
    (`{sentence} Repeat after me in English: {sentence}`, the demo's text corpus): the frozen LM has learned there
    to copy what precedes the prompt, and the speech embeddings take the first sentence's place.

    `n` = the number of adapter outputs for the clip (`n_slots(T)`); the slots hold `pad_id` in `tokens` and are
    marked in `speech_mask`. `labels[t]` is the token at t+1 where that is a text token or `<|end_of_text|>`, -100
    elsewhere. The prompt's trailing whitespace is tokenized with the text (as the LM corpus has it). Returns tokens, labels,
    speech_mask (B, L), features (B, T_max, 80) zero-padded and feature_lengths (B,), and the CTC targets: the
    transcript's token ids (B, S_max) zero-padded with ctc_lengths (B,) (a sample's `ctc_text` when it has one; else
    0 for rows whose prompt is not the ASR one).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt: str,
        n_slots: Any,
        *,
        augment: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.tok, self.prompt, self.n_slots = tokenizer, prompt, n_slots
        self.augment, self.seed = augment, seed
        self.generator = torch.Generator().manual_seed(seed)  # for samples without a stream position

    def _prompt(self, prompt: str | None) -> tuple[str, str]:
        """(prompt head, trailing whitespace): the whitespace is tokenized with the text, as in the LM corpus."""
        p = self.prompt if prompt is None else prompt
        head = p.rstrip()
        return head, p[len(head) :]

    def prefix(self, prompt: str | None, n: int, context: str = "") -> tuple[list[int], list[bool]]:
        """Token ids and slot flags of `<bos> context <|speech_start|> [n slots] <|speech_end|> prompt` (no
        context text when empty; nothing after the speech for a whitespace prompt, `DIALOGUE_PROMPT`)."""
        tok = self.tok
        head = self._prompt(prompt)[0]
        before = [tok.bos_id, *(tok.encode(context.strip()) if context.strip() else []), tok.speech_start_id]
        # " prompt": in the corpus the prompt follows the repeated sentence after a space.
        after = [tok.speech_end_id, *(tok.encode(" " + head) if head else [])]
        flags = [False] * len(before) + [True] * n + [False] * len(after)
        return [*before, *([tok.pad_id] * n), *after], flags

    def text_ids(self, prompt: str | None, text: str) -> list[int]:
        """Token ids of the target text as it follows the prompt (without the end token)."""
        return self.tok.encode(self._prompt(prompt)[1] + text.strip())

    def sample_generator(self, sample: dict[str, Any]) -> torch.Generator:
        """A sample's SpecAugment generator: seeded from (seed, its stream `position`), so its masks do not
        depend on the batch it lands in or on the process that reads it; the collator's own generator for a
        sample without a position."""
        if "position" not in sample:
            return self.generator
        return torch.Generator().manual_seed(
            derive_seed("mm.specaugment", self.seed, int(sample["position"]))
        )

    def features(self, samples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded features (B, T_max, F) and lengths (B,) (SpecAugment applied when configured, per sample)."""
        feats = [s["features"].float() for s in samples]
        if self.augment is not None:
            gens = [self.sample_generator(s) for s in samples]
            feats = [spec_augment(f, g, **self.augment) for f, g in zip(feats, gens, strict=True)]
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
        out = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
        for b, f in enumerate(feats):
            out[b, : f.shape[0]] = f
        return out, lengths

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate one training batch."""
        feats, lengths = self.features(samples)
        rows, starts, masks, ctc = [], [], [], []
        for s, n_frames in zip(samples, lengths.tolist(), strict=True):
            # CTC targets: the transcript as the LM corpus starts a repeat line with it (ASR rows, or a row's
            # own `ctc_text`, e.g. a translation row's English transcript; else none: length 0)
            asr = s.get("prompt") is None or s.get("prompt") == self.prompt
            ctc_text = s.get("ctc_text", s["text"] if asr else None)
            ctc.append(self.tok.encode(ctc_text.strip()) if ctc_text is not None else [])
            ids, flags = self.prefix(s.get("prompt"), int(self.n_slots(n_frames)), s.get("context", ""))
            target = [*self.text_ids(s.get("prompt"), s["text"]), self.tok.eos_id]
            rows.append(ids + target)
            starts.append(len(ids))
            masks.append(flags)
        L = max(len(r) for r in rows)
        B = len(rows)
        tokens = torch.full((B, L), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        smask = torch.zeros(B, L, dtype=torch.bool)
        for b, (r, start, m) in enumerate(zip(rows, starts, masks, strict=True)):
            t = torch.tensor(r)
            tokens[b, : len(r)] = t
            labels[b, start - 1 : len(r) - 1] = t[start:]  # position t predicts token t+1
            smask[b, : len(m)] = torch.tensor(m)
        ctc_targets = torch.zeros(B, max(1, max(len(c) for c in ctc)), dtype=torch.long)
        for b, c in enumerate(ctc):
            ctc_targets[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        return {
            "tokens": tokens,
            "labels": labels,
            "speech_mask": smask,
            "features": feats,
            "feature_lengths": lengths,
            "ctc_targets": ctc_targets,
            "ctc_lengths": torch.tensor([len(c) for c in ctc], dtype=torch.long),
        }
