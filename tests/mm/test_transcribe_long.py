"""Long recordings transcribed piecewise: `transcribe_long` cuts each recording longer than the features' window
on silence (pieces no longer than the window), transcribes the pieces and joins each recording's texts in order;
a recording within the window is transcribed whole (cut only when asked); silence only gives an empty line."""

import math

import pytest
import torch

from mm.datasets.audio import SAMPLE_RATE, AudioFeatures
from mm.datasets.long_audio import split_on_silence
from mm.lm import Tokenizer, Transformer, preset
from mm.prompts import ASR_PROMPT

SR = SAMPLE_RATE


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_and_tok(corpus):
    from mm.adapters.speech import SpeechAdapterConfig
    from mm.encoders.speech import SpeechEncoderConfig
    from mm.stages.speech import SpeechStageConfig, build_speech_model

    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    cfg = SpeechStageConfig(
        speech_encoder=SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
        adapter=SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64),
    )
    return build_speech_model(cfg, lm).eval(), tok


def recording(freqs: list[float], burst_s: float = 1.2, pause_s: float = 0.6) -> torch.Tensor:
    """Tone bursts (one per frequency) separated by pauses, with a little silence at both ends."""
    t = torch.arange(int(burst_s * SR)) / SR
    parts = [torch.zeros(int(0.2 * SR))]
    for f in freqs:
        parts += [
            0.3 * torch.sin(2 * math.pi * f * t) * torch.sin(math.pi * t / burst_s),
            torch.zeros(int(pause_s * SR)),
        ]
    return torch.cat(parts)


def test_pieces_are_transcribed_and_joined_in_order(model_and_tok, monkeypatch):
    import mm.models.speech as speech

    model, tok = model_and_tok
    features = AudioFeatures(max_seconds=3.0, normalize=False)  # the mean log-mel keeps each tone's bin
    long, short = recording([200, 400, 800, 300]), recording([500, 700], burst_s=0.8)
    assert long.numel() / SR > features.max_seconds  # longer than the window: it must be cut
    assert short.numel() / SR == features.max_seconds  # within the window: transcribed whole
    seen = []

    def by_length(model, tok, feats, **kw):  # names each piece by its frame count and its loudest mel bin
        seen.append([f.shape for f in feats])
        return [f"p{f.shape[0]}b{int(f.mean(0).argmax())}" for f in feats]

    monkeypatch.setattr(speech, "transcribe_features", by_length)
    got = speech.transcribe_long(model, tok, [long, torch.zeros(5 * SR), short], features, prompt=ASR_PROMPT)
    pieces = split_on_silence(long, SR, features.max_seconds, every_pause=True)
    assert len(pieces) == 4 and all(b - a <= 3.0 * SR for a, b in pieces)
    want = " ".join(by_length(None, None, [features(long[a:b]) for a, b in pieces]))
    assert got[0] == want and got[1] == "" and got[2] == by_length(None, None, [features(short)])[0]
    assert len(seen[0]) == 5  # every piece of every recording in one call, in order
    split = speech.transcribe_long(model, tok, [short], features, prompt=ASR_PROMPT, split_short=True)[0]
    assert len(split.split()) == 2 and split != got[2]  # its pause cuts it when asked
    bins = [int(s.split("b")[1]) for s in got[0].split()]
    assert bins[0] < bins[1] < bins[2] and bins[3] < bins[1]  # 200 < 400 < 800 Hz, then 300 Hz: spoken order


def test_transcribe_long_equals_the_pieces_transcribed_one_by_one(model_and_tok):
    from mm.models.speech import transcribe_features, transcribe_long

    model, tok = model_and_tok
    features = AudioFeatures(max_seconds=3.0)
    long = recording([250, 600, 350])
    whole = transcribe_long(model, tok, [long], features, prompt=ASR_PROMPT, batch_size=1, max_new_tokens=3)[
        0
    ]
    pieces = split_on_silence(long, SR, 3.0, every_pause=True)
    one_by_one = [
        transcribe_features(model, tok, [features(long[a:b])], prompt=ASR_PROMPT, max_new_tokens=3)[0]
        for a, b in pieces
    ]
    assert len(pieces) == 3 and whole == " ".join(t for t in one_by_one if t)
    assert whole  # the untrained model still says something, so the comparison is not between empty strings
