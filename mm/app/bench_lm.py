"""`mm bench` items 1, 2 and 5: our LM against transformers' `LlamaForCausalLM` on the same weights: the
training step (tokens/s, first-step losses, FLOP/s for the MFU) and greedy KV-cached generation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mm.app.bench_config import DTYPES, BenchConfig
from mm.app.bench_timing import matmul_calls, rate, speedups, time_generation, time_interleaved


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


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels shifted, not logits (no copy of the (B, T, V) logits)."""
    labels = F.pad(tokens[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _lm_train_step(model: torch.nn.Module, tokens: torch.Tensor, dtype: str, hf: bool) -> Callable[[], float]:
    """A training step (forward, backward, AdamW) of either LM on `tokens`; returns the step's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)

    def step() -> float:
        with _autocast(dtype):
            if hf:
                loss = model(input_ids=tokens, labels=tokens).loss
            else:
                loss = _next_token_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _lm_flops_per_token(bc: BenchConfig) -> float:
    from mm.lm.config import LMConfig

    return float(LMConfig(**bc.lm).flops_per_token(bc.train_seq))


def bench_lm_train(bc: BenchConfig, dtype: str) -> dict[str, Any]:
    """Items 1 and 5: training-step tokens/s of both LMs, their first-step losses on the same batch, and the
    matmul peak of `dtype` timed in turn with the steps (same machine load) for the MFU."""
    ours, hf = lm_pair(bc)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, bc.lm["vocab_size"], (bc.train_batch, bc.train_seq), generator=g)
    steps = {
        name: _lm_train_step(m, tokens, dtype, hf=name == "hf") for name, m in (("ours", ours), ("hf", hf))
    }
    out: dict[str, Any] = {}
    for name in ("ours", "hf"):
        out[f"loss_{name}"] = steps[name]()  # the first warm-up step: same weights, same batch -> same loss
        for _ in range(bc.warmup - 1):
            steps[name]()
    a = torch.randn(bc.matmul_n, bc.matmul_n, dtype=DTYPES[dtype])
    b = torch.randn(bc.matmul_n, bc.matmul_n, dtype=DTYPES[dtype])
    k = matmul_calls(a, b)
    timed = time_interleaved({**steps, "matmul": lambda: [a @ b for _ in range(k)]}, bc.repeats)
    ntok = bc.train_batch * bc.train_seq
    out["ours"], out["hf"] = rate(ntok, timed["ours"]), rate(ntok, timed["hf"])
    out["matmul_peak"] = rate(2 * bc.matmul_n**3 * k, [round(t, 5) for t in timed["matmul"]])
    out["loss_abs_diff"] = abs(out["loss_ours"] - out["loss_hf"])
    out["speedup"], out["speedup_paired"] = speedups(out["ours"], out["hf"])
    cfg_flops = _lm_flops_per_token(bc)
    for name in ("ours", "hf"):
        out[name]["flops_per_s"] = out[name]["per_s"] * cfg_flops
    return out


@torch.inference_mode()
def bench_generate(bc: BenchConfig, batch: int) -> dict[str, Any]:
    """Item 2: greedy KV-cached generation, new tokens/s, and whether both produce the same tokens."""
    from mm.lm import generate

    ours, hf = (m.eval() for m in lm_pair(bc))
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, bc.lm["vocab_size"], (batch, bc.gen_prompt), generator=g)

    def run_hf(n: int) -> list[list[int]]:
        out = hf.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        return out[:, bc.gen_prompt :].tolist()

    runs = {"ours": lambda n: generate(ours, prompt, n), "hf": run_hf}
    return time_generation(runs, bc.gen_new, bc.warmup, bc.repeats, work=batch * bc.gen_new)
