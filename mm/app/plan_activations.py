"""Activation memory of `mm plan`, in bytes per token, for bf16 compute in eager PyTorch as the code is written:
what autograd saves for the backward (tests/mm/test_plan.py checks each formula against `saved_tensors_hooks` on
the real modules).

d model width, H / KV query / key-value heads, h head width, f SwiGLU width, V vocabulary:
- LM layer, trainable: 16d + 4h(H + KV) + 8f + 4H + 8. Two RMSNorms keep an fp32 copy of their input (4d), the
  normalised bf16 input of the weight product (2d) and an fp32 rstd (4); the projections' inputs 2 x 2d; q 2Hh;
  k and v 2 x 2KVh; the attention output 2Hh and its fp32 log-sum-exp 4H; SwiGLU w1 and w3 outputs, silu output,
  product: 4 x 2f.
- LM layer, frozen, with a gradient flowing through it (adapter stages: layers from the first cross-attention
  block on): 8d + 4h(H + KV) + 6f + 4H + 8 (nothing is kept for a weight gradient); before that block: 0.
- Full activation checkpointing (non-reentrant `torch.utils.checkpoint` on each of the plan's `blocks`): a block keeps
  only its input, 2d; the backward recomputes one block at a time, whose full figure is a transient peak.
- selective-op (torchtitan's op policy, to compare with its published figures; LM layers only, other checkpointed
  blocks as full): 4d + 4Hh + 2KVh + 2f + 4H (input, the wq, wv, w1, w2 outputs, attention output, log-sum-exp).
- Gated cross-attention block (trainable), per text token: 20d + 10Hh + 8f + 8H + 2M + 9, M media tokens (the
  boolean media mask becomes an additive bf16 bias that the attention kernel keeps, 2M); per media token and
  block: 10KVh + 4KV (k, v and k's RMSNorm); shared by all blocks: the media tokens 2d (per media token) and the
  boolean mask M (per text token). Checkpointed: the text side keeps 2d, the media side stays.
- ViT block (timm `Block`, trainable), per token: 16D + 4F + 4A + 16 (D width, F MLP width, A heads: two
  LayerNorms' input and output, qkv, attention output, fp32 log-sum-exp and LayerNorm statistics, fc1 and GELU
  outputs); a gated global block adds 4D (the gate products' inputs). Per image: the tile attention mask 2(TL)^2
  (mask_mode mllama; T tiles of L tokens padded to 8; one tensor shared by every block), the stem and features:
  6p^2 per patch (bf16 pixels), 4D + 2(1 + K)D per token (positions, K intermediate layers' features) and 2D + 8
  per padded token (final LayerNorm). The image stages do not checkpoint the encoder (not in the plan's `blocks`).
- Output and loss: the fp32 log-probabilities 4V (the logits are cast to fp32 for cross-entropy) + 8 (targets) +
  the final norm (6d + 4; frozen 4d + 4) + the output projection's input (2d, when it trains); while the loss
  backward runs, the log-probabilities' gradient and the logits' fp32 gradient add 8V: the transient peak of the
  step for Llama-sized vocabularies.
- Chunked loss (`train.loss_chunk` = c tokens, `mm.lm.loss`): per token only the head's input rows 2d and the
  targets 8 stay; one chunk's head (its saved bytes and its backward's, as above) is a transient of c tokens
  whatever the micro-batch (`loss_chunk_bytes`, counted once per micro-step beside the per-sample figures).
activations(batch) = batch x (everything saved + the largest transient: the loss backward or one recomputed block).
clip-pretrain, bestrq-pretrain and speech: `mm.app.plan_activations_clip` and `mm.app.plan_activations_speech`
(their docstrings have the formulas; `activation_bytes` dispatches to them); video: the aggregator and the frozen
image encoder in `mm.app.plan_activations_video`, its cross-attention blocks and frozen LM as above.

Attention kernel: SDPA's fused kernels (flash / cuDNN for the LM's causal self-attention, memory-efficient for the
masked cross-attention and ViT attention) keep q, k, v, the output and a log-sum-exp per row, never the T x S
scores; FlexAttention and varlen attention (lm-pretrain's document attention on packed rows, `doc_attention`
auto on CUDA, flex or varlen) keep the same. Only `doc_attention: dense` builds a (B, 1, T, T) boolean mask, which
the memory-efficient kernel turns into a bf16 T x T bias per layer: reported as `doc_mask_gib` beside the total,
not in it (torchtitan's figures have plain causal masks).

"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from mm.lm.config import LMConfig
    from mm.training.stage import Stage

AC_MODES = ("none", "full", "selective-op")
ACTIVATION_STAGES = (
    "lm-pretrain",
    "image-pretrain",
    "image-anneal",
    "bestrq-pretrain",
    "speech",
    "clip-pretrain",
    "video",
)  # the stages whose activations are modelled
STAGE_NOTES = {  # what the figures of the stages modelled in the plan_activations_* modules assume
    "bestrq-pretrain": "one clip of data.features.max_seconds per sample (--seq-len unused), its expected share of "
    "masked frames (1 - (1 - mask_prob)^mask_span) through the codebook heads; nothing checkpointed, replicated",
    "clip-pretrain": "one image of data.max_tiles tiles and one caption of text.max_len tokens per sample (--seq-len "
    "unused); contrastive logits over gpus x micro-batch texts (quadratic in the micro-batch); the image encoder "
    "is not checkpointed",
    "video": "one clip of data.n_frames frames of the image bundle's max_tiles tiles and --seq-len text tokens per "
    "sample; the frozen image encoder runs under no_grad (its largest block's working set as a transient); the "
    "video-text contrastive loss is not counted",
    "speech": "one clip of data.features.max_seconds and --seq-len LM positions (its speech slots among them) per "
    "sample; the speech encoder and adapter are not checkpointed; CTC targets bounded by the adapter frames; the "
    "CTC class table is saved once per step (ctc_table)",
}


# ---- activation formulas (bytes per token) ------------------------------------------------------------------
def lm_layer_bytes(c: LMConfig, trainable: bool = True) -> int:
    """Bytes per token one LM layer saves for the backward (trainable, or frozen with a gradient through it)."""
    d, h, H, KV, f = c.dim, c.hd, c.n_heads, c.n_kv_heads, c.hidden_dim
    if trainable:
        return 16 * d + 4 * h * (H + KV) + 8 * f + 4 * H + 8
    return 8 * d + 4 * h * (H + KV) + 6 * f + 4 * H + 8


def lm_layer_selective_bytes(c: LMConfig) -> int:
    """Bytes per token one LM layer keeps under torchtitan's selective op checkpointing policy."""
    d, h, H, KV, f = c.dim, c.hd, c.n_heads, c.n_kv_heads, c.hidden_dim
    return 4 * d + 4 * H * h + 2 * KV * h + 2 * f + 4 * H


