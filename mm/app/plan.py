"""`mm plan`: the per-GPU memory of a training config under FSDP2, and the largest micro-batch that fits.

    mm plan --config CFG --gpus N --gpu-memory GIB [--seq-len T] [--batch B] [--json] [KEY=VALUE ...]

The model is built on the meta device (`with torch.device("meta")`): parameter counts are exact, no weight is
allocated, no data or tokenizer is read. What trains comes from the stage itself (`Stage.trainable`), which modules
are checkpointed from the plan's `blocks` (the runner wraps exactly those when `train.activation_checkpointing` is on),
and the FSDP2 units from the stage's declared `ParallelPlan` (`Stage.parallel_plan`, what the runner applies). Planned stages:
lm-pretrain (the LM shape from `model:`, the vocabulary from `tokenizer.vocab_size` unless overridden) and the
image stages (the frozen LM from `lm:`, an HF directory's config.json or, for planning, an LM preset name; or
`init_from_hf_mllama:`'s config.json). An image-stage sample is one image of `data.max_tiles` tiles and
`--seq-len` text tokens.

Precision and sharding: torchtitan's defaults, FSDP2 `fully_shard` over N GPUs with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`:
- trainable parameters live as fp32 shards (the master weights, 4 B / N each), are gathered in bf16 for compute,
  their gradients are reduce-scattered in fp32 into fp32 shards (4 B / N), and AdamW keeps two fp32 moments
  (8 B / N);
- frozen parameters (the LM of the adapter stages) are stored in bf16 (2 B / N), with no gradient and no state;
- a shard is FSDP2's dim-0 chunk on rank 0, ceil(dim0 / N) x the other dims, summed over the meta tensors;
- FSDP buffers (transient): the root unit (what no block holds: embeddings, final norm, output) gathered in bf16
  for the whole step (2 B x root) with its trainable part's unsharded bf16 gradient held through the backward
  (2 B), and the largest block unit gathered twice (itself and the prefetched next, 2 x 2 B) with its unsharded
  bf16 gradient and the fp32 copy that is reduce-scattered (2 B + 4 B per trainable parameter).

Activations, in bytes per token, for bf16 compute in eager PyTorch as the code is written: what autograd saves
for the backward (tests/mm/test_plan.py checks each formula against `saved_tensors_hooks` on the real modules).
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
activations(batch) = batch x (everything saved + the largest transient: the loss backward or one recomputed block).

Attention kernel: SDPA's fused kernels (flash / cuDNN for the LM's causal self-attention, memory-efficient for the
masked cross-attention and ViT attention) keep q, k, v, the output and a log-sum-exp per row, never the T x S
scores; FlexAttention and varlen attention (lm-pretrain's document attention on packed rows, `doc_attention`
auto on CUDA, flex or varlen) keep the same. Only `doc_attention: dense` builds a (B, 1, T, T) boolean mask, which
the memory-efficient kernel turns into a bf16 T x T bias per layer: reported as `doc_mask_gib` beside the total,
not in it (torchtitan's figures have plain causal masks).

total = parameters + gradients + optimizer state + activations + FSDP buffers. It bounds the peak from above:
with `zero_grad(set_to_none=True)` no gradient exists yet where activations peak (the start of the backward);
that slack covers what is not modelled: the CUDA context, NCCL buffers and allocator fragmentation.
`max_batch`: the largest micro-batch per GPU with total <= --gpu-memory (0: even parameters and state do not fit).

Checked against torchtitan's published figures (`TORCHTITAN_8B`, `TORCHTITAN_8B_32K`; Llama 3.1 8B, 8 H100, FSDP):
local batch 2 x 8192 tokens with selective op checkpointing, 82.4 GiB max reserved: the plan gives 75.95 GiB
(-7.8%); 1 x 32768 tokens with full checkpointing (and torch.compile + Float8), 83.9 GiB: 76.87 GiB (-8.4%).
The plan is below although it counts the gradients in full: torch's reserved memory exceeds what is allocated
(the caching allocator rounds and keeps freed blocks), and it leaves out the autograd working set of each
layer's backward, FSDP2's copy-out of all-gathered parameters and the RoPE tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from mm.lm.config import LMConfig
    from mm.training.stage import Stage

GIB = 1 << 30
AC_MODES = ("none", "full", "selective-op")
PLANNED_STAGES = ("lm-pretrain", "image-pretrain", "image-anneal")
JSON_KEYS = ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib", "max_batch")

# Published figures: torchtitan, benchmarks/llama3_h100_202412_torchtitan.md (the same tables are in its
# docs/performance.md), https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md
# Llama 3.1 8B on 8 H100 SXM with 96 GB HBM2e (Grand Teton), torch / torchtitan of 2024-12; "Memory(GiB)" is
# torchtitan's logged max reserved memory (torch.cuda.max_memory_reserved). seq_len 8192 and
# selective_ac_option "op" are train_configs/llama3_8b.toml's.
# Table 1: "1D Parallelism (FSDP). Llama 3.1 8B model. 8 GPUs. Local batch size 2, global batch size 16.
#   Selective activation checkpointing." row "FSDP" (eager): 5,762 TPS/GPU, 82.4 GiB.
# Table 2: "FSDP + CP + torch.compile + Float8. Llama 3.1 8B model. 8 GPUs. Local batch size 1. Full activation
#   checkpointing." row "FSDP 8, CP 1", sequence length 32768: 3,890 TPS/GPU, 83.9 GiB.
TORCHTITAN_SOURCE = (
    "https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md"
)
TORCHTITAN_8B = {
    "table": 1,
    "config": "configs/lm/llama3-8b.yaml",
    "gpus": 8,
    "gpu_memory_gib": 96e9 / GIB,
    "batch": 2,
    "seq_len": 8192,
    "activation_checkpointing": "selective-op",
    "memory_gib": 82.4,
}
TORCHTITAN_8B_32K = {
    **TORCHTITAN_8B,
    "table": 2,
    "batch": 1,
    "seq_len": 32768,
    "activation_checkpointing": "full",
    "memory_gib": 83.9,  # with torch.compile and Float8 linears (not modelled)
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


# ---- the config and its model on the meta device ------------------------------------------------------------
def lm_shape(lm: str) -> LMConfig:
    """The frozen LM's shape: an HF Llama directory's config.json, or (for planning) an LM preset name."""
    from mm.lm.config import PRESETS, preset
    from mm.lm.hf import config_from_hf

    if not lm:
        raise ValueError("`lm` must name the frozen LM: an HF Llama directory, or an LM preset for planning")
    file = Path(lm) / "config.json"
    if file.is_file():
        return config_from_hf(json.loads(file.read_text()), source=str(file))
    if lm in PRESETS:
        return preset(lm)
    raise FileNotFoundError(
        f"lm={lm!r}: no {file}, and not an LM preset name (mm plan reads one of {sorted(PRESETS)})"
    )


def _build_model(name: str, cfg: Any) -> nn.Module:
    """The stage's model, on the current (meta) device, without weights, tokenizer or data."""
    from mm.lm import Transformer

    if name == "lm-pretrain":
        extra = {} if "vocab_size" in cfg.model.overrides else {"vocab_size": cfg.tokenizer.vocab_size}
        try:
            return Transformer(cfg.model.build(**extra))
        except ValueError as e:
            raise ValueError(f"model (preset={cfg.model.preset!r}): {e}") from None
    import copy
    from types import SimpleNamespace

    from mm.stages.image import build_model, check_image_stage_config

    if cfg.init_from_hf_mllama:
        from mm.models.mllama import build_mllama_model, read_mllama_config

        spec = read_mllama_config(cfg.init_from_hf_mllama)
        return build_mllama_model(spec, hf_row_compat=cfg.xattn.hf_row_compat)
    check_image_stage_config(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.encoder_weights, cfg.image_encoder.weights = None, None  # shapes only
    lm_cfg = lm_shape(cfg.lm)
    return build_model(cfg, Transformer(lm_cfg), SimpleNamespace(image_id=lm_cfg.vocab_size))


def load_stage(config: str, overrides: list[str] | None = None) -> Stage:
    """The stage a config names (its `stage:` key), with its model built on the meta device."""
    import torch

    from mm.app.train_commands import stage_name
    from mm.training.config import load_config
    from mm.training.stage import stage_class

    overrides = list(overrides or [])
    name = stage_name(config, overrides, "")
    if not name:
        raise ValueError(
            f"{config} names no stage: add a `stage:` key (mm plan plans {list(PLANNED_STAGES)})"
        )
    cls = stage_class(name)
    if name not in PLANNED_STAGES:
        raise ValueError(f"stage={name!r}: mm plan models {list(PLANNED_STAGES)}, not this stage yet")
    cfg = load_config(
        cls.config_class, config, [o for o in overrides if not o.startswith("kind=")] + [f"stage={name}"]
    )
    stage = cls(cfg)
    with torch.device("meta"):
        stage.model = _build_model(name, cfg)
    return stage


# ---- parameters and FSDP units ------------------------------------------------------------------------------
def fsdp_units(stage: Stage) -> list[nn.Module]:
    """The units the stage's `ParallelPlan` hands to FSDP2; [] = replicated."""
    return list(stage.parallel_plan().fsdp_units or [])


def shard_numel(shape: tuple[int, ...], gpus: int) -> int:
    """Elements of FSDP2's dim-0 shard on rank 0: ceil(dim0 / gpus) x the other dims."""
    if not shape:
        return 1
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


def _params(module: nn.Module, trainable: set[int], gpus: int, sharded: bool) -> dict[str, int]:
    """Counts of a module's parameters (each once): total and per GPU, trainable and frozen."""
    out = {"trainable": 0, "frozen": 0, "trainable_shard": 0, "frozen_shard": 0}
    for p in module.parameters():
        kind = "trainable" if id(p) in trainable else "frozen"
        out[kind] += p.numel()
        out[f"{kind}_shard"] += shard_numel(tuple(p.shape), gpus) if sharded else p.numel()
    return out


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
    model = stage.model
    trainable = {id(p) for _, p in stage.trainable()}
    ckpt = {id(m) for m in stage.parallel_plan().blocks} if ac != "none" else set()
    lm = getattr(model, "lm", model)
    c: LMConfig = lm.cfg
    T, acts = seq_len, _Acts()
    xattn = getattr(model, "image_xattn", None) or {}
    n_media = 0
    enc = getattr(model, "image_encoder", None)
    if xattn and enc is not None:
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
    saved, extra = head_bytes(c, trainable=_trains(lm.output, trainable))
    if flows:
        acts.add("logits", saved * T)
        acts.peak(extra * T)
    return acts.saved, acts.transient


def doc_mask_bytes(stage: Stage, seq_len: int, ac: str) -> int:
    """Per-sample bytes of lm-pretrain's dense document mask (bool, shared) and its per-layer bf16 bias (kept)."""
    if stage.name != "lm-pretrain" or getattr(stage.model.cfg, "doc_attention", "dense") != "dense":
        return 0  # flex / varlen document attention (and "auto" on CUDA) keep no T x T tensor
    layers = 1 if ac != "none" and stage.parallel_plan().blocks else len(stage.model.layers)
    return seq_len * seq_len * (1 + 2 * layers)


# ---- the plan --------------------------------------------------------------------------------------------------
def _default_ac(stage: Stage) -> str:
    return "full" if stage.cfg.train.activation_checkpointing else "none"


def _default_batch(stage: Stage, gpus: int) -> int:
    tr = stage.cfg.train
    return tr.micro_batch_size if tr.micro_batch_size > 0 else max(1, math.ceil(tr.batch_size / gpus))


def plan(
    stage: Stage,
    *,
    gpus: int,
    gpu_memory_gib: float,
    seq_len: int | None = None,
    batch: int | None = None,
    activation_checkpointing: str | None = None,
    config: str = "",
) -> dict[str, Any]:
    """Per-GPU memory (GiB) of parameters, gradients, optimizer state, activations, buffers; and max_batch."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpu_memory_gib <= 0:
        raise ValueError(f"--gpu-memory must be > 0 GiB, got {gpu_memory_gib}")
    T = seq_len if seq_len is not None else stage.cfg.train.seq_len
    B = batch if batch is not None else _default_batch(stage, gpus)
    ac = activation_checkpointing or _default_ac(stage)
    if T < 1 or B < 1:
        raise ValueError(f"--seq-len and --batch must be >= 1, got {T} and {B}")
    model = stage.model
    trainable = {id(p) for _, p in stage.trainable()}
    units = fsdp_units(stage)
    sharded = bool(units)
    counts = _params(model, trainable, gpus, sharded)

    params = 4 * counts["trainable_shard"] + 2 * counts["frozen_shard"]
    grads = 4 * counts["trainable_shard"]
    optimizer = 8 * counts["trainable_shard"]
    buffers = 0
    if sharded:
        in_units = {id(p) for u in units for p in u.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_units]
        root_trainable = sum(p.numel() for p in root if id(p) in trainable)
        unit_peak = 0
        for u in units:
            n = _params(u, trainable, gpus, sharded)
            unit_peak = max(unit_peak, 4 * (n["trainable"] + n["frozen"]) + 6 * n["trainable"])
        buffers = 2 * sum(p.numel() for p in root) + 2 * root_trainable + unit_peak

    by_part, transient = activation_bytes(stage, T, ac)
    per_sample = sum(by_part.values()) + transient
    fixed = params + grads + optimizer + buffers
    budget = int(gpu_memory_gib * GIB)
    max_batch = max(0, (budget - fixed) // per_sample) if per_sample else 0
    total = fixed + B * per_sample

    def gib(n: float) -> float:
        return round(n / GIB, 3)

    out: dict[str, Any] = {
        "config": config,
        "stage": stage.name,
        "gpus": gpus,
        "gpu_memory_gib": gpu_memory_gib,
        "seq_len": T,
        "batch": B,
        "activation_checkpointing": ac,
        "params_gib": gib(params),
        "grads_gib": gib(grads),
        "optimizer_gib": gib(optimizer),
        "activations_gib": gib(B * per_sample),
        "fsdp_buffers_gib": gib(buffers),
        "total_gib": gib(total),
        "fits": total <= budget,
        "max_batch": int(max_batch),
        "activations_detail_gib": {
            **{k: gib(B * v) for k, v in by_part.items()},
            "backward_transient": gib(B * transient),
        },
        "params": {
            "total": counts["trainable"] + counts["frozen"],
            "trainable": counts["trainable"],
            "frozen": counts["frozen"],
            "trainable_per_gpu": counts["trainable_shard"],
            "frozen_per_gpu": counts["frozen_shard"],
        },
        "dtypes": {
            "trainable_params": "fp32 (sharded master weights)",
            "frozen_params": "bf16",
            "compute": "bf16 (FSDP2 param_dtype)",
            "grads": "fp32 (reduce_dtype)",
            "optimizer": "AdamW, 2 x fp32",
            "activations": "bf16 (fp32 norm inputs, log-sum-exp and log-probabilities)",
        },
        "sharding": f"FSDP2 fully_shard over {gpus} GPUs, {len(units)} block units + root"
        if sharded
        else "replicated (the stage shards nothing)",
        "attention_kernel": "fused SDPA (flash / cuDNN causal, memory-efficient masked): no T x S scores kept",
        "assumptions": assumptions(stage),
    }
    doc = doc_mask_bytes(stage, T, ac)
    if doc:
        out["doc_mask_gib"] = gib(B * doc)
    return out


def assumptions(stage: Stage) -> list[str]:
    """What the figures assume, in words (the module docstring has the formulas)."""
    a = [
        "FSDP2 with torchtitan's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 sharded master "
        "weights, bf16 gathered for compute, fp32 gradient shards; AdamW with two fp32 moments",
        "frozen parameters stored in bf16, sharded, no gradients or optimizer state",
        "activations as saved by eager PyTorch in bf16 (no torch.compile fusion); fused attention kernels keep no "
        "T x S scores; logits cast to fp32 for the loss",
        "total = sum of the parts: gradients counted although set_to_none frees them before the activation "
        "peak; CUDA context, NCCL buffers and allocator fragmentation are not counted",
        "max_batch: largest micro-batch per GPU with total <= --gpu-memory; gradient accumulation adds none",
        "activation checkpointing wraps the stage's blocks (ParallelPlan.blocks); selective-op is torchtitan's op "
        "policy for LM layers (other blocks as full)",
        "the trainer today sets no FSDP MixedPrecisionPolicy (fp32 gathers under autocast) and the image stages "
        "load the LM in fp32: both need more than planned here",
    ]
    if stage.name == "lm-pretrain":
        a.append(
            "document attention of packed rows by a fused kernel (flex / varlen); doc_attention: dense would add "
            "a bf16 T x T bias per layer (doc_mask_gib, not in total); the vocabulary is tokenizer.vocab_size"
        )
    else:
        a.append(
            "one image of data.max_tiles tiles per sample and --seq-len text tokens; the image encoder is one FSDP "
            "unit and its blocks are not checkpointed (not in the image stages' blocks)"
        )
    return a


# ---- the command ---------------------------------------------------------------------------------------------
def format_table(p: dict[str, Any]) -> str:
    """The plan as a small text table (per GPU)."""
    n = p["params"]
    lines = [
        f"{p['config'] or p['stage']} ({p['stage']}): {p['gpus']} GPUs x {p['gpu_memory_gib']:g} GiB, micro-batch "
        f"{p['batch']} x {p['seq_len']} tokens, activation checkpointing {p['activation_checkpointing']}",
        f"parameters {n['total'] / 1e9:.3f}B (trainable {n['trainable'] / 1e9:.3f}B, frozen {n['frozen'] / 1e9:.3f}B); "
        + p["sharding"],
        "",
        f"{'per GPU':<22}{'GiB':>9}",
    ]
    rows = [
        ("parameters", p["params_gib"], "fp32 trainable shards, bf16 frozen shards"),
        ("gradients", p["grads_gib"], "fp32 shards"),
        ("optimizer state", p["optimizer_gib"], "AdamW, 2 x fp32"),
        (
            "activations",
            p["activations_gib"],
            ", ".join(f"{k} {v:.2f}" for k, v in p["activations_detail_gib"].items()),
        ),
        ("FSDP buffers", p["fsdp_buffers_gib"], "gathered bf16 params, unsharded grads"),
    ]
    for name, v, note in rows:
        lines.append(f"  {name:<20}{v:>9.2f}  {note}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':<20}{p['total_gib']:>9.2f}  {verdict} in {p['gpu_memory_gib']:g} GiB")
    if "doc_mask_gib" in p:
        lines.append(f"  {'(document mask)':<20}{p['doc_mask_gib']:>9.2f}  not in total (module docstring)")
    lines += ["", f"largest micro-batch that fits: {p['max_batch']}"]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    """`mm plan`: print the per-GPU memory plan of a config (a table, or JSON with --json)."""
    stage = load_stage(args.config, list(getattr(args, "overrides", []) or []))
    p = plan(
        stage,
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory,
        seq_len=args.seq_len,
        batch=args.batch,
        activation_checkpointing=args.activation_checkpointing,
        config=args.config,
    )
    print(json.dumps(p, indent=2) if args.json else format_table(p), file=sys.stdout)
    return 0
