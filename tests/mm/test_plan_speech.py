"""`mm plan`'s speech formulas (`mm.app.plan_activations_speech`) against what autograd saves on the real modules
(bf16 on the CPU) at two tiny sizes each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from mm.app import plan as P
from mm.app import plan_activations_speech as S
from mm.encoders.speech import BestRQ, BestRQConfig, SpeechEncoder, SpeechEncoderConfig, _conformer_layer
from mm.lm import Transformer
from mm.lm.config import LMConfig
from mm.models.speech import SpeechLM
from tests.mm.test_plan import materialize, saved_bytes

SIZES = [(64, 128, 4, 40), (96, 256, 8, 24)]  # (width, FFN width, heads, frames)


@pytest.mark.parametrize(("D", "F", "A", "T"), SIZES)
def test_conformer_layer_formula_is_what_autograd_saves(D, F, A, T):
    torch.manual_seed(0)
    cfg = SpeechEncoderConfig(dim=D, n_layers=1, n_heads=A, ffn_dim=F, dropout=0.0)
    enc = SpeechEncoder(cfg).to(torch.bfloat16)
    B = 2
    x = torch.randn(T, B, D, dtype=torch.bfloat16, requires_grad=True)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, T - 5 :] = True
    layer = enc.conformer.conformer_layers[0]
    got = saved_bytes(lambda: _conformer_layer(layer, x, pad), list(enc.parameters()))
    # the CPU keeps the five LayerNorms' statistics in bf16 (4 B per frame each), CUDA in fp32 (8 B): the
    # formula's; the masked BatchNorm's fp32 statistics are per batch (20D + 12 B), not per frame
    assert got == B * T * (S.conformer_layer_bytes(D, F, A) - 20) + 20 * D + 12


@pytest.mark.parametrize(("D", "C", "K", "T"), [(64, 4, 64, 40), (128, 2, 96, 24)])
def test_speech_stem_and_bestrq_head_formulas_are_what_autograd_saves(D, C, K, T):
    torch.manual_seed(0)
    enc = SpeechEncoder(SpeechEncoderConfig(dim=D, n_layers=0, n_heads=4, ffn_dim=128, dropout=0.0))
    m = BestRQ(enc, BestRQConfig(n_codebooks=C, codebook_size=K)).to(torch.bfloat16)
    m.projection, m.codebooks = m.projection.float(), m.codebooks.float()  # the quantizer stays fp32
    B = 2
    feats = torch.randn(B, 4 * T, 80, dtype=torch.bfloat16)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, ::4] = True
    noise = torch.randn(B, T, 320)
    got = saved_bytes(lambda: m.loss(feats, torch.full((B,), 4 * T), mask, noise), list(m.parameters()))
    saved, extra = S.bestrq_head_bytes(D, C, K)
    # + one 4 B scalar per batch
    assert got == B * T * S.speech_stem_bytes(80, 4) + int(mask.sum()) * saved + 4
    assert extra == 8 * C * K


@pytest.mark.parametrize(
    ("Din", "W", "A", "G", "Dout", "T"), [(64, 64, 4, 128, 96, 40), (96, 128, 8, 256, 64, 24)]
)
def test_speech_adapter_formula_is_what_autograd_saves(Din, W, A, G, Dout, T):
    torch.manual_seed(0)
    a = SpeechAdapter(Din, Dout, SpeechAdapterConfig(dim=W, n_heads=A, ffn_dim=G)).to(torch.bfloat16)
    x = torch.randn(1, T, Din, dtype=torch.bfloat16, requires_grad=True)
    got = saved_bytes(lambda: a(x, torch.tensor([T])), [*a.parameters(), x])
    # one clip (the RoPE tables are per clip); + one 2 B scalar (the output scale)
    assert got == (T + 1) // 2 * S.speech_adapter_bytes(Din, W, A, G, Dout) + 2


@pytest.mark.parametrize(("Dout", "V", "L", "T"), [(64, 100, 5, 20), (128, 160, 8, 12)])
def test_ctc_formula_is_what_autograd_saves(Dout, V, L, T):
    torch.manual_seed(0)
    lm = Transformer(LMConfig(dim=Dout, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=V, ffn_dim=64))
    cfg = SpeechAdapterConfig(dim=32, n_heads=4, ffn_dim=64, ctc_weight=0.5)
    enc = SpeechEncoder(SpeechEncoderConfig(dim=32, n_layers=0))
    m = SpeechLM(lm, enc, SpeechAdapter(32, Dout, cfg)).to(torch.bfloat16)
    lm.requires_grad_(False)
    sp = torch.randn(1, T, Dout, dtype=torch.bfloat16, requires_grad=True)
    targets, n = torch.randint(0, V, (1, L)), torch.tensor([L])
    # sp stays in: the normalisation keeps the adapter outputs themselves (the formula's 2O of them)
    got = saved_bytes(lambda: m.ctc_loss(sp, torch.tensor([T]), targets, n), list(m.parameters()))
    saved, extra = S.ctc_bytes(Dout, V, L)
    table = (V + 1) * (4 * Dout + 4)  # per step: S.ctc_table_bytes's
    assert got == T * saved + table + 8 * L + 8  # + the clip's targets and two scalars
    assert extra == 8 * (V + 1)


def test_whole_step_activations_match_autograd_for_speech_and_bestrq():
    """The per-sample sum of the plan's parts against everything one loss's forward saves (within 2%)."""
    st = P.load_stage(
        "configs/stages/speech_tiny.yaml",
        ["lm=tiny", "data.features.max_seconds=0.8", "speech_encoder.dropout=0"],
    )
    m = materialize(st)
    m.speech_adapter.layer.inv_freq = m.speech_adapter.layer.inv_freq.float()
    N = S.encoder_frames(st)
    slots, B, T = (N + 1) // 2, 2, 48
    feats = torch.randn(B, 81, 80, dtype=torch.bfloat16)
    tok = torch.randint(0, m.lm.cfg.vocab_size, (B, T))
    smask = torch.zeros(B, T, dtype=torch.bool)
    smask[:, 3 : 3 + slots] = True
    ctc = torch.randint(0, m.lm.cfg.vocab_size, (B, slots))  # the longest target: the plan's bound

    def speech_loss():
        kw = {"feature_lengths": torch.full((B,), 81), "speech_mask": smask, "return_speech": True}
        logits, sp, counts = m(tok, features=feats, **kw)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tok.flatten(), reduction="sum")
        return loss + m.ctc_loss(sp, counts, ctc, torch.full((B,), slots))

    parts, _ = P.activation_bytes(st, T, "none")
    assert set(parts) == {"speech_encoder", "speech_adapter", "lm_layers", "ctc", "attention_mask", "logits"}
    want = B * sum(parts.values()) + S.ctc_table_bytes(st)
    assert saved_bytes(speech_loss, [*m.parameters(), *m.buffers()]) == pytest.approx(want, rel=0.02)

    st = P.load_stage(
        "configs/encoders/bestrq_tiny.yaml", ["data.features.max_seconds=0.8", "speech_encoder.dropout=0"]
    )
    m = st.model.to_empty(device="cpu")  # the quantizer's buffers stay fp32, random (no LM to materialise)
    with torch.no_grad():
        for t in [*m.parameters(), m.projection, m.codebooks]:
            t.normal_(0, 0.02)
    m.heads.to(torch.bfloat16), m.encoder.to(torch.bfloat16)
    N, q = S.encoder_frames(st), st.cfg.bestrq
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, : math.ceil(N * (1 - (1 - q.mask_prob) ** q.mask_span))] = True  # the plan's expected share
    feats, noise = torch.randn(B, 81, 80, dtype=torch.bfloat16), torch.randn(B, N, 320)
    parts, _ = P.activation_bytes(st, T, "none")
    assert set(parts) == {"speech_encoder", "codebook_logits"}
    got = saved_bytes(
        lambda: m.loss(feats, torch.full((B,), 81), mask, noise), [*m.parameters(), *m.buffers()]
    )
    assert got / B == pytest.approx(sum(parts.values()), rel=0.02)
