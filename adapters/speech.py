"""The speech adapter (Llama 3 paper §7.6; `paper-notes.md` §5): Conv1d kernel 3 stride 2 (40 ms -> 80 ms frames)
-> one rotary Transformer layer -> Linear to the LM embedding width (-> RMSNorm, scaled to the RMS of the LM's
token embeddings, `match_embedding_rms`). Its outputs are spliced into the LM input
like token embeddings (between `<|speech_start|>` and `<|speech_end|>`); there is no cross-attention.

The Transformer layer is pre-norm (RMSNorm), bidirectional multi-head attention with RoPE (the LM's interleaved
layout, `mm.lm.model.apply_rope`) and a key padding mask, and a SwiGLU FFN (`mm.lm.model.FeedForward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm.lm.model import FeedForward, RMSNorm, apply_rope, rope_inv_freq

__all__ = ["RotaryEncoderLayer", "SpeechAdapter", "SpeechAdapterConfig"]


@dataclass
class SpeechAdapterConfig:
    """Shape of the adapter (paper: width 3072, FFN 4096, ~100M parameters)."""

    dim: int = 192
    n_heads: int = 4
    ffn_dim: int = 512
    rope_theta: float = 10000.0
    # RMS-normalise the outputs and scale them to the LM's token embeddings (`set_output_rms`, learnable gain):
    # spliced vectors far larger than token embeddings swamp what the frozen LM's layers add to the residual
    # stream at their positions, so the LM cannot read them as it reads tokens.
    match_embedding_rms: bool = True
    # Auxiliary CTC loss on the adapter outputs against the transcript's LM tokens (0 = off). The CTC classes are
    # the frozen LM's token embeddings plus a learned blank vector, scored by cosine similarity with a learned
    # scale (`ctc_logits`): the outputs are pulled towards the embeddings of the words spoken, in order, which is
    # what the frozen LM has learned to copy after the ASR prompt. The ASR loss alone learns this slowly.
    ctc_weight: float = 0.0
    # CTC compression (needs ctc_weight > 0): the LM sees only the frames where the CTC head's greedy label is a
    # word piece that starts (not blank, not a repeat), so the spliced sequence reads like the transcript's token
    # embeddings. With blanks in between, the LM's copying (find the current token earlier in the context, write
    # what followed it) lands on blanks and repeats. In training the other frames are hidden from attention and
    # skipped by the positions; in transcription they are left out.
    ctc_compress: bool = False
    # Learn the input vectors of `<|speech_start|>` and `<|speech_end|>` (`boundaries`; normalised and scaled as
    # the outputs are) in place of the frozen LM's rows for them: no text holds these tokens, so the LM never
    # trained those rows, and a spoken question's answer is predicted at `<|speech_end|>`. Measured on the demo
    # LM with the question given as text between the two tokens: 0 of 300 answered with the LM's own rows, 0.80
    # without the end token (0.77 with no tokens at all).
    learn_boundaries: bool = False
    # The LM reads (1 - a) x the outputs + a x their CTC-posterior-weighted token embeddings (a = ctc_embeddings;
    # needs the CTC head): where the head is sure of a word piece the LM reads (nearly) that token's own
    # embedding, which its copying matches exactly, instead of a vector merely near it.
    ctc_embeddings: float = 0.0


class RotaryEncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention with RoPE + SwiGLU FFN, with a key padding mask."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, rope_theta: float = 10000.0) -> None:
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"dim={dim} must split into {n_heads} heads of an even size")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim, rope_theta), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), valid (B, T) bool (False = padding) -> (B, T, D)."""
        B, T, D = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        angles = torch.arange(T, device=x.device).float()[:, None] * self.inv_freq.float()  # (T, hd/2)
        cos, sin = angles.cos().expand(B, T, -1), angles.sin().expand(B, T, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = valid[:, None, None, :]  # (B, 1, 1, T): keys
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        h = x + self.wo(out.transpose(1, 2).reshape(B, T, D))
        return h + self.feed_forward(self.ffn_norm(h))


class SpeechAdapter(nn.Module):
    """Encoder frames (B, T, in_dim) + lengths -> LM-width embeddings (B, ceil(T / 2), out_dim) + lengths."""

    def __init__(self, in_dim: int, out_dim: int, cfg: SpeechAdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(in_dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.layer = RotaryEncoderLayer(cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.rope_theta)
        self.norm = RMSNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, out_dim)
        self.out_norm = RMSNorm(out_dim) if cfg.match_embedding_rms else None
        # Fixed output scale (saved with the weights); the RMSNorm's learnable gain starts at 1 around it.
        self.register_buffer("out_scale", torch.ones(()))
        if cfg.ctc_weight < 0:
            raise ValueError(f"SpeechAdapterConfig.ctc_weight must be >= 0, got {cfg.ctc_weight}")
        if cfg.ctc_compress and not cfg.ctc_weight:
            raise ValueError("SpeechAdapterConfig.ctc_compress needs the CTC head: set ctc_weight > 0")
        if not 0.0 <= cfg.ctc_embeddings <= 1.0:
            raise ValueError(
                f"SpeechAdapterConfig.ctc_embeddings must be in [0, 1], got {cfg.ctc_embeddings}"
            )
        if cfg.ctc_embeddings and not cfg.ctc_weight:
            raise ValueError("SpeechAdapterConfig.ctc_embeddings needs the CTC head: set ctc_weight > 0")
        self.ctc_blank = nn.Parameter(torch.randn(out_dim) * 0.02) if cfg.ctc_weight else None
        self.ctc_log_scale = nn.Parameter(torch.tensor(2.3)) if cfg.ctc_weight else None  # exp -> about 10
        self.boundary = nn.Parameter(torch.randn(2, out_dim)) if cfg.learn_boundaries else None

    def boundaries(self) -> torch.Tensor:
        """The learned input vectors (2, out_dim) of `<|speech_start|>` and `<|speech_end|>`, on the outputs' scale."""
        if self.boundary is None:
            raise ValueError("this adapter learns no boundary vectors (SpeechAdapterConfig.learn_boundaries)")
        return self.out_norm(self.boundary) * self.out_scale if self.out_norm is not None else self.boundary

    def ctc_logits(self, speech: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """CTC class scores (B, S, V + 1) of adapter outputs (B, S, D) against the LM's (V, D) embeddings + blank (V)."""
        if self.ctc_blank is None or self.ctc_log_scale is None:
            raise ValueError("this adapter has no CTC head (SpeechAdapterConfig.ctc_weight is 0)")
        table = torch.cat([token_embeddings.to(speech.dtype), self.ctc_blank[None].to(speech.dtype)])
        return F.normalize(speech, dim=-1) @ F.normalize(table, dim=-1).T * self.ctc_log_scale.exp()

    @torch.no_grad()
    def set_output_rms(self, rms: float) -> None:
        """Scale the normalised outputs to `rms` (the LM's token-embedding RMS); used with `match_embedding_rms`."""
        self.out_scale.fill_(rms)

    @staticmethod
    def out_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Adapter outputs for `lengths` encoder frames: ceil(n / 2) (kernel 3, stride 2, padding 1)."""
        return torch.div(lengths + 1, 2, rounding_mode="floor")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, in_dim), (B,) -> (B, T2, out_dim), (B,)."""
        valid_in = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        x = x * valid_in[..., None]  # padding frames do not leak into the convolution
        h = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, T2, dim)
        out_len = self.out_lengths(lengths)
        valid = torch.arange(h.shape[1], device=x.device)[None, :] < out_len[:, None]
        h = self.proj(self.norm(self.layer(h, valid)))
        return (self.out_norm(h) * self.out_scale if self.out_norm is not None else h), out_len
