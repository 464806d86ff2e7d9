"""Speech encoder (stride-4 stacking into torchaudio's Conformer), BEST-RQ (frozen projections/codebooks that are
saved with the encoder and never updated, deterministic targets, loss on masked frames only, masked loss falls)
and the speech adapter (conv k3 s2 -> rotary layer -> linear; padding does not change real outputs). Training gives
the same results however a batch is split: the convolution module's BatchNorm uses real frames only, summed over
processes (checked with 2 gloo processes), and each clip's BEST-RQ mask and noise depend on its stream position."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchaudio.models import Conformer

from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from mm.encoders.speech import (
    BestRQ,
    BestRQConfig,
    SpeechEncoder,
    SpeechEncoderConfig,
    masked_batch_norm,
    sample_generator,
    span_mask,
)
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


def test_training_mode_padded_clip_encodes_as_the_clip_alone():
    torch.manual_seed(0)
    enc = SpeechEncoder(ENC).train()  # BatchNorm on batch statistics (dropout is 0 in ENC)
    x = torch.randn(1, 60, 80)
    padded = torch.cat([x, 3 * torch.randn(1, 43, 80) + 2], dim=1)  # 43 frames of loud padding
    out, n = enc(padded, torch.tensor([60]))
    alone, _ = enc(x, torch.tensor([60]))
    assert out.shape == (1, 25, 32) and n.tolist() == [15]
    torch.testing.assert_close(out[0, :15], alone[0], atol=1e-5, rtol=1e-5)


def _padded(lengths: list[int], C: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, T) values (garbage in the padding) and the keep mask (B, T) of clips of `lengths` frames."""
    T = max(lengths)
    x = torch.randn(len(lengths), C, T) * 2 + 1
    keep = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return x.masked_fill(~keep[:, None], 7.0), keep


def test_masked_batch_norm_is_batchnorm1d_over_the_real_frames_only():
    torch.manual_seed(0)
    x, keep = _padded([30, 11, 23])
    real = torch.cat([x[b, :, : int(keep[b].sum())] for b in range(3)], dim=1)[None]  # (1, C, 64), no padding
    for momentum in (0.1, None):
        bn, ref = nn.BatchNorm1d(6, momentum=momentum), nn.BatchNorm1d(6, momentum=momentum)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_()
        ref.load_state_dict(bn.state_dict())
        for _ in range(2):  # two updates of the running statistics
            y = masked_batch_norm(x, keep, bn)
            y_ref = ref(real)
        got = torch.cat([y[b, :, : int(keep[b].sum())] for b in range(3)], dim=1)[None]
        torch.testing.assert_close(got, y_ref, atol=1e-5, rtol=1e-5)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
        ref.load_state_dict(bn.state_dict())  # eval: the running statistics, exactly as BatchNorm1d
        bn.eval(), ref.eval()
        assert torch.equal(masked_batch_norm(x, keep, bn), ref(x))
    # torchaudio's BatchNorm1d stays in place: saved encoders keep their keys and load strictly.
    enc = SpeechEncoder(ENC)
    assert isinstance(enc.conformer.conformer_layers[0].conv_module.sequential[3], nn.BatchNorm1d)
    enc.load_state_dict(SpeechEncoder(ENC).state_dict(), strict=True)


