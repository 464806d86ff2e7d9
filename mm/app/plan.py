"""`mm plan`: the per-GPU memory of a training config under FSDP2, and the largest micro-batch that fits.

    mm plan --config CFG --gpus N --gpu-memory GIB [--seq-len T] [--batch B] [--json] [KEY=VALUE ...]

The model is built by the stage's own `build` on the meta device (`StageContext(shapes_only=True)`): parameter
counts are exact, no weight is allocated and no data is read. What trains comes from the stage itself
(`Stage.trainable`); which modules are checkpointed and which are FSDP2 units come from the stage's declared
`ParallelPlan` (`Stage.parallel_plan`), the one the runner applies. Every stage is planned: lm-pretrain (the LM
shape from `model:`, the vocabulary from `tokenizer.vocab_size` unless overridden), the image stages (the frozen LM
from `lm:`, an HF directory's config.json or, for planning, an LM preset name; or `init_from_hf_mllama:`'s
config.json; an image-stage sample is one image of `data.max_tiles` tiles and `--seq-len` text tokens), and
clip-pretrain, bestrq-pretrain, video and speech from the files their configs name (tokenizer, LM directory,
image bundle; the LM read lazily, its weights never). Activations are modelled for lm-pretrain, the image
stages, clip-pretrain (`mm.app.plan_activations_clip`: a sample is one image and one caption, and the contrastive
logits make the total quadratic in the micro-batch), bestrq-pretrain and speech (`mm.app.plan_activations_speech`:
a sample is one clip of `data.features.max_seconds`, with `--seq-len` LM positions for speech) and video
(`mm.app.plan_activations_video`: one clip of `data.n_frames` frames and `--seq-len` text tokens): every stage in
`ACTIVATION_STAGES`; for a stage outside it the plan gives parameters, gradients, optimizer state and FSDP
buffers, and no max_batch.

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

Activations: `mm.app.plan_activations` (its docstring has the formulas, per part, and the attention kernels).

total = parameters + gradients + optimizer state + activations (per sample x micro-batch, + clip-pretrain's
contrastive logits per pair, the speech stage's CTC class table and one `train.loss_chunk` chunk of the LM loss per
micro-step) + FSDP buffers. It bounds the peak from above:
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
from typing import TYPE_CHECKING, Any

from mm.app.plan_activations import (
    AC_MODES,
    ACTIVATION_STAGES,
    STAGE_NOTES,
    activation_bytes,
    doc_mask_bytes,
    largest_batch,
    lm_layer_bytes,
    lm_layer_selective_bytes,
    loss_chunk_bytes,
    vit_block_bytes,
    xattn_media_bytes,
    xattn_text_bytes,
)
from mm.app.plan_activations_clip import contrastive_pair_bytes
from mm.app.plan_activations_speech import ctc_table_bytes

if TYPE_CHECKING:
    from torch import nn

    from mm.training.parallelize import ParallelPlan
    from mm.training.stage import Stage

GIB = 1 << 30
DTYPES = {
    "trainable_params": "fp32 (sharded master weights)",
    "frozen_params": "bf16",
    "compute": "bf16 (FSDP2 param_dtype)",
    "grads": "fp32 (reduce_dtype)",
    "optimizer": "AdamW, 2 x fp32",
    "activations": "bf16 (fp32 norm inputs, log-sum-exp and log-probabilities)",
}
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


# ---- the config and its model on the meta device ------------------------------------------------------------
def load_stage(config: str, overrides: list[str] | None = None) -> Stage:
    """The stage a config names (its `stage:` key), its model built by the stage's own `build` on the meta
    device for shapes only (no weight, tokenizer or data is read)."""
    import torch

    from mm.app.train_commands import stage_name
    from mm.training.config import load_config
    from mm.training.stage import StageContext, stage_class

    overrides = list(overrides or [])
    name = stage_name(config, overrides, "")
    if not name:
        raise ValueError(
            f"{config} names no stage: add a `stage:` key (mm plan plans any stage `mm train` runs)"
        )
    cls = stage_class(name)
    cfg = load_config(
        cls.config_class, config, [o for o in overrides if not o.startswith("kind=")] + [f"stage={name}"]
    )
    stage = cls(cfg, StageContext(device=torch.device("meta"), shapes_only=True))
    with torch.device("meta"):
        stage.build(torch.device("meta"))
    return stage


# ---- parameters and FSDP units ------------------------------------------------------------------------------
def shard_numel(shape: tuple[int, ...], gpus: int) -> int:
    """Elements of FSDP2's dim-0 shard on rank 0: ceil(dim0 / gpus) x the other dims."""
    if not shape:
        return 1
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


def _params(module: nn.Module, trainable: set[int], gpus: int, sharded: set[int]) -> dict[str, int]:
    """Counts of a module's parameters (each once): total and per GPU (a `sharded` one: its FSDP2 shard),
    trainable and frozen."""
    out = {"trainable": 0, "frozen": 0, "trainable_shard": 0, "frozen_shard": 0}
    for p in module.parameters():
        kind = "trainable" if id(p) in trainable else "frozen"
        out[kind] += p.numel()
        out[f"{kind}_shard"] += shard_numel(tuple(p.shape), gpus) if id(p) in sharded else p.numel()
    return out


