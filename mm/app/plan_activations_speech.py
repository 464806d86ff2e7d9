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
- Speech adapter (trainable), per adapter frame (ceil(N / 2): the stride-2 convolution), I its input width (the
  Conformer's D), W its width, A' its heads, h' = W / A', G its FFN width, O the LM width: 4I + 38W + 8G + 6O +
  4A' + 4h' + 20, counted from the adapter's saved tensors on a tiny instance and written per unit: the
  convolution's input (two encoder frames, 2I each) and GELU input, the rotary Transformer layer (the LM layer's
  trainable figure with H = KV heads of width h', plus the fp32 RoPE cos and sin, 4h'), the final RMSNorm and
  projection (8W + 4) and the output RMSNorm (6O + 4).
- speech stage: one clip (N encoder frames) and --seq-len LM positions (the speech slots among them); the frozen
  LM's layers all carry a gradient (the speech embeddings enter at the input): each the frozen-layer figure
  (`mm.app.plan_activations`), checkpointed as the stage's plan says; output and loss as the image stages'.
- Its CTC loss (adapter.ctc_weight > 0), V LM vocabulary, L transcript tokens (bounded here by the adapter
  frames, the longest target CTC aligns), per adapter frame: 4O + 6(V + 1) + 8L + 8 (the normalised outputs and
  their norms, the bf16 scores and their fp32 log-probabilities, CTC's fp32 forward variables over 2L + 1
  states, the targets); per step, whatever the batch: the normalised class table, (V + 1)(4O + 4) (`ctc_table`
  in the plan, outside the per-sample figure); its backward adds 8(V + 1) per adapter frame.
- CTC compression (adapter.ctc_compress) hides frames with a padding mask: the LM builds a dense (T, T) boolean
  mask per sample (T^2), which the memory-efficient kernel keeps as a bf16 bias per layer (2T^2 each; under
  checkpointing one layer's at a time, as for lm-pretrain's dense document mask).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mm.app.plan_activations import _Acts, add_head, lm_layer_bytes, loss_chunk_tokens

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


def speech_adapter_bytes(in_dim: int, dim: int, heads: int, ffn_dim: int, out_dim: int) -> int:
    """Bytes per adapter frame the trainable speech adapter saves (two encoder frames in, one LM-width frame out)."""
    return 4 * in_dim + 38 * dim + 8 * ffn_dim + 6 * out_dim + 4 * heads + 4 * (dim // heads) + 20


def ctc_bytes(out_dim: int, vocab: int, targets: int) -> tuple[int, int]:
    """(bytes per adapter frame the CTC loss saves; its backward's extra bytes per adapter frame)."""
    return 4 * out_dim + 6 * (vocab + 1) + 8 * targets + 8, 8 * (vocab + 1)


def ctc_table_bytes(stage: Stage) -> int:
    """Bytes per step (not per sample) the speech stage's CTC loss saves for its class table (0 without CTC)."""
    if stage.name != "speech" or not stage.cfg.adapter.ctc_weight:
        return 0
    c = stage.model.lm.cfg
    return (c.vocab_size + 1) * (4 * c.dim + 4)


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


def speech_activation_bytes(stage: Stage, seq_len: int, ac: str) -> tuple[dict[str, int], int]:
    """(bytes one sample saves for the backward, by part; the largest transient of its backward) of speech."""
    acts, frames = _Acts(), encoder_frames(stage)
    _conformer_acts(acts, stage, frames)
    lm, a, e = stage.model.lm, stage.cfg.adapter, stage.cfg.speech_encoder
    c = lm.cfg
    slots = (frames + 1) // 2
    acts.add("speech_adapter", speech_adapter_bytes(e.dim, a.dim, a.n_heads, a.ffn_dim, c.dim) * slots)
    ckpt = {id(m) for m in stage.parallel_plan().blocks} if ac != "none" else set()
    full = lm_layer_bytes(c, trainable=False)
    for layer in lm.layers:
        acts.block("lm_layers", full, 2 * c.dim if id(layer) in ckpt else None, seq_len)
    if a.ctc_weight:
        saved, extra = ctc_bytes(c.dim, c.vocab_size, slots)
        acts.add("ctc", saved * slots)
        acts.peak(extra * slots)
    if a.ctc_compress:
        biases = 1 if any(id(layer) in ckpt for layer in lm.layers) else len(lm.layers)
        acts.add("attention_mask", seq_len * seq_len * (1 + 2 * biases))
    add_head(acts, c, False, seq_len, bool(loss_chunk_tokens(stage)))
    return acts.saved, acts.transient