def _split_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Process `rank` of `world`'s share of a batch of 4 clips (padded to its own longest clip): masked batch
    norm output and gradients, and a BEST-RQ training loss and parameter gradients (train mode)."""
    torch.manual_seed(0)
    lengths = [50, 20, 35, 12]
    x, keep = _padded(lengths)
    wgt = torch.randn(x.shape)
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    T = max(lengths[rows])
    xs = x[rows, :, :T].clone().requires_grad_()
    y = masked_batch_norm(xs, keep[rows, :T], bn)
    (y * wgt[rows, :, :T] * keep[rows, None, :T]).sum().backward()
    model = BestRQ(SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16, mask_prob=0.1)).train()
    feats, flen, positions = torch.randn(4, 96, 80), torch.tensor([96, 52, 80, 40]), [7, 8, 9, 10]
    Tf = int(flen[rows].max())
    mask, noise = model.mask_and_noise(flen[rows], [sample_generator(3, p) for p in positions[rows]])
    loss, _ = model.loss(feats[rows, :Tf], flen[rows], mask, noise)
    loss.backward()
    return {
        "y": y.detach(),
        "x_grad": xs.grad,
        "bn_grad": torch.cat([bn.weight.grad, bn.bias.grad]),
        "running": torch.cat([bn.running_mean, bn.running_var]),
        "loss": loss.detach(),
        "model_grad": torch.cat([p.grad.flatten() for p in model.parameters()]),
        "model_running": torch.cat([b.flatten().float() for n, b in model.named_buffers() if "running" in n]),
    }


_WORKER = """
import importlib.util, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("split_case", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
dist.init_process_group("gloo")
out = mod._split_run(dist.get_rank(), dist.get_world_size())
torch.save(out, os.path.join(sys.argv[2], f"{dist.get_rank()}.pt"))
dist.destroy_process_group()
"""


def test_two_gloo_processes_train_as_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "worker.py").write_text(_WORKER)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
        env.update(RANK=str(rank), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(tmp_path / "worker.py"), __file__, str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    full = _split_run(0, 1)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    close = {"atol": 1e-5, "rtol": 1e-4}
    for r, part in enumerate(parts):
        rows = slice(2 * r, 2 * r + 2)
        T = part["y"].shape[-1]
        torch.testing.assert_close(part["y"], full["y"][rows, :, :T], **close)
        torch.testing.assert_close(part["x_grad"], full["x_grad"][rows, :, :T], **close)
        torch.testing.assert_close(part["running"], full["running"], **close)
        torch.testing.assert_close(part["model_running"], full["model_running"], **close)
    # Losses and parameter gradients are sums over clips: the processes' parts add up to one process's.
    torch.testing.assert_close(parts[0]["bn_grad"] + parts[1]["bn_grad"], full["bn_grad"], **close)
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], full["loss"], **close)
    torch.testing.assert_close(parts[0]["model_grad"] + parts[1]["model_grad"], full["model_grad"], **close)


def test_span_mask_spans_and_lengths():
    m = span_mask(torch.tensor([20, 7]), 20, prob=0.1, span=4, generator=torch.Generator().manual_seed(0))
    assert m.shape == (2, 20) and m[0].any() and m[1].any() and not m[1, 7:].any()


def test_bestrq_projection_and_codebooks_are_frozen_saved_and_targets_deterministic(tmp_path):
    torch.manual_seed(0)
    model = BestRQ(
        SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16, mask_prob=0.1, mask_span=3)
    )
    # The quantizer is drawn from its own seed (not the global RNG) and is part of the saved state.
    torch.manual_seed(99)
    again = BestRQ(SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16))
    assert torch.equal(again.projection, model.projection) and torch.equal(again.codebooks, model.codebooks)
    other = BestRQ(SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16, seed=1))
    assert not torch.equal(other.projection, model.projection)
    assert {"projection", "codebooks"} <= set(model.state_dict())
    frozen = (model.projection.clone(), model.codebooks.clone())
    enc_before = model.encoder.stacker.proj.weight.clone()
    feats, lengths = torch.randn(2, 96, 80), torch.tensor([96, 80])
    stacked = model.encoder.stacker.stacked(feats)
    targets = model.targets(stacked)
    assert targets.unique().numel() >= 8  # many codes in use: equal targets below are not a coincidence
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        mask, noise = model.mask_and_noise(lengths, [sample_generator(0, 2 * step + b) for b in range(2)])
        loss, _ = model.loss(feats, lengths, mask, noise)
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
    noise = model.noise(mask, torch.Generator().manual_seed(0))
    assert noise[0, 3:6].abs().sum() > 0 and noise[0, :3].abs().sum() == 0 and noise[1].abs().sum() == 0
    a, _ = model.loss(feats, lengths, mask, noise)
    feats2 = feats.clone()
    feats2[1] += (
        1.0  # a clip with no masked frame contributes no loss term (but changes attention in its own row)
    )
    b, _ = model.loss(feats2, lengths, mask, noise)
    torch.testing.assert_close(a, b)


def test_bestrq_mask_and_noise_are_per_clip_whatever_the_batch():
    model = BestRQ(
        SpeechEncoder(ENC), BestRQConfig(n_codebooks=2, codebook_size=16, mask_prob=0.1, mask_span=3)
    )
    lengths, positions = torch.tensor([96, 52, 80, 40]), [7, 8, 9, 10]
    mask, noise = model.mask_and_noise(lengths, [sample_generator(3, p) for p in positions])
    assert mask.shape == (4, 24) and noise.shape == (4, 24, 320)
    assert (noise.abs().sum(-1) > 0).equal(mask) and not mask[1, 13:].any() and mask.any(1).all()
    for rows in (slice(0, 2), slice(2, 4)):  # the same clips drawn in two batches (other padded lengths)
        m, z = model.mask_and_noise(lengths[rows], [sample_generator(3, p) for p in positions[rows]])
        T = m.shape[1]
        assert torch.equal(m, mask[rows, :T]) and not mask[rows, T:].any()
        assert torch.equal(z, noise[rows, :T])
    other, _ = model.mask_and_noise(lengths, [sample_generator(3, p) for p in (11, 12, 13, 14)])
    reseeded, _ = model.mask_and_noise(lengths, [sample_generator(4, p) for p in positions])
    assert not torch.equal(other, mask) and not torch.equal(reseeded, mask)
    # The forward pass draws nothing: the same batch gives the same loss.
    feats = torch.randn(4, 96, 80)
    a, _ = model.loss(feats, lengths, mask, noise)
    b, _ = model.loss(feats, lengths, mask, noise)
    assert torch.equal(a, b)


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
