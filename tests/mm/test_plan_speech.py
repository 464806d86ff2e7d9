"""`mm plan`'s speech formulas (`mm.app.plan_activations_speech`) against what autograd saves on the real modules
(bf16 on the CPU) at two tiny sizes each."""

from __future__ import annotations

import pytest
import torch

from mm.app import plan_activations_speech as S
from mm.encoders.speech import BestRQ, BestRQConfig, SpeechEncoder, SpeechEncoderConfig, _conformer_layer
from tests.mm.test_plan import saved_bytes

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
