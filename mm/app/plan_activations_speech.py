"""Activation memory of `mm plan` for the speech side: the Conformer speech encoder (`mm.encoders.speech`), the
BEST-RQ codebook heads and the speech adapter (`mm.adapters.speech`), in bytes per 40 ms encoder frame, bf16
compute in eager PyTorch (tests/mm/test_plan_speech.py checks each formula against `saved_tensors_hooks` on the
real modules at two tiny sizes).

A sample is one clip of `data.features.max_seconds` (10 ms log-mel hop, cropped there): 1 + 100 x max_seconds
feature frames, `stack` of them per encoder frame (N = that count // stack).

D Conformer width, F its FFN width, A its heads, n_mels x stack the stacked input; C codebooks of K entries:
- Conformer layer (trainable), per frame: 52D + 8F + 6A + 46, counted from the tensors one layer
  (`_conformer_layer`) saves on a tiny instance and written per unit: the two Macaron FFNs, the self-attention
  (its padding mask kept as a bf16 bias per head, 2A, and a fp32 log-sum-exp per head, 4A), the convolution
  module (its fp32 masked BatchNorm included) and the final LayerNorm; the kernel size adds nothing. Five
  LayerNorms keep fp32 statistics (8 B each per frame on CUDA, counted; the CPU keeps them in bf16, 4 B). Per
  batch, not per frame, the masked BatchNorm keeps fp32 statistics (20D + 12 B per layer): not counted.
- Encoder stem, per frame: 2 x n_mels x stack + 2 (the stacked bf16 input of the stacking Linear and the
  boolean padding and BEST-RQ masks).
- BEST-RQ heads, per masked frame: 2D + C(4K + 8) (the heads' input, fp32 log-probabilities and the int64
  targets); their backward adds 8CK per masked frame (the log-probabilities' and the logits' fp32 gradients).
  Masked frames per clip: the expected share 1 - (1 - mask_prob)^mask_span of its frames (rounded up).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mm.app.plan_activations import _Acts

if TYPE_CHECKING:
    from mm.training.stage import Stage


# ---- formulas (bytes per encoder frame) -------------------------------------------------------------------------
def conformer_layer_bytes(dim: int, ffn_dim: int, heads: int) -> int:
    """Bytes per frame one trainable Conformer layer of the speech encoder saves for the backward (CUDA)."""
    return 52 * dim + 8 * ffn_dim + 6 * heads + 46


def speech_stem_bytes(n_mels: int, stack: int) -> int:
    """Bytes per frame the speech encoder saves outside its layers (stacked input, padding and span masks)."""
    return 2 * n_mels * stack + 2


def bestrq_head_bytes(dim: int, codebooks: int, codebook_size: int) -> tuple[int, int]:
    """(bytes per masked frame the BEST-RQ heads and loss save; the loss backward's extra bytes per masked frame)."""
    return 2 * dim + codebooks * (4 * codebook_size + 8), 8 * codebooks * codebook_size


def encoder_frames(stage: Stage) -> int:
    """Encoder frames of one clip of `data.features.max_seconds` (10 ms hop, `stack` frames per encoder frame)."""
    feats = 1 + int(round(100 * stage.cfg.data.features.max_seconds))
    return feats // stage.cfg.speech_encoder.stack


# ---- stages ------------------------------------------------------------------------------------------------------
def _conformer_acts(acts: _Acts, stage: Stage, frames: int) -> None:
    """The speech encoder's activations for one clip of `frames` encoder frames into `acts` (nothing checkpointed)."""
    e = stage.cfg.speech_encoder
    acts.add("speech_encoder", speech_stem_bytes(e.n_mels, e.stack) * frames)
    acts.add("speech_encoder", e.n_layers * conformer_layer_bytes(e.dim, e.ffn_dim, e.n_heads) * frames)


def bestrq_activation_bytes(stage: Stage) -> tuple[dict[str, int], int]:
    """(bytes one clip saves for the backward, by part; the loss backward's transient) of bestrq-pretrain."""
    acts, frames = _Acts(), encoder_frames(stage)
    _conformer_acts(acts, stage, frames)
    q, e = stage.cfg.bestrq, stage.cfg.speech_encoder
    masked = math.ceil(frames * (1 - (1 - q.mask_prob) ** q.mask_span))
    saved, extra = bestrq_head_bytes(e.dim, q.n_codebooks, q.codebook_size)
    acts.add("codebook_logits", saved * masked)
    acts.peak(extra * masked)
    return acts.saved, acts.transient
