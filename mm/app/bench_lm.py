"""`mm bench` items 1, 2 and 5: our LM against transformers' `LlamaForCausalLM` on the same weights: the
training step (tokens/s, first-step losses, FLOP/s for the MFU) and greedy KV-cached generation, each as two
pairs: default against default (ours eager / `generate`'s "auto" decode, transformers eager / its dynamic cache)
and best against best (ours with compiled blocks / the compiled static-cache decode step, transformers compiled
with `model.compile()` / its static cache with `generate`'s compile)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mm.app.bench_config import DTYPES, BenchConfig
from mm.app.bench_timing import matmul_calls, rate, speedups, time_generation, time_interleaved

# the ratios each figure reports: suffix -> (our side, their side)
PAIRS = {"": ("ours", "hf"), "_vs_best": ("ours_best", "hf_best"), "_best_vs_default": ("ours_best", "hf")}


def pairs_for(sides: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The `PAIRS` whose two sides both ran."""
    return {k: (a, b) for k, (a, b) in PAIRS.items() if a in sides and b in sides}


def compile_best_pair(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Each side's best training setting: our blocks and loss compiled from outside the model (what
    `train.compile` does), transformers' model through `model.compile()` (what its Trainer's `torch_compile`
    does)."""
    from mm.training.parallelize import apply_compile, apply_compile_loss

    apply_compile(list(ours.layers))
    apply_compile_loss(ours)
    hf.compile()


def lm_pair(bc: BenchConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our `Transformer` and a transformers `LlamaForCausalLM` (SDPA) holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm.formats.hf_llama import config_to_hf, mm_to_hf_state_dict
    from mm.lm import Transformer
    from mm.lm.config import LMConfig

    torch.manual_seed(seed)
    cfg = LMConfig(**bc.lm)
    ours = Transformer(cfg)
    hf_cfg = LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(mm_to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: {missing} {unexpected}")
    return ours, hf


def _autocast(dtype: str) -> Any:
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _next_token_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token labels of `tokens`: shifted left, -100 at each row's end (what transformers shifts inside)."""
    return F.pad(tokens[:, 1:], (0, 1), value=-100)


def _lm_train_step(model: torch.nn.Module, tokens: torch.Tensor, dtype: str, hf: bool) -> Callable[[], float]:
    """A training step (forward, backward, AdamW) of either LM on `tokens`, each through its own loss path (ours:
    `labels=`, the summed cross-entropy over the count; transformers: `labels=`, its mean); returns the loss.
    AdamW's fused kernel on both sides: each trainer's default on one CPU process (ours: `Trainer`;
    transformers': "adamw_torch_fused" for torch >= 2.8)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    labels = _next_token_labels(tokens)
    count = int((labels != -100).sum())

    def step() -> float:
        with _autocast(dtype):
            if hf:
                loss = model(input_ids=tokens, labels=tokens).loss
            else:
                loss = model(tokens, labels=labels) / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _lm_flops_per_token(bc: BenchConfig) -> float:
    from mm.lm.config import LMConfig

    return float(LMConfig(**bc.lm).flops_per_token(bc.train_seq))


def bench_lm_train(bc: BenchConfig, dtype: str) -> dict[str, Any]:
    """Items 1 and 5: training-step tokens/s of both LMs (and, for `bc.best_dtypes`, of both compiled), their
    first-step losses on the same batch, each side's compile time (its first step less a timed one), and the
    matmul peak of `dtype` timed in turn with the steps (same machine load) for the MFU."""
    ours, hf = lm_pair(bc)
    models = {"ours": ours, "hf": hf}
    if dtype in bc.best_dtypes:
        ours_best, hf_best = lm_pair(bc)
        compile_best_pair(ours_best, hf_best)
        models.update(ours_best=ours_best, hf_best=hf_best)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, bc.lm["vocab_size"], (bc.train_batch, bc.train_seq), generator=g)
    steps = {}
    for name, m in models.items():
        m.train()
        steps[name] = _lm_train_step(m, tokens, dtype, hf=name.startswith("hf"))
    out: dict[str, Any] = {}
    first: dict[str, float] = {}
    for name in models:
        t0 = time.perf_counter()
        out[f"loss_{name}"] = steps[name]()  # the first warm-up step: same weights, same batch -> same loss
        first[name] = time.perf_counter() - t0
        for _ in range(bc.warmup - 1):
            steps[name]()
    a = torch.randn(bc.matmul_n, bc.matmul_n, dtype=DTYPES[dtype])
    b = torch.randn(bc.matmul_n, bc.matmul_n, dtype=DTYPES[dtype])
    k = matmul_calls(a, b)
    timed = time_interleaved({**steps, "matmul": lambda: [a @ b for _ in range(k)]}, bc.repeats)
    ntok = bc.train_batch * bc.train_seq
    cfg_flops = _lm_flops_per_token(bc)
    for name in models:
        out[name] = rate(ntok, timed[name])
        out[name]["flops_per_s"] = out[name]["per_s"] * cfg_flops
        out[name]["compile_s"] = round(max(0.0, first[name] - out[name]["median_s"]), 3)
    out["matmul_peak"] = rate(2 * bc.matmul_n**3 * k, [round(t, 5) for t in timed["matmul"]])
    for suffix, (x, y) in pairs_for(models).items():
        out[f"loss_abs_diff{suffix}"] = abs(out[f"loss_{x}"] - out[f"loss_{y}"])
        out[f"speedup{suffix}"], out[f"speedup_paired{suffix}"] = speedups(out[x], out[y])
    return out


def hf_generate(model: torch.nn.Module, best: bool, n: int, **inputs: torch.Tensor) -> torch.Tensor:
    """Transformers' greedy `generate` of exactly n new tokens; `best`: its static cache, whose decode step
    `generate` compiles (`CompileConfig`, asked for on the CPU too)."""
    kw: dict[str, Any] = {}
    if best:
        from transformers import CompileConfig

        cc = CompileConfig()
        cc._compile_all_devices = True  # transformers compiles on accelerators only unless asked
        kw = {"cache_implementation": "static", "compile_config": cc}
    return model.generate(
        **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw
    )


@torch.inference_mode()
def bench_generate(bc: BenchConfig, batch: int) -> dict[str, Any]:
    """Item 2: greedy KV-cached generation, new tokens/s, and whether both produce the same tokens; ours by
    default (`decode="auto"`) and compiled, transformers' by default and with its static cache compiled."""
    from mm.lm import generate
    from mm.lm.decode import resolve_decode_mode

    ours, hf = (m.eval() for m in lm_pair(bc))
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, bc.lm["vocab_size"], (batch, bc.gen_prompt), generator=g)
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    runs: dict[str, Callable[[int], list[list[int]]]] = {
        "ours": lambda n: generate(ours, prompt, n),
        "hf": lambda n: hf_generate(hf, False, n, **inputs)[:, bc.gen_prompt :].tolist(),
    }
    if batch in bc.best_gen_batches:
        runs["ours_best"] = lambda n: generate(ours, prompt, n, decode="compiled")
        runs["hf_best"] = lambda n: hf_generate(hf, True, n, **inputs)[:, bc.gen_prompt :].tolist()
    out = time_generation(runs, bc.gen_new, bc.warmup, bc.repeats, batch * bc.gen_new, pairs_for(runs))
    out["ours_decode"] = resolve_decode_mode("auto", ours)
    return out