def xattn_text_bytes(c: LMConfig, n_media: int) -> int:
    """Bytes per text token one gated cross-attention block saves (n_media media tokens per sample)."""
    d, h, H, f = c.dim, c.hd, c.n_heads, c.hidden_dim
    return 20 * d + 10 * H * h + 8 * f + 8 * H + 2 * n_media + 9


def xattn_media_bytes(c: LMConfig) -> int:
    """Bytes per media token one cross-attention block saves for its keys and values."""
    return 10 * c.n_kv_heads * c.hd + 4 * c.n_kv_heads


def vit_block_bytes(width: int, mlp_width: int, heads: int, gated: bool = False) -> int:
    """Bytes per token one trainable timm ViT block saves (a gated global block keeps its gate inputs too)."""
    return 16 * width + 4 * mlp_width + 4 * heads + 16 + (4 * width if gated else 0)


def head_bytes(c: LMConfig, trainable: bool = True) -> tuple[int, int]:
    """(bytes per token the final norm, output projection and loss save; the loss backward's extra bytes)."""
    d, V = c.dim, c.vocab_size
    saved = 4 * V + 8 + (6 * d + 4 + 2 * d if trainable else 4 * d + 4)
    return saved, 8 * V


def loss_chunk_tokens(stage: Stage) -> int:
    """The stage's `train.loss_chunk` (tokens of the LM loss at a time; 0: the whole micro-batch at once)."""
    return max(0, int(getattr(stage.cfg.train, "loss_chunk", 0)))


