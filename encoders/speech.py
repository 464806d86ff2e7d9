"""The speech encoder and its BEST-RQ self-supervised pretraining (Llama 3 paper §7.6; `paper-notes.md` §5;
Chiu et al. 2022, "Self-supervised learning with random-projection quantizer for speech recognition").

`SpeechEncoder`: 80-dim log-mel features at a 10 ms hop -> stride-4 stacking (4 frames concatenated, 320 dims)
+ Linear -> 40 ms frames -> Conformer. The Conformer is torchaudio's `torchaudio.models.Conformer` (Macaron FFNs,
multi-head self-attention, depthwise convolution module, as in Gulati et al. 2020) rather than our own: it is a
maintained, tested reference implementation. Its self-attention has no positional encoding (the paper's encoder
uses rotary attention); position reaches the model through the convolution modules, which is what relative
position needs for the short utterances here. A rotary Conformer would mean re-implementing the whole block for
one difference, so we keep torchaudio's modules and note the deviation. We call its layers' submodules in
torchaudio's order ourselves (`_conformer_layer`) only to zero padding frames before the depthwise convolution,
which torchaudio does not do, and to compute the convolution module's BatchNorm ourselves (`masked_batch_norm`,
from the module's own weight, bias and running buffers, so saved encoders load unchanged): in training its
statistics cover the real frames only and are summed over all processes of a run (torch's `SyncBatchNorm` is
CUDA-only), so a padded clip encodes exactly as the clip alone and a batch split over processes normalises as
the whole batch in one process (so in a process group every process must run the same training-mode
forwards: each one is a collective); in eval it uses the running statistics as `BatchNorm1d` does.

`BestRQ`: the pretraining objective around an encoder. Masked spans of 40 ms frames are replaced by noise at the
input; each clip's mask and noise come from its own generator (`sample_generator`: run seed and the clip's stream
position), so they do not depend on how a batch is split over processes, and the noise travels with the batch
(the forward pass draws nothing). Targets come from the unmasked stacked frames through `n_codebooks` frozen
random projections (320 -> 16 dims, Xavier-normal) and nearest (cosine) neighbours in frozen random codebooks
(standard normal entries, unit norm); one softmax head per codebook predicts them; cross-entropy on masked frames
only, averaged over codebooks (multi-softmax). Projections and codebooks are buffers drawn from a fixed seed:
they are saved with the encoder, never handed to an optimizer, and the targets of a saved encoder are a fixed
function of its features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.models import Conformer

__all__ = [
    "BestRQ",
    "BestRQConfig",
    "FrameStacker",
    "SpeechEncoder",
    "SpeechEncoderConfig",
    "masked_batch_norm",
    "sample_generator",
    "span_mask",
]


@dataclass
class SpeechEncoderConfig:
    """Shape of the speech encoder (paper: width 1536, 24 layers, 24 heads, FFN 4096, conv kernel 7)."""

    n_mels: int = 80
    stack: int = 4  # 10 ms frames per encoder frame (40 ms)
    dim: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 576
    conv_kernel: int = 7
    dropout: float = 0.1


class FrameStacker(nn.Module):
    """Stride-`stack` frame stacking + Linear: (B, T, F) -> (B, T // stack, dim); the remainder is dropped."""

    def __init__(self, n_mels: int, stack: int, dim: int) -> None:
        super().__init__()
        self.stack = stack
        self.proj = nn.Linear(n_mels * stack, dim)

    def stacked(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, T // stack, stack * F): consecutive frames concatenated."""
        B, T, Fd = feats.shape
        Tk = T // self.stack
        return feats[:, : Tk * self.stack].reshape(B, Tk, self.stack * Fd)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """Stacked frames (B, T', stack * F) -> (B, T', dim)."""
        return self.proj(stacked)


class SpeechEncoder(nn.Module):
    """Log-mel features (B, T, 80) + lengths -> 40 ms encoder frames (B, T // 4, dim) + their lengths."""

    def __init__(self, cfg: SpeechEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stacker = FrameStacker(cfg.n_mels, cfg.stack, cfg.dim)
        self.conformer = Conformer(
            input_dim=cfg.dim,
            num_heads=cfg.n_heads,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.n_layers,
            depthwise_conv_kernel_size=cfg.conv_kernel,
            dropout=cfg.dropout,
        )

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames per utterance for `lengths` feature frames."""
        return torch.div(lengths, self.cfg.stack, rounding_mode="floor")

    def forward_stacked(
        self,
        stacked: torch.Tensor,
        lengths: torch.Tensor,
        mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked frames (B, T', 320) -> (B, T', dim); frames where `mask` (B, T') is True are first replaced by
        the same frames of `noise` (B, T', 320) (BEST-RQ masking; `BestRQ.mask_and_noise` draws both)."""
        if mask is not None:
            if noise is None:
                raise ValueError("a BEST-RQ mask needs its noise (BestRQ.mask_and_noise draws both per clip)")
            stacked = torch.where(mask[..., None], noise.to(stacked.dtype), stacked)
        x = self.stacker(stacked)
        lengths = lengths.clamp(min=1, max=x.shape[1])
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # (B, T') True = padding
        h = x.masked_fill(pad[..., None], 0.0).transpose(0, 1)  # (T', B, D): torchaudio's layer layout
        for layer in self.conformer.conformer_layers:
            h = _conformer_layer(layer, h, pad)
        return h.transpose(0, 1), lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, T, n_mels), lengths (B,) -> encoder frames (B, T // 4, dim), lengths (B,)."""
        return self.forward_stacked(self.stacker.stacked(feats), self.out_lengths(lengths))


def _conformer_layer(layer: nn.Module, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """torchaudio's `ConformerLayer.forward` (Macaron FFN, MHSA, conv module, FFN, LayerNorm) with padding frames
    zeroed before the depthwise convolution, so that padding never reaches a real frame. x (T, B, D), pad (B, T)."""
    keep = (~pad).T[..., None].to(x.dtype)  # (T, B, 1)
    x = 0.5 * layer.ffn1(x) + x
    h = layer.self_attn_layer_norm(x)
    h, _ = layer.self_attn(query=h, key=h, value=h, key_padding_mask=pad, need_weights=False)
    x = layer.self_attn_dropout(h) + x
    conv = layer.conv_module
    h = conv.layer_norm(x).permute(1, 2, 0)  # (B, D, T)
    seq = conv.sequential
    h = seq[1](seq[0](h)) * keep.permute(1, 2, 0)  # pointwise conv + GLU, then padding -> 0
    for m in seq[2:]:  # depthwise conv, norm, SiLU, pointwise conv, dropout
        h = masked_batch_norm(h, ~pad, m) if isinstance(m, nn.BatchNorm1d) else m(h)
    x = x + h.permute(2, 0, 1)
    x = 0.5 * layer.ffn2(x) + x
    return layer.final_layer_norm(x) * keep


def masked_batch_norm(x: torch.Tensor, keep: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """`bn` applied to x (B, C, T) with training statistics over the frames where keep (B, T) is True, summed
    over all processes of an initialised process group (autograd-aware), so a batch split over processes
    normalises (forward and backward) as one batch in one process; eval mode is exactly `bn`'s."""
    if not bn.training and bn.running_mean is not None:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    C = x.shape[1]
    xf = x.float()
    w = keep[:, None, :].to(xf.dtype)  # (B, 1, T): 1 on real frames
    xw = xf * w
    # per channel: sum and sum of squares over the real frames; then their count
    stats = torch.cat([xw.sum((0, 2)), (xw * xf).sum((0, 2)), w.sum().reshape(1)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.nn.functional import all_reduce  # differentiable: its backward sums gradients

        stats = all_reduce(stats)
    n = stats[2 * C]
    mean = stats[:C] / n.clamp(min=1)
    var = (stats[C : 2 * C] / n.clamp(min=1) - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
    if bn.training and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * (n / (n - 1).clamp(min=1))
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), f)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), f)
    y = (xf - mean[None, :, None]) * torch.rsqrt(var + bn.eps)[None, :, None]
    if bn.weight is not None:
        y = y * bn.weight[None, :, None] + bn.bias[None, :, None]
    return y.to(x.dtype)


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of one clip's BEST-RQ mask and noise: seeded from (run seed, the clip's stream position)."""
    digest = hashlib.sha256(f"mm.bestrq.mask/{seed}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _row_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, B: int
) -> list[torch.Generator | None]:
    """One generator per row: the given sequence, or the one generator (or None) shared by every row."""
    if isinstance(generator, torch.Generator) or generator is None:
        return [generator] * B
    gens = list(generator)
    if len(gens) != B:
        raise ValueError(f"{len(gens)} generators for {B} clips")
    return gens


def span_mask(
    lengths: torch.Tensor,
    max_len: int,
    prob: float,
    span: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """BEST-RQ masking: each valid frame starts a masked span of `span` frames with probability `prob`;
    at least one frame per utterance is masked. Row b draws only from its own generator (a sequence of B
    generators) and only as many numbers as it has frames, so it does not depend on the other rows or on
    `max_len`. Returns bool (B, max_len)."""
    B = lengths.shape[0]
    mask = torch.zeros(B, max_len, dtype=torch.bool)
    for b, (g, n) in enumerate(zip(_row_generators(generator, B), lengths.tolist(), strict=True)):
        n = min(int(n), max_len)
        starts = torch.rand(n, generator=g) < prob
        first = int(torch.rand(1, generator=g) * max(n, 1))  # guarantee one span per utterance
        if n == 0:
            continue
        starts[min(first, n - 1)] = True
        for k in range(span):
            mask[b, k:n] |= starts[: max(n - k, 0)]
    return mask.to(lengths.device)


@dataclass
class BestRQConfig:
    """BEST-RQ (paper: span 32 frames at p 2.5%, 16 codebooks of 8192 x 16 dims)."""

    n_codebooks: int = 4
    codebook_size: int = 512
    codebook_dim: int = 16
    mask_prob: float = 0.06  # chance that a 40 ms frame starts a masked span
    mask_span: int = 4  # frames per span (160 ms)
    seed: int = 0  # draws the frozen projections and codebooks


class BestRQ(nn.Module):
    """Encoder + frozen random-projection quantizer + per-codebook softmax heads (see the module docstring)."""

    def __init__(self, encoder: SpeechEncoder, cfg: BestRQConfig) -> None:
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        in_dim = encoder.cfg.n_mels * encoder.cfg.stack
        g = torch.Generator().manual_seed(cfg.seed)
        proj = torch.randn(cfg.n_codebooks, in_dim, cfg.codebook_dim, generator=g)
        proj = proj * (2.0 / (in_dim + cfg.codebook_dim)) ** 0.5  # Xavier normal
        books = torch.randn(cfg.n_codebooks, cfg.codebook_size, cfg.codebook_dim, generator=g)
        self.register_buffer("projection", proj)  # (C, 320, d), frozen
        self.register_buffer("codebooks", F.normalize(books, dim=-1))  # (C, K, d), frozen, unit norm
        self.heads = nn.Linear(encoder.cfg.dim, cfg.n_codebooks * cfg.codebook_size)

    @torch.no_grad()
    def targets(self, stacked: torch.Tensor) -> torch.Tensor:
        """Stacked frames (B, T', 320) -> code ids (B, T', C): cosine nearest neighbour per codebook."""
        z = torch.einsum("btf,cfd->btcd", stacked.float(), self.projection)
        z = F.normalize(z, dim=-1)
        sims = torch.einsum("btcd,ckd->btck", z, self.codebooks)
        return sims.argmax(-1)

    def mask(
        self, lengths: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Span mask (B, T') over the encoder frames of feature lengths (B,); one generator per clip or one for
        all."""
        n = self.encoder.out_lengths(lengths)
        return span_mask(n, int(n.max()), self.cfg.mask_prob, self.cfg.mask_span, generator)

    def noise(
        self, mask: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """N(0, 0.1) replacement frames (B, T', 320) for the masked frames of `mask` (zeros elsewhere); row b
        draws only its masked frames from its own generator."""
        B, T = mask.shape
        dim = self.encoder.cfg.n_mels * self.encoder.cfg.stack
        out = torch.zeros(B, T, dim)
        cpu = mask.cpu()
        for b, g in enumerate(_row_generators(generator, B)):
            out[b, cpu[b]] = torch.randn(int(cpu[b].sum()), dim, generator=g) * 0.1
        return out.to(mask.device)

    def mask_and_noise(
        self, lengths: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Span mask (B, T') and noise (B, T', 320) of clips with feature lengths (B,), clip b drawn from
        generators[b] only (e.g. `sample_generator(seed, position)`): a clip's draw is the same in any batch."""
        mask = self.mask(lengths, generators)
        return mask, self.noise(mask, generators)

    def loss(
        self, feats: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy summed over masked frames, averaged over codebooks; mask (B, T') and noise
        (B, T', 320) from `mask_and_noise()`. Also returns the code accuracy on the masked frames (a 0-dim
        tensor, not read on the host here: no sync per training step)."""
        stacked = self.encoder.stacker.stacked(feats)[:, : mask.shape[1]]
        n = self.encoder.out_lengths(lengths)
        targets = self.targets(stacked)  # (B, T', C)
        out, _ = self.encoder.forward_stacked(stacked, n, mask, noise)
        logits = self.heads(out[mask]).view(-1, self.cfg.n_codebooks, self.cfg.codebook_size)  # (M, C, K)
        tgt = targets[mask]  # (M, C)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum")
        acc = (logits.argmax(-1) == tgt).float().mean().detach() if tgt.numel() else ce.new_zeros(())
        return ce / self.cfg.n_codebooks, {"accuracy": acc}
