"""Activation memory of `mm plan` for the video stage's media side, bf16 compute in eager PyTorch: the frozen image
encoder and the temporal aggregator (`mm.adapters.temporal_aggregator`). The video cross-attention blocks
(trainable), the frozen LM layers from the first of them on and the output and loss are the image stages'
formulas (`mm.app.plan_activations`), with the aggregated latents as the media tokens. tests/mm/test_plan_video.py
checks the aggregator's formula against `saved_tensors_hooks` at two tiny sizes.

A sample is one clip of `data.n_frames` frames of the image bundle's `max_tiles` tiles and `--seq-len` text tokens.
- Image encoder (frozen, under no_grad): it saves nothing; its transient is its largest block's working set on
  the clip's frames, bounded by what that block would save with a gradient (`vit_block_bytes` per token over
  n_frames x tiles x padded tile tokens).
- Temporal aggregator (trainable), D the LM width, m its FFN multiple, A its heads, X = n_frames x N frame tokens
  (N = tiles x tokens per tile), Λ = n_frames / merge x n_latents latents, per sample:
  X(2D + 8 + 2D if motion) + depth x [X(6D + 10) + Λ(18D + 4mD + 4A + 18)] + 8Λ,
  counted from the aggregator's saved tensors on tiny instances and written per unit: the frame LayerNorm and the
  motion difference per frame token; per layer the media LayerNorm, the key-value projection's input (media and
  latents) and the key padding mask per frame token, and per latent the latents' LayerNorm, q, k, v, the
  attention output and fp32 log-sum-exp per head, the FFN (LayerNorm, fc1 and GELU outputs, 4mD) and the
  residual sums; the final LayerNorm per latent. LayerNorms keep fp32 statistics (8 B per token on CUDA, counted;
  the CPU keeps them in bf16, 4 B). The video-text contrastive loss (aggregator.contrastive) keeps a few fp32
  numbers per (clip, caption) pair and per clip: not counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mm.app.plan_activations import _Acts, vit_block_bytes

if TYPE_CHECKING:
    from mm.training.stage import Stage


def aggregator_bytes(
    dim: int, ffn_mult: int, heads: int, depth: int, frame_tokens: int, latents: int, motion: bool = True
) -> int:
    """Bytes one clip's temporal aggregator saves (frame_tokens frame tokens in, latents latent tokens out)."""
    per_frame = 2 * dim + 8 + (2 * dim if motion else 0)
    per_layer = frame_tokens * (6 * dim + 10) + latents * (18 * dim + 4 * ffn_mult * dim + 4 * heads + 18)
    return frame_tokens * per_frame + depth * per_layer + 8 * latents


def video_media_acts(acts: _Acts, stage: Stage) -> int:
    """The video stage's image encoder transient and aggregator activations into `acts`; returns its media tokens."""
    m, cfg = stage.model, stage.cfg
    enc, agg = m.image_encoder, m.video_aggregator
    tiles, frames = stage.image_meta["max_tiles"], cfg.data.n_frames
    n_tok = enc.num_tokens_per_tile
    padded = n_tok + (-n_tok) % 8 if enc.cfg.mask_mode == "mllama" else n_tok
    blocks = [(b, False) for b in enc.vit.blocks] + [(g.block, True) for g in enc.global_layers]
    widest = max(vit_block_bytes(enc.width, b.mlp.fc1.out_features, b.attn.num_heads, g) for b, g in blocks)
    acts.peak(widest * frames * tiles * padded)
    first = agg.layers[0]
    latents = frames // agg.merge * agg.n_latents
    heads, mult = first[0].n_heads, first[1].w1.out_features // agg.dim
    total = aggregator_bytes(
        agg.dim, mult, heads, len(agg.layers), frames * tiles * n_tok, latents, agg.motion is not None
    )
    acts.add("video_aggregator", total)
    return latents