def state_bytes(stage: Stage, plan: ParallelPlan, gpus: int) -> tuple[dict[str, int], int, int, int, int]:
    """(parameter counts, and per-GPU bytes of parameters, gradients, optimizer state, FSDP buffers): FSDP2
    shards the parameters of the plan's root but not its replicated parts; the rest stays whole."""
    trainable = {id(p) for _, p in stage.trainable()}
    units = plan.fsdp_units or []
    whole = {id(p) for m in plan.replicated for p in m.parameters()}
    sharded = {id(p) for p in plan.root.parameters() if id(p) not in whole} if plan.sharded else set()
    counts = _params(stage.model, trainable, gpus, sharded)
    params = 4 * counts["trainable_shard"] + 2 * counts["frozen_shard"]
    grads = 4 * counts["trainable_shard"]
    optimizer = 8 * counts["trainable_shard"]
    buffers = 0
    if units:
        in_units = {id(p) for u in units for p in u.parameters()}
        root = [p for p in plan.root.parameters() if id(p) in sharded and id(p) not in in_units]
        root_trainable = sum(p.numel() for p in root if id(p) in trainable)
        unit_peak = 0
        for u in units:
            n = _params(u, trainable, gpus, sharded)
            unit_peak = max(unit_peak, 4 * (n["trainable"] + n["frozen"]) + 6 * n["trainable"])
        buffers = 2 * sum(p.numel() for p in root) + 2 * root_trainable + unit_peak
    return counts, params, grads, optimizer, buffers


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
    parallel = stage.parallel_plan()
    units = parallel.fsdp_units or []
    counts, params, grads, optimizer, buffers = state_bytes(stage, parallel, gpus)
    modelled = stage.name in ACTIVATION_STAGES
    by_part, transient = activation_bytes(stage, T, ac) if modelled else ({}, 0)
    per_sample = sum(by_part.values()) + transient
    chunk = loss_chunk_bytes(stage) if modelled else 0  # one loss chunk's head, whatever the micro-batch
    step = ctc_table_bytes(stage) + chunk  # once per micro-step, whatever the micro-batch
    pairs = gpus * contrastive_pair_bytes(stage)  # per (image, text) pair: B x (gpus x B) of them
    fixed = params + grads + optimizer + buffers + step
    budget = int(gpu_memory_gib * GIB)
    max_batch = largest_batch(budget - fixed, per_sample, pairs)
    total = fixed + B * per_sample + B * B * pairs

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
        "activations_gib": gib(B * per_sample + B * B * pairs + step) if modelled else None,
        "fsdp_buffers_gib": gib(buffers),
        "total_gib": gib(total),
        "fits": total <= budget,
        "max_batch": int(max_batch) if modelled else None,
        "activations_detail_gib": {
            **{k: gib(B * v) for k, v in by_part.items()},
            "backward_transient": gib(B * transient),
            **({"ctc_table": gib(step - chunk)} if step - chunk else {}),
            **({"loss_chunk": gib(chunk)} if chunk else {}),
            **({"contrastive_logits": gib(B * B * pairs)} if pairs else {}),
        },
        "params": {
            "total": counts["trainable"] + counts["frozen"],
            "trainable": counts["trainable"],
            "frozen": counts["frozen"],
            "trainable_per_gpu": counts["trainable_shard"],
            "frozen_per_gpu": counts["frozen_shard"],
        },
        "dtypes": DTYPES,
        "sharding": f"FSDP2 fully_shard over {gpus} GPUs, {len(units)} block units + root"
        if units
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
    if stage.name not in ACTIVATION_STAGES:
        a.append(
            f"the activations of the {stage.name} stage (its encoders and losses) are not modelled: total counts "
            "parameters, gradients, optimizer state and FSDP buffers only, and no max_batch is given"
        )
    elif stage.name in STAGE_NOTES:
        a.append(STAGE_NOTES[stage.name])
    elif stage.name == "lm-pretrain":
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
        ("FSDP buffers", p["fsdp_buffers_gib"], "gathered bf16 params, unsharded grads"),
    ]
    if p["activations_gib"] is not None:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in p["activations_detail_gib"].items())
        rows.insert(3, ("activations", p["activations_gib"], detail))
    for name, v, note in rows:
        lines.append(f"  {name:<20}{v:>9.2f}  {note}")
    if p["activations_gib"] is None:
        lines.append(f"  {'activations':<20}{'-':>9}  not modelled for this stage (not in total)")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':<20}{p['total_gib']:>9.2f}  {verdict} in {p['gpu_memory_gib']:g} GiB")
    if "doc_mask_gib" in p:
        lines.append(f"  {'(document mask)':<20}{p['doc_mask_gib']:>9.2f}  not in total (module docstring)")
    fits = p["max_batch"] if p["max_batch"] is not None else "- (activations not modelled)"
    lines += ["", f"largest micro-batch that fits: {fits}"]
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


__all__ = [  # the activation formulas are `mm.app.plan_activations`'s, named here too for the plan's readers
    "AC_MODES",
    "activation_bytes",
    "cmd_plan",
    "doc_mask_bytes",
    "format_table",
    "lm_layer_bytes",
    "lm_layer_selective_bytes",
    "load_stage",
    "plan",
    "vit_block_bytes",
    "xattn_media_bytes",
    "xattn_text_bytes",
]
