"""Activation memory of `mm plan` for clip-pretrain (`mm.encoders.clip`), bf16 compute in eager PyTorch, in bytes
per sample (one image of `data.max_tiles` tiles and its caption of `text.max_len` tokens) and per (image, text)
pair of the contrastive logits; tests/mm/test_plan_clip.py checks them against `saved_tensors_hooks` on the real
modules at two tiny sizes.

- Image encoder: the image stages' figures (`mm.app.plan_activations`: ViT blocks per token, stem and features per
  image), none checkpointed (the stage checkpoints only the text tower's layers).
- Pooling and heads, per sample, F the features' width ((1 + K) x D), E the embedding width, V the vocabulary:
  `image_pool: max` keeps the masked features it reduces (2F per real token) and its result; the image
  projection's input (2F) and its normalised output (the fp32 cast and norms: 8E + 8); with `bag_of_words`,
  the head's fp32 log-probabilities and soft targets (8V) and their row sums (8).
- Text tower (trainable): per token, the token ids (8) and one trainable LM layer per layer (the lm-pretrain
  figure of the tower's shape; checkpointed: its input, 2d); per sample, the pooled final RMSNorm and projection
  input (8d + 4), the normalised text embedding (8E + 8) and the pooling indices (16).
- Contrastive loss over N = gpus x micro-batch texts (the embeddings are gathered across processes): per
  (image, text) pair, the fp32 log-probabilities of both directions, 8 B (`multi_positive` keeps the logits and
  their masked copies instead, 14 B); its backward adds as much again. Per sample, the fp32 embeddings it
  normalises again and their norms: 12E + 24 (+ 8 with `multi_positive`). The plan's total is then quadratic
  in the micro-batch B: B x per-sample + B x B x gpus x per-pair (`contrastive_logits`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mm.app.plan_activations import _Acts, _encoder_acts, lm_layer_bytes

if TYPE_CHECKING:
    from mm.training.stage import Stage


def clip_pair_bytes(multi_positive: bool = False) -> int:
    """Bytes the contrastive loss saves per (image, text) pair of its logits."""
    return 14 if multi_positive else 8


def clip_loss_sample_bytes(embed: int, multi_positive: bool = False) -> int:
    """Bytes the contrastive loss saves per sample (its fp32 embeddings and norms), besides its pairs."""
    return 12 * embed + 24 + (8 if multi_positive else 0)


def contrastive_pair_bytes(stage: Stage) -> int:
    """Bytes per (image, text) pair of clip-pretrain's contrastive loss, its backward's included (0 elsewhere)."""
    if stage.name != "clip-pretrain":
        return 0
    return 2 * clip_pair_bytes(stage.cfg.multi_positive)


def clip_head_bytes(features: int, embed: int, vocab: int, tokens: int, pool: str) -> int:
    """Bytes per sample the image pooling, projection and bag-of-words head save (vocab 0: no head)."""
    pooled = 2 * features * tokens if pool == "max" else 0
    return pooled + 2 * features + 8 * embed + 8 + (8 * vocab + 8 if vocab else 0)


def text_tower_bytes(stage: Stage, ckpt: set[int]) -> tuple[int, int]:
    """(bytes per sample the text tower saves, its largest recomputed layer's extra) for text.max_len tokens."""
    tower = stage.model.text_tower
    c, T = tower.cfg, stage.cfg.text.max_len
    full = lm_layer_bytes(c, trainable=True)
    saved, extra = 8 * T + 8 * c.dim + 4 + 8 * tower.embed_dim + 8 + 16, 0
    for layer in tower.transformer.layers:
        kept = 2 * c.dim if id(layer) in ckpt else full
        saved += kept * T
        extra = max(extra, (full - kept) * T)
    return saved, extra


def clip_activation_bytes(stage: Stage, ac: str) -> tuple[dict[str, int], int]:
    """(bytes one sample saves for the backward, by part; the largest transient) of clip-pretrain, the
    contrastive logits left out (`clip_pair_bytes`, per pair)."""
    acts, m = _Acts(), stage.model
    ckpt = {id(b) for b in stage.parallel_plan().blocks} if ac != "none" else set()
    enc = m.image_encoder
    real = _encoder_acts(acts, enc, stage.cfg.data.max_tiles, ckpt)
    vocab = m.bow_head.out_features if m.bow_head is not None else 0
    acts.add("image_pool", clip_head_bytes(enc.features_dim, m.embed_dim, vocab, real, m.image_pool))
    saved, extra = text_tower_bytes(stage, ckpt)
    acts.add("text_tower", saved)
    acts.peak(extra)
    acts.add("contrastive", clip_loss_sample_bytes(m.embed_dim, stage.cfg.multi_positive))
    return acts.saved, acts.transient
