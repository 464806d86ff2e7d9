"""Audio data: decoding (downmix, resampling), 80-dim log-mel at 10 ms, crop/reject, SpecAugment, the bad-input
policy (skipped, counted, logged with the path), shards with a prompt, the speech collator's row layout, and the
spoken shapes world (espeak-ng; held-out sentences never in train; a clear message when espeak-ng is missing)."""

import io
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from mm.datasets.audio import (
    AudioFeatures,
    SpeechCollator,
    audio_decoder,
    decode_audio,
    spec_augment,
)
from mm.datasets.media import MediaTextDataset, iter_webdataset
from mm.datasets.skips import BadSample, SkipStats
from mm.lm import Tokenizer
from mm.prompts import ASR_PROMPT
from mm.world.speech import (
    HELDOUT_VOICES,
    EspeakMissing,
    is_heldout_sentence,
    speech_clip_params,
    synth_speech,
)


def tone(seconds: float, sr: int, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * math.pi * 440 * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt)
    return buf.getvalue()


def test_decode_downmixes_and_resamples_to_16k(tmp_path):
    stereo = tone(0.5, 44100, channels=2)
    stereo[:, 1] = 0  # average of the channels = half the left one
    p = tmp_path / "a.wav"
    p.write_bytes(wav_bytes(stereo, 44100))
    w = decode_audio(p)
    assert w.dim() == 1 and w.numel() == 8000  # 0.5 s at 16 kHz
    assert 0.13 < float(w.abs().max()) < 0.17  # 0.3 / 2
    f = tmp_path / "a.flac"
    f.write_bytes(wav_bytes(tone(0.25, 8000), 8000, "FLAC"))
    assert decode_audio(f).numel() == 4000


def test_features_are_80_dim_at_10ms_normalised_and_cropped_or_rejected():
    feats = AudioFeatures()(decode_audio(wav_bytes(tone(1.0, 16000), 16000)))
    assert feats.shape == (101, 80)
    assert torch.allclose(feats.mean(0), torch.zeros(80), atol=1e-4)
    long = decode_audio(wav_bytes(tone(3.0, 16000), 16000))
    assert AudioFeatures(max_seconds=2.0)(long).shape[0] == 201
    with pytest.raises(BadSample, match="too_long"):
        AudioFeatures(max_seconds=2.0, too_long="reject")(long)


def test_spec_augment_masks_bands_and_spans_deterministically():
    x = torch.randn(200, 80) + 5
    a = spec_augment(x, torch.Generator().manual_seed(0), freq_width=10, time_width=0.1)
    b = spec_augment(x, torch.Generator().manual_seed(0), freq_width=10, time_width=0.1)
    assert torch.equal(a, b) and (a == 0).any() and not (x == 0).any()


def test_collator_spec_augment_is_per_sample_whatever_the_batch():
    augment = {"freq_masks": 2, "freq_width": 10, "time_masks": 2, "time_width": 0.1}
    torch.manual_seed(0)
    samples = [
        {"features": torch.randn(T, 80) + 5, "position": 40 + i} for i, T in enumerate([120, 90, 150, 60])
    ]
    full, lengths = SpeechCollator(None, "", lambda n: 0, augment=augment, seed=3).features(samples)
    assert lengths.tolist() == [120, 90, 150, 60]
    for b, s in enumerate(samples):  # every clip is augmented, and only inside its own frames
        assert (full[b, : s["features"].shape[0]] == 0).any() and not (full[b, lengths[b] :] != 0).any()
    for half in (samples[:2], samples[2:]):  # the same clips collated by another process's collator
        part, n = SpeechCollator(None, "", lambda n: 0, augment=augment, seed=3).features(half)
        for row, s in zip(part, half, strict=True):
            b, T = s["position"] - 40, s["features"].shape[0]
            assert torch.equal(row[:T], full[b, :T])
    moved = [{**s, "position": s["position"] + 100} for s in samples]
    other, _ = SpeechCollator(None, "", lambda n: 0, augment=augment, seed=3).features(moved)
    assert not torch.equal(other, full)
    # A sample without a position falls back to the collator's own generator (still seeded).
    bare = [{"features": s["features"]} for s in samples]
    a, _ = SpeechCollator(None, "", lambda n: 0, augment=augment, seed=3).features(bare)
    b, _ = SpeechCollator(None, "", lambda n: 0, augment=augment, seed=3).features(bare)
    assert torch.equal(a, b) and (a == 0).any()