def loss_chunk_bytes(stage: Stage) -> int:
    """Bytes of one loss chunk's head, forward and backward, once per micro-step (0 without a chunk or an LM)."""
    chunk, lm = loss_chunk_tokens(stage), getattr(stage.model, "lm", stage.model)
    if not chunk or stage.name not in ACTIVATION_STAGES or stage.name in ("clip-pretrain", "bestrq-pretrain"):
        return 0
    trainable = {id(p) for _, p in stage.trainable()}
    saved, extra = head_bytes(lm.cfg, trainable=_trains(lm.output, trainable))
    return chunk * (saved + extra)


def add_head(acts: _Acts, c: LMConfig, trainable: bool, tokens: int, chunked: bool) -> None:
    """The loss head's per-sample bytes into `acts`: whole, or (chunked) its input rows and targets only."""
    if chunked:
        acts.add("logits", (2 * c.dim + 8) * tokens)
        return
    saved, extra = head_bytes(c, trainable=trainable)
    acts.add("logits", saved * tokens)
    acts.peak(extra * tokens)


# ---- activations -----------------------------------------------------------------------------------------------
class _Acts:
    """Per-sample activation bytes by part, and the largest transient of the backward."""

    def __init__(self) -> None:
        self.saved: dict[str, int] = {}
        self.transient = 0

    def add(self, part: str, n: int) -> None:
        self.saved[part] = self.saved.get(part, 0) + int(n)

    def peak(self, n: int) -> None:
        self.transient = max(self.transient, int(n))

    def block(self, part: str, full: int, checkpointed: int | None, tokens: int) -> None:
        """A block saving `full` bytes per token, or `checkpointed` (recomputing the rest in the backward)."""
        if checkpointed is None:
            self.add(part, full * tokens)
        else:
            self.add(part, checkpointed * tokens)
            self.peak(max(0, full - checkpointed) * tokens)


def _trains(module: nn.Module | None, trainable: set[int]) -> bool:
    return module is not None and any(id(p) in trainable for p in module.parameters())


def _encoder_acts(acts: _Acts, enc: nn.Module, tiles: int, ckpt: set[int]) -> int:
    """The image encoder's activations for one image into `acts`; returns its media tokens."""
    c = enc.cfg
    n_tok = enc.num_tokens_per_tile
    L = n_tok + (-n_tok) % 8 if c.mask_mode == "mllama" else n_tok
    tokens, real, D = tiles * L, tiles * n_tok, enc.width
    patches = tiles * enc.vit.patch_embed.num_patches
    rest = 6 * c.patch_size**2 * patches + (4 * D + 2 * (1 + len(c.intermediate_layers)) * D) * real
    rest += (2 * D + 8) * tokens + (2 * tokens * tokens if c.mask_mode == "mllama" else 2 * tokens)
    # (the module a checkpoint would wrap, its timm Block, gated)
    blocks = [(b, b, False) for b in enc.vit.blocks] + [(g, g.block, True) for g in enc.global_layers]
    per_token = [
        vit_block_bytes(D, b.mlp.fc1.out_features, b.attn.num_heads, gated) for _, b, gated in blocks
    ]
    if (
        id(enc) in ckpt
    ):  # the whole encoder as one checkpointed block: its pixels stay, the rest is recomputed
        acts.add("image_encoder", 2 * 3 * c.tile_size**2 * tiles)
        acts.peak(rest + sum(per_token) * tokens)
        return real
    acts.add("image_encoder", rest)
    for (module, _, _), full in zip(blocks, per_token, strict=True):
        acts.block("image_encoder", full, 2 * D if id(module) in ckpt else None, tokens)
    return real


