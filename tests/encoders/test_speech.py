"""Speech encoder (stride-4 stacking into torchaudio's Conformer), BEST-RQ (frozen projections/codebooks that are
saved with the encoder and never updated, deterministic targets, loss on masked frames only, masked loss falls)
and the speech adapter (conv k3 s2 -> rotary layer -> linear; padding does not change real outputs)."""

import pytest
import torch
from torchaudio.models import Conformer

from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from mm.encoders.speech import BestRQ, BestRQConfig, SpeechEncoder, SpeechEncoderConfig, span_mask
from mm.training.checkpoint import load_tensors, save_tensors


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast on a quiet machine and far faster on a busy one (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ENC = SpeechEncoderConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_kernel=7, dropout=0.0)


def test_encoder_stacks_4_frames_into_torchaudio_conformer():
    enc = SpeechEncoder(ENC).eval()
    assert isinstance(enc.conformer, Conformer) and enc.stacker.proj.in_features == 320
    x = torch.randn(2, 103, 80)
    out, n = enc(x, torch.tensor([103, 60]))
    assert out.shape == (2, 25, 32) and n.tolist() == [25, 15]
    stacked = enc.stacker.stacked(x)
    assert torch.equal(stacked[0, 1], x[0, 4:8].reshape(-1))  # frames 4..7 concatenated = 40 ms
    # Attention is masked and padding is zeroed before every depthwise convolution: a padded clip's frames equal
    # the clip encoded alone.
    alone, _ = enc(x[1:, :60], torch.tensor([60]))
    torch.testing.assert_close(out[1, :15], alone[0], atol=1e-5, rtol=1e-5)
    # Same layer maths as torchaudio's own forward when nothing is padded.
    ref, _ = enc.conformer(enc.stacker(stacked), torch.tensor([25, 25]))
    torch.testing.assert_close(enc(x, torch.tensor([103, 103]))[0], ref, atol=1e-5, rtol=1e-5)


def test_span_mask_spans_and_lengths():
    m = span_mask(torch.tensor([20, 7]), 20, prob=0.1, span=4, generator=torch.Generator().manual_seed(0))
    assert m.shape == (2, 20) and m[0].any() and m[1].any() and not m[1, 7:].any()


def test_bestrq_projection_and_codebooks_are_frozen_saved_and_targets_deterministic(tmp_path):
    torch.manual_seed(0)
    model = BestRQ(
        SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16, mask_prob=0.1, mask_span=3)
    )
    names = {n for n, _ in model.named_parameters()}
    assert not any(n in names for n in ("projection", "codebooks"))
    frozen = (model.projection.clone(), model.codebooks.clone())
    enc_before = model.encoder.stacker.proj.weight.clone()
    feats, lengths = torch.randn(2, 96, 80), torch.tensor([96, 80])
    stacked = model.encoder.stacker.stacked(feats)
    targets = model.targets(stacked)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        mask = model.mask(lengths, g)
        loss, _ = model.loss(feats, lengths, mask)
        (loss / mask.sum()).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach() / mask.sum()))
    assert losses[-1] < 0.75 * losses[0]  # the masked-frame loss falls (ln 16 = 2.77 at chance)
    assert torch.equal(model.projection, frozen[0]) and torch.equal(model.codebooks, frozen[1])
    assert not torch.equal(model.encoder.stacker.proj.weight, enc_before)
    save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "encoder.safetensors")
    saved = load_tensors(tmp_path / "encoder.safetensors")
    assert torch.equal(saved["projection"], frozen[0]) and torch.equal(saved["codebooks"], frozen[1])
    torch.manual_seed(123)  # a fresh model with other weights, then the saved ones
    fresh = BestRQ(SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16, seed=7))
    assert not torch.equal(fresh.targets(stacked), targets)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.targets(stacked), targets) and torch.equal(model.targets(stacked), targets)


def test_bestrq_loss_counts_masked_frames_only():
    model = BestRQ(SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16)).eval()
    feats, lengths = torch.randn(2, 80, 80), torch.tensor([80, 80])
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 3:6] = True
    torch.manual_seed(0)
    a, _ = model.loss(feats, lengths, mask)
    feats2 = feats.clone()
    feats2[1] += (
        1.0  # a clip with no masked frame contributes no loss term (but changes attention in its own row)
    )
    torch.manual_seed(0)
    b, _ = model.loss(feats2, lengths, mask)
    torch.testing.assert_close(a, b)


def test_adapter_halves_frames_and_ignores_padding():
    ad = SpeechAdapter(32, 48, SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64)).eval()
    x = torch.randn(2, 25, 32)
    out, n = ad(x, torch.tensor([25, 14]))
    assert out.shape == (2, 13, 48) and n.tolist() == [13, 7]
    alone, _ = ad(x[1:, :14], torch.tensor([14]))
    torch.testing.assert_close(out[1, :7], alone[0], atol=1e-5, rtol=1e-5)
    assert ad.conv.kernel_size == (3,) and ad.conv.stride == (2,)


def test_adapter_outputs_start_at_the_token_embedding_scale():
    ad = SpeechAdapter(32, 48, SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64)).eval()
    ad.set_output_rms(0.02)
    out, _ = ad(torch.randn(2, 25, 32) * 5, torch.tensor([25, 25]))
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.full((2, 13), 0.02), atol=1e-4, rtol=1e-3)
    assert "out_scale" in ad.state_dict() and "out_norm.weight" in dict(ad.named_parameters())
    raw = SpeechAdapter(32, 48, SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, match_embedding_rms=False))
    assert raw.out_norm is None