def test_bad_audio_is_skipped_counted_and_logged_with_its_path(tmp_path, caplog, faults):
    good = wav_bytes(tone(0.5, 22050), 22050)
    files = {
        "good0.wav": good,
        "good1.wav": wav_bytes(tone(0.5, 16000, channels=2), 16000),
        "corrupt.wav": b"RIFF\x00\x00not really audio" * 10,
        "truncated.wav": good[:30],
        "empty.wav": b"",
        "silent.wav": wav_bytes(np.zeros(16000, dtype=np.float32), 16000),
        "clip.aac": good,
    }
    lines = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        lines.append(json.dumps({"audio": name, "text": "the circle is red."}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = MediaTextDataset(tmp_path / "m.jsonl", audio_decoder(), max_bad_fraction=1.0)
    with caplog.at_level("WARNING"):
        out = [ds.load(i) for i in range(len(ds))]
    assert [s is not None for s in out] == [True, True, False, False, False, False, False]
    st = ds.stats.as_dict()
    assert st["tried"] == 7 and st["skipped"] == 5
    assert st["skipped_by_reason"] == {"corrupt": 2, "empty": 1, "silent": 1, "unsupported": 1}
    assert str(tmp_path / "silent.wav") in caplog.text and str(tmp_path / "clip.aac") in caplog.text
    faults.record("corrupt", st["skipped"], what="wav (corrupt, truncated, empty, silent, unsupported)")


def test_shards_read_wav_flac_text_and_prompt_and_skip_bad_members(tmp_path, faults):
    shard = tmp_path / "s-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [
            ("a.wav", wav_bytes(tone(0.4, 16000), 16000)),
            ("a.txt", b"the square is blue."),
            ("b.flac", wav_bytes(tone(0.4, 16000), 16000, "FLAC")),
            (
                "b.json",
                json.dumps({"text": "le carre est bleu.", "prompt": "Translate into French: "}).encode(),
            ),
            ("c.wav", b"broken"),
            ("c.txt", b"x"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    stats = SkipStats(1.0)
    got = list(iter_webdataset(shard, audio_decoder(), stats=stats))
    assert [(s["key"], s["text"], s["prompt"]) for s in got] == [
        ("a", "the square is blue.", None),
        ("b", "le carre est bleu.", "Translate into French: "),
    ]
    assert got[0]["features"].shape == (41, 80)
    assert stats.skipped["corrupt"] == 1
    faults.record("corrupt", stats.n_skipped, what="audio shard member (flac/wav tar)")


def test_collator_splices_slots_between_speech_tokens_and_labels_only_the_text(tmp_path):
    tok = Tokenizer.train(["repeat after me in english: the circle is red."] * 20, 300)
    col = SpeechCollator(tok, ASR_PROMPT, lambda n: (n // 4 + 1) // 2)
    s = {"features": torch.randn(100, 80), "text": "the circle is red.", "prompt": None}
    b = col([s, {**s, "features": torch.randn(60, 80), "prompt": "Translate: "}])
    toks, labels, mask = b["tokens"][0], b["labels"][0], b["speech_mask"][0]
    start = toks.tolist().index(tok.speech_start_id)
    end = toks.tolist().index(tok.speech_end_id)
    assert start == 1 and toks[0] == tok.bos_id  # the speech first, then the prompt (as the corpus's repeats)
    assert mask.sum() == 13 == end - start - 1 and mask[start + 1 : end].all()
    prompt = tok.encode(" " + ASR_PROMPT.rstrip())
    assert toks[end + 1 : end + 1 + len(prompt)].tolist() == prompt
    text = tok.encode(" the circle is red.") + [tok.eos_id]
    p = end + len(prompt)  # the prompt's last token predicts the first text token
    assert labels[p : p + len(text)].tolist() == text  # position t predicts token t + 1
    assert (labels[:p] == -100).all()
    assert b["speech_mask"][1].sum() == 8 and b["feature_lengths"].tolist() == [100, 60]


def test_held_out_sentences_never_in_the_train_partition():
    train = [speech_clip_params(0, "train", i) for i in range(300)]
    held = [speech_clip_params(0, "heldout_sentences", i) for i in range(60)]
    voices = [speech_clip_params(0, "heldout_voices", i) for i in range(14)]
    assert not {p["text"] for p in train} & {p["text"] for p in held}
    assert all(is_heldout_sentence(p["text"]) for p in held)
    assert {p["voice"] for p in train + held} == {"en-us"} and {p["voice"] for p in voices} == set(
        HELDOUT_VOICES
    )
    for p in train + held + voices:
        assert 140 <= p["speed"] <= 180 and 30 <= p["pitch"] <= 70
        for c, s in (("green", "triangle"), ("purple", "circle"), ("orange", "square")):
            assert f"{c} {s}" not in p["text"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_synth_speech_writes_16k_mono_wavs_manifest_and_shards_reproducibly(tmp_path):
    m = synth_speech(tmp_path / "a", n=3, split="heldout_voices")
    m2 = synth_speech(tmp_path / "b", n=3, split="heldout_voices")
    recs = [json.loads(line) for line in m.read_text().splitlines()]
    assert len(recs) == 3 and m.read_bytes() == m2.read_bytes()
    for r in recs:
        data, sr = sf.read(m.parent / r["audio"])
        assert sr == 16000 and data.ndim == 1 and abs(len(data) / sr - r["seconds"]) < 1e-3
        assert (m.parent / r["audio"]).read_bytes() == (m2.parent / r["audio"]).read_bytes()
    assert [s["text"] for s in iter_webdataset(m.parent / "heldout_voices-00000.tar", audio_decoder())] == [
        r["text"] for r in recs
    ]


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EspeakMissing, match="apt-get install espeak-ng"):
        synth_speech(tmp_path, n=1)


def test_a_bug_in_our_code_propagates_and_is_not_counted_as_bad_audio(tmp_path, monkeypatch):
    """Only soundfile's errors for a file it cannot read count as bad audio ("corrupt"): a bug in our features
    or in how we call soundfile stops the reader (manifest and shard alike) instead of being skipped."""
    import mm.datasets.audio as audio

    wav = wav_bytes(tone(0.5, 16000), 16000)
    (tmp_path / "a.wav").write_bytes(wav)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "the circle is red."}) + "\n")
    shard = tmp_path / "s-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("a.wav", wav), ("a.txt", b"the circle is red.")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    class Buggy(AudioFeatures):
        def __call__(self, wave: torch.Tensor) -> torch.Tensor:
            raise TypeError("a bug in our features")

    ds = MediaTextDataset(tmp_path / "m.jsonl", audio_decoder(Buggy()), max_bad_fraction=1.0)
    with pytest.raises(TypeError, match="a bug in our features"):
        ds.load(0)
    assert ds.stats.tried == 0 and not ds.stats.skipped
    stats = SkipStats(1.0)
    with pytest.raises(TypeError, match="a bug in our features"):
        list(iter_webdataset(shard, audio_decoder(Buggy()), stats=stats))
    assert stats.tried == 0 and not stats.skipped

    def wrong_call(*args, **kwargs):
        raise TypeError("read() got an unexpected keyword argument 'dtyp'")

    monkeypatch.setattr(audio.sf, "read", wrong_call)
    with pytest.raises(TypeError, match="unexpected keyword"):
        decode_audio(wav)
    ds = MediaTextDataset(tmp_path / "m.jsonl", audio_decoder(), max_bad_fraction=1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ds.load(0)
    assert ds.stats.tried == 0
    monkeypatch.undo()
    with pytest.raises(BadSample) as e:  # soundfile's own refusal of a corrupt file stays a skip
        decode_audio(b"RIFF\x00\x00not really audio" * 10)
    assert e.value.reason == "corrupt" and "LibsndfileError" in e.value.detail
    assert MediaTextDataset(tmp_path / "m.jsonl", audio_decoder()).load(0)["features"].shape == (51, 80)
