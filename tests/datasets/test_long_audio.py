"""Long audio cut on silence: pieces no longer than the encoder's window, cut inside pauses, in order, covering
every burst of sound (clean, noisy, and spoken by espeak-ng); a window with no pause cut at its quietest frame;
bad input refused with a clear ValueError."""

import functools
import math
import shutil

import numpy as np
import pytest
import torch

from mm.datasets.audio import SAMPLE_RATE, AudioFeatures, decode_audio
from mm.datasets.audio_conditions import add_noise, insert_silence
from mm.datasets.long_audio import split_on_silence

SR = SAMPLE_RATE
MAX_SECONDS = AudioFeatures().max_seconds  # the speech stage's window (20 s)
PAUSES = [0.5, 0.35, 1.2, 0.4, 2.0, 0.6, 0.31, 1.5, 0.8, 0.45, 1.0, 0.7, 0.5, 0.9, 0.4]


@functools.cache
def bursts(seconds: float = 60.0, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Tone bursts of 1.5-4 s (pitch and syllable-rate envelope varying) separated by pauses of 0.31-2 s."""
    g = torch.Generator().manual_seed(seed)
    parts, spans, t, i = [], [], int(0.3 * SR), 0
    parts.append(torch.zeros(t))
    while t < (seconds - 4.5) * SR:
        n = int((1.5 + 2.5 * float(torch.rand(1, generator=g))) * SR)
        f = 150 + 500 * float(torch.rand(1, generator=g))
        k = torch.arange(n) / SR
        parts.append(
            0.3 * torch.sin(2 * math.pi * f * k) * (0.3 + 0.7 * torch.sin(2 * math.pi * 3 * k).abs())
        )
        spans.append((t, t + n))
        gap = int(PAUSES[i % len(PAUSES)] * SR)
        parts.append(torch.zeros(gap))
        t, i = t + n + gap, i + 1
    wave = torch.cat(parts)
    return torch.cat([wave, torch.zeros(int(seconds * SR) - wave.numel())]), spans


def check_pieces(pieces, spans, n, max_seconds):
    assert pieces, "no pieces"
    for a, b in pieces:
        assert 0 <= a < b <= n and b - a <= max_seconds * SR
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(pieces, pieces[1:]))  # in order, no overlap
    for a, b in pieces[1:]:  # every cut falls inside a pause, never inside a burst
        for s, e in spans:
            assert not s < a < e and not s < b < e
    covered = np.zeros(n, dtype=bool)
    for a, b in pieces:
        covered[a:b] = True
    for s, e in spans:
        assert covered[s:e].all(), f"burst {s / SR:.2f}-{e / SR:.2f} s not covered"


@pytest.mark.parametrize("snr", [None, 10.0, 5.0])
@pytest.mark.parametrize("max_seconds", [MAX_SECONDS, 7.0])
def test_sixty_seconds_of_bursts_are_cut_inside_pauses_in_order(snr, max_seconds):
    wave, spans = bursts()
    if snr is not None:
        wave = add_noise(wave, snr, torch.Generator().manual_seed(0))
    pieces = split_on_silence(wave, SR, max_seconds)
    check_pieces(pieces, spans, wave.numel(), max_seconds)
    assert len(pieces) >= math.ceil(60 / max_seconds)
    assert pieces[0][0] == 0 and pieces[-1][1] >= spans[-1][1]
    # consecutive: no pause here is long enough to leave a piece of silence only (but the tail may be one)
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(pieces, pieces[1:]))


def test_the_cut_goes_to_the_longest_quiet_pause_of_the_window_second_half():
    wave, spans = bursts()
    pieces = split_on_silence(wave, SR, MAX_SECONDS)
    first_end = pieces[0][1]
    pauses = [(e, s) for (_, e), (s, _) in zip(spans, spans[1:])]  # (pause start, pause end)
    inside = [p for p in pauses if p[1] <= MAX_SECONDS * SR and p[0] >= MAX_SECONDS * SR / 2]
    longest = max(inside, key=lambda p: p[1] - p[0])
    assert longest[0] < first_end < longest[1]
    assert abs(first_end - (longest[0] + longest[1]) / 2) < 0.02 * SR  # in its middle


def test_every_pause_gives_one_piece_per_burst():
    wave, spans = bursts()
    pieces = split_on_silence(wave, SR, MAX_SECONDS, every_pause=True)
    check_pieces(pieces, spans, wave.numel(), MAX_SECONDS)
    assert len(pieces) == len(spans)
    assert all(a <= s and e <= b for (a, b), (s, e) in zip(pieces, spans))


def test_a_window_without_a_pause_is_cut_at_its_lowest_energy_frame():
    t = torch.arange(25 * SR) / SR
    wave = (0.05 + 0.25 * (t - 13.0).abs() / 13.0) * torch.sin(2 * math.pi * 300 * t)
    pieces = split_on_silence(wave, SR, MAX_SECONDS, threshold_db=-100.0)  # nothing is silent
    assert [a for a, _ in pieces] == [0, pieces[0][1]] and pieces[1][1] == wave.numel()
    assert abs(pieces[0][1] / SR - 13.0) <= 0.02


def test_silence_only_pieces_are_left_out_and_short_input_is_one_piece():
    tone = 0.2 * torch.sin(2 * math.pi * 220 * torch.arange(2 * SR) / SR)
    assert split_on_silence(tone, SR, MAX_SECONDS) == [(0, tone.numel())]
    long = insert_silence(tone, 45.0, 2.0)  # 2 s of sound, then 45 s of silence
    pieces = split_on_silence(long, SR, MAX_SECONDS)
    assert len(pieces) == 1 and pieces[0][0] == 0 and 2 * SR <= pieces[0][1] <= MAX_SECONDS * SR
    assert split_on_silence(torch.zeros(30 * SR), SR, MAX_SECONDS) == []


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_sentences_with_pauses_are_cut_between_sentences():
    from mm.world.speech import espeak_wave

    sentences = [
        "a large red circle and a small blue square",
        "the green triangle moves left",
        "a small yellow circle",
        "the purple square is on the right of the orange triangle",
        "a large blue triangle moves up",
    ]
    waves, spans, t = [], [], 0
    for i, s in enumerate(sentences * 3):
        w = decode_audio(espeak_wave(s, "en-us", 160, 50)[0])
        pause = torch.zeros(int((0.6 + 0.3 * (i % 4)) * SR))
        waves += [w, pause]
        sound = torch.nonzero(
            w.abs() > 0.01
        ).flatten()  # the speech, without espeak-ng's own lead-in and tail
        spans.append((t + int(sound[0]), t + int(sound[-1]) + 1))
        t += w.numel() + pause.numel()
    wave = torch.cat(waves)
    pieces = split_on_silence(wave, SR, 10.0)
    check_pieces(pieces, spans, wave.numel(), 10.0)
    one_each = split_on_silence(wave, SR, MAX_SECONDS, min_silence_s=0.5, every_pause=True)
    assert len(one_each) == len(spans)  # espeak-ng's own pauses inside a sentence are shorter than 0.5 s


@pytest.mark.parametrize(
    "wave, rate, message",
    [
        (torch.zeros(0), SR, "non-empty 1-D"),
        (torch.zeros(2, 1000), SR, "non-empty 1-D"),
        (torch.tensor([0.0, float("nan"), 0.1] * 100), SR, "NaN"),
        (torch.zeros(1000), 8000, "sample_rate=8000; expected 16000"),
        ([0.0] * 100, SR, "got list"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(wave, rate, message):
    with pytest.raises(ValueError, match=message):
        split_on_silence(wave, rate, MAX_SECONDS)


def test_bad_lengths_are_refused():
    w = torch.zeros(SR)
    with pytest.raises(ValueError, match="max_seconds=0"):
        split_on_silence(w, SR, 0)
    with pytest.raises(ValueError, match="min_silence_s=30"):
        split_on_silence(w, SR, 20.0, min_silence_s=30)
