"""Audio as users have it: noise at an exact SNR (white, pink, babble), level, the telephone band, inserted
silences, MP3/OGG through the reader's own decoder (bytes and files; damaged files refused quietly), the named
conditions (seeded, deterministic) and bad input refused with a clear ValueError."""

import math
import shutil

import numpy as np
import pytest
import torch

from mm.datasets.audio import SAMPLE_RATE, AudioFeatures, decode_audio
from mm.datasets.audio_conditions import (
    CONDITIONS,
    add_noise,
    apply_condition,
    encode,
    encode_decode,
    insert_silence,
    rms_dbfs,
    set_level,
    telephone,
)
from mm.datasets.skips import BadSample

SR = SAMPLE_RATE


def speechlike(seconds: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Harmonics of a gliding 120-220 Hz pitch under a syllable-rate envelope, with a pause in the middle."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    f0 = 120 + 100 * t / seconds
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    x = sum((0.5 / k) * torch.sin(k * phase + float(torch.rand(1, generator=g)) * 6) for k in range(1, 12))
    env = torch.sin(2 * math.pi * 4 * t).abs()
    env[(t > 0.45 * seconds) & (t < 0.55 * seconds)] = 0
    return (0.3 * x * env / x.abs().max()).float()


def band_power(x: torch.Tensor, lo: float, hi: float) -> float:
    spec = torch.fft.rfft(x.double()).abs().pow(2)
    f = torch.fft.rfftfreq(x.numel(), 1 / SR)
    return float(spec[(f >= lo) & (f < hi)].sum())


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return 10 * math.log10(
        float(clean.double().pow(2).sum()) / float((noisy.double() - clean.double()).pow(2).sum())
    )


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
@pytest.mark.parametrize("snr", [20.0, 10.0, 5.0, -3.0])
def test_noise_is_added_at_the_exact_snr(kind, snr):
    w = speechlike()
    noisy = add_noise(w, snr, torch.Generator().manual_seed(1), kind)
    assert noisy.shape == w.shape and noisy.dtype == torch.float32
    assert abs(measured_snr(w, noisy) - snr) < 0.1
    again = add_noise(w, snr, torch.Generator().manual_seed(1), kind)
    other = add_noise(w, snr, torch.Generator().manual_seed(2), kind)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_noise_kinds_have_their_spectra():
    w = speechlike()
    noise = {k: add_noise(w, 0.0, torch.Generator().manual_seed(0), k) - w for k in ("white", "pink")}
    # white: equal power per Hz; pink: 1/f, so 4-8 kHz holds far less than 250-500 Hz
    white_ratio = band_power(noise["white"], 4000, 8000) / band_power(noise["white"], 250, 500)
    pink_ratio = band_power(noise["pink"], 4000, 8000) / band_power(noise["pink"], 250, 500)
    assert 14 < white_ratio < 18  # 4000 Hz of band against 250 Hz
    assert 0.5 < pink_ratio < 1.5  # an octave each: equal power
    with pytest.raises(ValueError, match="allowed: white, pink, babble"):
        add_noise(w, 10.0, torch.Generator(), "brown")
    with pytest.raises(ValueError, match="digital silence"):
        add_noise(torch.zeros(1000), 10.0, torch.Generator())


def test_level_is_set_in_dbfs_and_loud_audio_clips():
    w = speechlike()
    quiet = set_level(w, -35.0)
    assert abs(rms_dbfs(quiet) - (-35.0)) < 0.01
    assert torch.allclose(quiet / quiet.abs().max(), w / w.abs().max(), atol=1e-5)  # scaled, not reshaped
    loud = set_level(w, -6.0)
    assert float(loud.abs().max()) == 1.0 and int((loud.abs() == 1).sum()) > 100  # the recorder clipped
    assert abs(rms_dbfs(set_level(w, -6.0, clip=False)) - (-6.0)) < 0.01
    with pytest.raises(ValueError, match="<= 0 dB"):
        set_level(w, 3.0)


def test_telephone_keeps_300_to_3400_hz_and_removes_everything_above_4_khz():
    noise = torch.randn(SR * 2, generator=torch.Generator().manual_seed(0)) * 0.1
    out = telephone(noise)
    assert out.shape == noise.shape
    total = band_power(out, 0, SR / 2)
    assert band_power(out, 4000, SR / 2) / total < 1e-4  # the 8 kHz rate leaves nothing above 4 kHz
    assert band_power(out, 0, 150) / band_power(noise, 0, 150) < 0.02  # below the band: attenuated
    assert band_power(out, 600, 3000) / band_power(noise, 600, 3000) > 0.7  # the band passes
    tone = 0.3 * torch.sin(2 * math.pi * 1000 * torch.arange(SR) / SR)
    tel = telephone(tone, mu_law=False)
    assert abs(rms_dbfs(tel[1000:-1000]) - rms_dbfs(tone)) < 1.0  # a 1 kHz tone keeps its level (the
    assert band_power(tel, 950, 1050) / band_power(tel, 0, SR / 2) > 0.999  # filters only shift its phase)
    assert telephone(tone)[1000:-1000].sub(tel[1000:-1000]).abs().max() > 1e-4  # mu-law quantises


def test_insert_silence_places_zeros_and_keeps_every_sample():
    w = speechlike(1.0)
    out = insert_silence(w, [0.5, 0.25], [0.0, 0.6])
    assert out.numel() == w.numel() + int(0.75 * SR)
    assert torch.equal(out[: SR // 2], torch.zeros(SR // 2))
    assert torch.equal(out[SR // 2 : SR // 2 + int(0.6 * SR)], w[: int(0.6 * SR)])
    mid = SR // 2 + int(0.6 * SR)
    assert torch.equal(out[mid : mid + SR // 4], torch.zeros(SR // 4))
    assert torch.equal(out[mid + SR // 4 :], w[int(0.6 * SR) :])
    with pytest.raises(ValueError, match="outside the clip"):
        insert_silence(w, 1.0, 2.0)
    with pytest.raises(ValueError, match="2 lengths for 1 places"):
        insert_silence(w, [1.0, 2.0], 0.5)


@pytest.mark.parametrize("fmt", ["mp3", "ogg"])
def test_lossy_files_round_trip_through_decode_audio(fmt, tmp_path):
    w = speechlike(3.0)
    data = encode(w, fmt)
    assert data[:4] == (b"OggS" if fmt == "ogg" else data[:4]) and len(data) < w.numel()  # compressed
    path = tmp_path / f"clip.{fmt}"
    path.write_bytes(data)
    for back in (decode_audio(data), decode_audio(path), encode_decode(w, fmt)):
        assert abs(back.numel() - w.numel()) <= 0.005 * SR  # within 5 ms
        n = min(back.numel(), w.numel())
        assert np.corrcoef(w[:n].numpy(), back[:n].numpy())[0, 1] > 0.98
    assert not torch.equal(decode_audio(path)[: w.numel()], w)  # lossy: not the same samples


def test_damaged_mp3_is_refused_naming_the_file_and_nothing_reaches_stderr(tmp_path, capfd):
    data = encode(speechlike(3.0), "mp3")
    cases = {
        "truncated.mp3": data[: len(data) // 2],
        "garbled.mp3": data[:400]
        + bytes(np.random.default_rng(0).integers(0, 256, 800, dtype=np.uint8))
        + data[1200:],
        "text.mp3": b"not audio at all\n" * 50,
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(BadSample) as e:
            decode_audio(tmp_path / name)
        assert e.value.reason == "corrupt" and str(tmp_path / name) in e.value.detail
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_conditions_are_deterministic_per_seed_and_change_the_audio():
    w = speechlike(2.0)
    assert set(CONDITIONS) >= {
        "clean",
        "snr20",
        "snr10",
        "snr5",
        "quiet",
        "loud",
        "telephone",
        "mp3",
        "ogg",
        "silences",
    }
    seeded = {"snr20", "snr10", "snr5", "babble10", "silences"}
    for name in CONDITIONS:
        a, b = apply_condition(name, w, seed=3), apply_condition(name, w, seed=3)
        assert a.dim() == 1 and a.dtype == torch.float32 and bool(torch.isfinite(a).all()), name
        assert torch.equal(a, b), name
        if name == "clean":
            assert torch.equal(a, w)
        elif a.shape == w.shape:
            assert not torch.equal(a, w), name
        if name in seeded:
            assert not torch.equal(a, apply_condition(name, w, seed=4)), name
    assert abs(measured_snr(w, apply_condition("snr10", w, 0)) - 10) < 0.1
    long = apply_condition("silences", w, seed=0)
    assert 3.0 * SR <= long.numel() - w.numel() <= 6.5 * SR
    assert int((long == 0).sum()) >= 3.0 * SR and torch.equal(
        long[long != 0], w[w != 0]
    )  # speech kept, in order
    with pytest.raises(ValueError, match="known: clean, snr20"):
        apply_condition("underwater", w, 0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(0), "empty waveform"),
        (torch.tensor([0.1, float("nan"), 0.2]), "NaN"),
        (torch.zeros(2, 100), "1-D mono"),
        (torch.zeros(100, dtype=torch.int16), "float samples"),
        ([0.1, 0.2], "got list"),
    ],
)
def test_bad_waves_are_refused_with_a_clear_error(bad, message):
    for fn in (lambda x: add_noise(x, 10.0, torch.Generator()), lambda x: set_level(x, -20.0), telephone):
        with pytest.raises(ValueError, match=message):
            fn(bad)
    with pytest.raises(ValueError, match=message):
        apply_condition("clean", bad, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        telephone(speechlike(0.5), sample_rate=4000)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_every_condition_of_a_spoken_sentence_still_makes_features():
    from mm.world.speech import espeak_wave

    w = decode_audio(espeak_wave("the red circle moves down", "en-us", 160, 50)[0])
    features = AudioFeatures()
    clean = features(w)
    for name in CONDITIONS:
        out = apply_condition(name, w, seed=0)
        f = features(out)  # no BadSample: not silent, not too short, not too long
        assert f.shape[1] == 80 and bool(torch.isfinite(f).all()), name
        if name in ("mp3", "ogg", "quiet", "telephone"):
            assert abs(f.shape[0] - clean.shape[0]) <= 1, name  # same length (10 ms frames)