def activation_bytes(stage: Stage, seq_len: int, ac: str) -> tuple[dict[str, int], int]:
    """(bytes one sample saves for the backward, by part; the largest transient of its backward)."""
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing {ac!r}; allowed: {list(AC_MODES)}")
    if stage.name == "bestrq-pretrain":
        from mm.app.plan_activations_speech import bestrq_activation_bytes

        return bestrq_activation_bytes(stage)
    if stage.name == "clip-pretrain":
        from mm.app.plan_activations_clip import clip_activation_bytes

        return clip_activation_bytes(stage, ac)
    if stage.name == "speech":
        from mm.app.plan_activations_speech import speech_activation_bytes

        return speech_activation_bytes(stage, seq_len, ac)
    model = stage.model
    trainable = {id(p) for _, p in stage.trainable()}
    ckpt = {id(m) for m in stage.parallel_plan().blocks} if ac != "none" else set()
    lm = getattr(model, "lm", model)
    c: LMConfig = lm.cfg
    T, acts = seq_len, _Acts()
    xattn = getattr(model, "image_xattn", None) or {}
    n_media = 0
    enc = getattr(model, "image_encoder", None)
    if stage.name == "video":  # the frozen image path is not run: the video blocks join the aggregated frames
        from mm.app.plan_activations_video import video_media_acts

        xattn, n_media = model.video_xattn, video_media_acts(acts, stage)
    elif xattn and enc is not None:
        if not _trains(enc, trainable):
            raise ValueError("mm plan models a trainable image encoder (image stages)")
        n_media = _encoder_acts(acts, enc, stage.cfg.data.max_tiles, ckpt)
    flows = _trains(lm.tok_embeddings, trainable) or _trains(
        getattr(model, "extra_tok_embeddings", None), trainable
    )
    if flows:
        acts.add("embeddings", 8 * T)  # token ids kept for the embedding gradient
    if any(_trains(b, trainable) for b in xattn.values()):
        acts.add("cross_attention", 2 * c.dim * n_media + n_media * T)  # media tokens, boolean media mask
    for i, layer in enumerate(lm.layers):
        block = xattn[str(i)] if str(i) in xattn else None
        if block is not None and _trains(block, trainable):
            acts.add("cross_attention", xattn_media_bytes(c) * n_media)
            kept = 2 * c.dim if id(block) in ckpt else None
            acts.block("cross_attention", xattn_text_bytes(c, n_media), kept, T)
            flows = True
        trains = _trains(layer, trainable)
        if not (flows or trains):
            continue  # nothing before it trains: no gradient reaches it
        full = lm_layer_bytes(c, trainable=trains)
        kept = None
        if id(layer) in ckpt:
            kept = min(full, lm_layer_selective_bytes(c)) if ac == "selective-op" else 2 * c.dim
        acts.block("lm_layers", full, kept, T)
        flows = True
    if flows:
        add_head(acts, c, _trains(lm.output, trainable), T, bool(loss_chunk_tokens(stage)))
    return acts.saved, acts.transient


def largest_batch(free: int, per_sample: int, per_pair: int = 0) -> int:
    """The largest micro-batch B with B x per_sample + B^2 x per_pair <= free (0 when nothing is modelled)."""
    if not per_sample or free < per_sample + per_pair:
        return 0
    if not per_pair:
        return free // per_sample
    b = int((math.sqrt(per_sample**2 + 4 * per_pair * free) - per_sample) / (2 * per_pair))
    while b * per_sample + b * b * per_pair > free:
        b -= 1
    while (b + 1) * per_sample + (b + 1) ** 2 * per_pair <= free:
        b += 1
    return b


def doc_mask_bytes(stage: Stage, seq_len: int, ac: str) -> int:
    """Per-sample bytes of lm-pretrain's dense document mask (bool, shared) and its per-layer bf16 bias (kept)."""
    if stage.name != "lm-pretrain" or getattr(stage.model.cfg, "doc_attention", "dense") != "dense":
        return 0  # flex / varlen document attention (and "auto" on CUDA) keep no T x T tensor
    layers = 1 if ac != "none" and stage.parallel_plan().blocks else len(stage.model.layers)
    return seq_len * seq_len * (1 + 2 * layers)
