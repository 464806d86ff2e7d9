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
which torchaudio does not do: a padded clip then encodes exactly as the clip alone (in eval mode; in training
BatchNorm statistics still include padding frames).

`BestRQ`: the pretraining objective around an encoder. Masked spans of 40 ms frames are replaced by noise at the
input; targets come from the unmasked stacked frames through `n_codebooks` frozen random projections (320 -> 16
dims, Xavier-normal) and nearest (cosine) neighbours in frozen random codebooks (standard normal entries, unit
norm); one softmax head per codebook predicts them; cross-entropy on masked frames only, averaged over codebooks
(multi-softmax). Projections and codebooks are buffers drawn from a fixed seed: they are saved with the encoder,
never handed to an optimizer, and the targets of a saved encoder are a fixed function of its features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.models import Conformer

__all__ = ["BestRQ", "BestRQConfig", "FrameStacker", "SpeechEncoder", "SpeechEncoderConfig", "span_mask"]


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
        self, stacked: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked frames (B, T', 320) -> (B, T', dim); frames where `mask` (B, T') is True are replaced by
        N(0, 0.1) noise first (BEST-RQ masking)."""
        if mask is not None:
            noise = torch.randn_like(stacked) * 0.1
            stacked = torch.where(mask[..., None], noise, stacked)
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
    for m in seq[2:]:
        h = m(h)  # depthwise conv, norm, SiLU, pointwise conv, dropout
    x = x + h.permute(2, 0, 1)
    x = 0.5 * layer.ffn2(x) + x
    return layer.final_layer_norm(x) * keep


def span_mask(
    lengths: torch.Tensor, max_len: int, prob: float, span: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BEST-RQ masking: each valid frame starts a masked span of `span` frames with probability `prob`;
    at least one frame per utterance is masked. Returns bool (B, max_len)."""
    B = lengths.shape[0]
    valid = torch.arange(max_len)[None, :] < lengths[:, None].cpu()
    starts = (torch.rand(B, max_len, generator=generator) < prob) & valid
    # guarantee one span per utterance
    first = (torch.rand(B, generator=generator) * lengths.cpu().clamp(min=1)).long()
    starts[torch.arange(B), first.clamp(max=max_len - 1)] = True
    mask = torch.zeros(B, max_len, dtype=torch.bool)
    for k in range(span):
        mask[:, k:] |= starts[:, : max_len - k]
    return (mask & valid).to(lengths.device)


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

    def mask(self, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Span mask (B, T') over the encoder frames of feature lengths (B,)."""
        n = self.encoder.out_lengths(lengths)
        return span_mask(n, int(n.max()), self.cfg.mask_prob, self.cfg.mask_span, generator)

    def loss(
        self, feats: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy summed over masked frames, averaged over codebooks; mask (B, T') from `mask()`.
        Also returns the code accuracy on the masked frames."""
        stacked = self.encoder.stacker.stacked(feats)[:, : mask.shape[1]]
        n = self.encoder.out_lengths(lengths)
        targets = self.targets(stacked)  # (B, T', C)
        out, _ = self.encoder.forward_stacked(stacked, n, mask)
        logits = self.heads(out[mask]).view(-1, self.cfg.n_codebooks, self.cfg.codebook_size)  # (M, C, K)
        tgt = targets[mask]  # (M, C)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum")
        acc = float((logits.argmax(-1) == tgt).float().mean()) if tgt.numel() else 0.0
        return ce / self.cfg.n_codebooks, {"accuracy": acc}
