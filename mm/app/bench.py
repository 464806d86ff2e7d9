"""`mm bench`: our models side by side with transformers, in one process, on identical configs and weights
(issue 9). Five benchmarks:

1. LM training step (forward + backward + AdamW), tokens/s, ours vs `LlamaForCausalLM`, float32 and bf16 autocast.
2. Greedy KV-cached generation, new tokens/s, ours (`mm.lm.generate`) vs `LlamaForCausalLM.generate`.
3. Image-adapter step (LM frozen; encoder + cross-attention train), samples/s and peak memory: ours vs ours with
   the LM trainable, and vs `MllamaForConditionalGeneration` with its language model frozen.
4. Captioning (one 4-tile image): ours with cached media K/V vs `MllamaForConditionalGeneration.generate`.
5. MFU: the training step's FLOP/s (`LMConfig.flops_per_token`) over a large matmul timed in the same run.

Every figure is the median of `repeats` timed runs after `warmup` untimed ones; each side is checked to compute
the same losses / tokens as the other on the same weights (recorded in the JSON). Ratios are ours over theirs.

Peak memory on CPU: each configuration runs in a fresh Python process with glibc's mmap threshold fixed at
64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor buffer is its own mapping, returned to the kernel when freed;
the figure is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs once the model
is loaded, so the loading transient does not count) during the training steps minus its resident size before
the model was built (libraries already imported): weights + gradients + optimizer state + activations, as the
kernel counts them.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RATIO_KEYS = (
    "lm_train_speedup_fp32",
    "lm_train_speedup_bf16",
    "generate_speedup_b1",
    "generate_speedup_b8",
    "caption_speedup",
    "frozen_memory_ratio",
    "mllama_step_speedup",
    "mfu_fp32",
    "mfu_bf16",
)
IMAGE_TOKEN_OFFSET = 0  # <|image|> = the first id after the LM's vocabulary, as Llama 3.2 Vision
BOS = 1


@dataclass
class BenchConfig:
    """Shapes and repeat counts of one `mm bench` run."""

    lm: dict[str, Any] = field(
        default_factory=lambda: dict(
            dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1536, vocab_size=8192, max_seq_len=512,
            rope_theta=500000.0,
        )
    )  # fmt: skip
    train_batch: int = 4
    train_seq: int = 512
    gen_prompt: int = 128
    gen_new: int = 128
    gen_batches: tuple[int, ...] = (1, 8)
    vision: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=256, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=1024,
            image_size=112, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 1],
        )
    )  # fmt: skip
    cross_attention_layers: tuple[int, ...] = (3, 8)  # Mllama text-layer indices (before LM layers 3 and 7)
    adapter_batch: int = 4
    adapter_seq: int = 64
    caption_prompt: int = 16
    caption_new: int = 32
    matmul_n: int = 2048
    warmup: int = 1
    repeats: int = 5
    memory_steps: int = 2
    dtypes: tuple[str, ...] = ("fp32", "bf16")


def full_config() -> BenchConfig:
    """The issue's shapes, 5 timed repeats."""
    return BenchConfig(warmup=1, repeats=5)


def quick_config() -> BenchConfig:
    """The issue's shapes, 2 timed repeats (`--quick`)."""
    return BenchConfig(warmup=1, repeats=2, memory_steps=2)


def tiny_config() -> BenchConfig:
    """Tiny shapes for the test: everything runs in seconds."""
    return BenchConfig(
        lm=dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256, max_seq_len=64,
                rope_theta=10000.0),
        train_batch=2, train_seq=32, gen_prompt=8, gen_new=8, gen_batches=(1, 8),
        vision=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                    intermediate_size=64, image_size=28, patch_size=14, max_num_tiles=4,
                    intermediate_layers_indices=[1]),
        cross_attention_layers=(1, 4), adapter_batch=2, adapter_seq=12, caption_prompt=6, caption_new=6,
        matmul_n=128, warmup=1, repeats=2, memory_steps=1,
    )  # fmt: skip


# ---- timing ---------------------------------------------------------------------------------------------
def time_repeats(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, the sides taking turns (order alternating per round), so that load from
    other processes on a shared machine falls on every side alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def paired_speedup(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of theirs/ours time, each round's two runs back to back (robust to drifting load)."""
    return statistics.median(t / o for o, t in zip(ours, theirs))


def _rate(work: float, times: list[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return {"per_s": work / med, "median_s": med, "times_s": [round(t, 5) for t in times]}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _matmul_calls(a: torch.Tensor, b: torch.Tensor, seconds: float = 0.3) -> int:
    """How many a @ b fill about `seconds` (after a warm-up call)."""
    a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or k < 1:
        a @ b
        k += 1
    return k


def measure_matmul_peak(dtype: torch.dtype, n: int, warmup: int, repeats: int) -> dict[str, Any]:
    """FLOP/s of an n x n matmul in `dtype` (the MFU denominator), median of repeats of a ~0.3 s batch."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    k = _matmul_calls(a, b)
    return _rate(2 * n**3 * k, time_repeats(lambda: [a @ b for _ in range(k)], warmup, repeats))


# ---- models with identical weights ----------------------------------------------------------------------
def lm_pair(bc: BenchConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our `Transformer` and a transformers `LlamaForCausalLM` (SDPA) holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm.lm import Transformer
    from mm.lm.config import LMConfig
    from mm.lm.hf import config_to_hf, mm_to_hf_state_dict

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


def bench_lm_train(bc: BenchConfig, dtype: str) -> dict[str, Any]:
    """Items 1 and 5: training-step tokens/s of both LMs, their first-step losses on the same batch, and the
    matmul peak of `dtype` timed in turn with the steps (same machine load) for the MFU."""
    ours, hf = lm_pair(bc)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, bc.lm["vocab_size"], (bc.train_batch, bc.train_seq), generator=g)
    out: dict[str, Any] = {}
    steps = {}
    for name, model in (("ours", ours), ("hf", hf)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt, name: str = name) -> float:
            with _autocast(dtype):
                if name == "ours":
                    loss = _next_token_loss(model(tokens), tokens)
                else:
                    loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        steps[name] = step
    ntok = bc.train_batch * bc.train_seq
    for name in ("ours", "hf"):
        out[f"loss_{name}"] = steps[name]()  # the first warm-up step: same weights, same batch -> same loss
        for _ in range(bc.warmup - 1):
            steps[name]()
    a = torch.randn(bc.matmul_n, bc.matmul_n, dtype=_DTYPES[dtype])
    b = torch.randn(bc.matmul_n, bc.matmul_n, dtype=_DTYPES[dtype])
    k = _matmul_calls(a, b)
    steps["matmul"] = lambda: [a @ b for _ in range(k)]
    for name, times in time_interleaved(steps, bc.repeats).items():
        out[name] = _rate(ntok, times)
    out["matmul_peak"] = _rate(2 * bc.matmul_n**3 * k, out["matmul"]["times_s"])
    del out["matmul"]
    out["loss_abs_diff"] = abs(out["loss_ours"] - out["loss_hf"])
    out["speedup"] = out["ours"]["per_s"] / out["hf"]["per_s"]
    out["speedup_paired"] = paired_speedup(out["ours"]["times_s"], out["hf"]["times_s"])
    cfg_flops = _lm_flops_per_token(bc)
    for name in ("ours", "hf"):
        out[name]["flops_per_s"] = out[name]["per_s"] * cfg_flops
    return out


def _lm_flops_per_token(bc: BenchConfig) -> float:
    from mm.lm.config import LMConfig

    return float(LMConfig(**bc.lm).flops_per_token(bc.train_seq))


@torch.inference_mode()
def bench_generate(bc: BenchConfig, batch: int) -> dict[str, Any]:
    """Item 2: greedy KV-cached generation, new tokens/s, and whether both produce the same tokens."""
    from mm.lm import generate

    ours, hf = lm_pair(bc)
    ours.eval()
    hf.eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, bc.lm["vocab_size"], (batch, bc.gen_prompt), generator=g)
    res: dict[str, list[list[int]]] = {}

    def run_ours(n: int = bc.gen_new) -> None:
        res["ours"] = generate(ours, prompt, n)

    def run_hf(n: int = bc.gen_new) -> None:
        out = hf.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        res["hf"] = out[:, bc.gen_prompt :].tolist()

    out: dict[str, Any] = {}
    for fn in (run_ours, run_hf):
        for _ in range(bc.warmup):  # a short warm-up touches every code path
            fn(max(1, bc.gen_new // 8))
    for name, times in time_interleaved({"ours": run_ours, "hf": run_hf}, bc.repeats).items():
        out[name] = _rate(batch * bc.gen_new, times)
    out["tokens_equal"] = res["ours"] == res["hf"]
    out["tokens_agree_frac"] = _agreement(res["ours"], res["hf"])
    out["speedup"] = out["ours"]["per_s"] / out["hf"]["per_s"]
    out["speedup_paired"] = paired_speedup(out["ours"]["times_s"], out["hf"]["times_s"])
    return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated positions equal up to each row's first difference (1.0 = identical)."""
    same = total = 0
    for ra, rb in zip(a, b):
        k = 0
        while k < min(len(ra), len(rb)) and ra[k] == rb[k]:
            k += 1
        same, total = same + k, total + max(len(ra), len(rb))
    return same / max(1, total)


# ---- Mllama ---------------------------------------------------------------------------------------------
def mllama_config(bc: BenchConfig) -> Any:
    """A transformers `MllamaConfig` whose text model is the item-1 LM plus cross-attention layers."""
    from transformers import MllamaConfig

    lm = bc.lm
    v = dict(bc.vision)
    v["vision_output_dim"] = v["hidden_size"] * (1 + len(v["intermediate_layers_indices"]))
    text = dict(
        vocab_size=lm["vocab_size"], hidden_size=lm["dim"], num_hidden_layers=lm["n_layers"] + len(
            bc.cross_attention_layers), num_attention_heads=lm["n_heads"], num_key_value_heads=lm["n_kv_heads"],
        intermediate_size=lm["ffn_dim"], cross_attention_layers=list(bc.cross_attention_layers),
        max_position_embeddings=lm["max_seq_len"], rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=lm["rope_theta"]),
        bos_token_id=BOS, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return MllamaConfig(vision_config=v, text_config=text, image_token_index=lm["vocab_size"])


@torch.no_grad()
def save_mllama(bc: BenchConfig, path: Path, seed: int = 0) -> Path:
    """A random Mllama of `bc`'s shape (gates opened, so images matter), saved by transformers."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    hf = MllamaForConditionalGeneration(mllama_config(bc))
    for name, p in hf.named_parameters():
        if "gate" in name:  # transformers starts cross-attention gates at 0: open them
            p.uniform_(-1.0, 1.0)
    hf.save_pretrained(path)
    return path


def load_mllama_pair(path: Path, lm_trainable: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours (`load_hf_mllama`) and transformers' Mllama from one directory, both with their LM frozen."""
    from transformers import MllamaForConditionalGeneration

    ours = load_hf_mllama_for_bench(path, lm_trainable)
    hf = MllamaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    freeze_mllama_lm(hf, mllama_xattn_text_layers(hf))
    return ours, hf


def load_hf_mllama_for_bench(path: Path, lm_trainable: bool = False) -> torch.nn.Module:
    """Our MultimodalLM from a Mllama directory; encoder + cross-attention train (+ the LM if asked)."""
    from mm import load_hf_mllama

    ours = load_hf_mllama(path, trainable=("image_encoder", "image_xattn"))
    if lm_trainable:  # full fine-tuning, for the memory comparison only (a stage never does this)
        for p in ours.lm.parameters():
            p.requires_grad_(True)
    return ours


def mllama_xattn_text_layers(hf: torch.nn.Module) -> list[int]:
    """Indices of the cross-attention text layers of a transformers Mllama."""
    return list(hf.config.text_config.cross_attention_layers)


def freeze_mllama_lm(hf: torch.nn.Module, xattn: list[int]) -> None:
    """Freeze transformers Mllama's language model except its cross-attention layers."""
    keep = tuple(f"language_model.layers.{j}." for j in xattn)
    for name, p in hf.named_parameters():
        in_lm = "language_model." in name or name.startswith("lm_head.")
        p.requires_grad_(not in_lm or any(k in name for k in keep))


def adapter_batch(bc: BenchConfig, batch: int, seq: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """One image (max tiles, all real) per row and text that all sees it: <|image|> <bos> tokens..."""
    v, V = bc.vision, bc.lm["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    T, S = v["max_num_tiles"], v["image_size"]
    ids = torch.randint(3, V, (batch, seq), generator=g)
    ids[:, 0], ids[:, 1] = V + IMAGE_TOKEN_OFFSET, BOS
    aspect_ratio_id = _grid_id(T)
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(batch, 1, T, 3, S, S, generator=g),
        "aspect_ratio_ids": torch.full((batch, 1), aspect_ratio_id, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(batch, 1, T, dtype=torch.long),
        "cross_attention_mask": torch.ones(batch, seq, 1, T, dtype=torch.long),
    }


def _grid_id(max_tiles: int) -> int:
    """1-based id of the (2, 2) grid (or the largest square) in Mllama's supported aspect ratios."""
    from mm.datasets.tiling import supported_aspect_ratios

    grids = [tuple(g) for g in supported_aspect_ratios(max_tiles)]
    side = int(max_tiles**0.5)
    return grids.index((side, side)) + 1


def _adapter_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], hf: bool) -> torch.Tensor:
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[:, :2] = -100  # no loss on <|image|> <bos>
    if hf:
        logits = model(**batch).logits
    else:
        logits = model.forward_hf(**batch)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def adapter_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], hf: bool) -> Callable[[], float]:
    """A training step (forward, backward, AdamW over the trainable parameters) of an image-adapter model."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)

    def step() -> float:
        loss = _adapter_loss(model, batch, hf)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench_adapter(bc: BenchConfig, path: Path) -> dict[str, Any]:
    """Item 3: image-adapter training step, samples/s (in process) and peak memory (fresh processes)."""
    batch = adapter_batch(bc, bc.adapter_batch, bc.adapter_seq)
    ours, hf = load_mllama_pair(path)
    full = load_hf_mllama_for_bench(path, lm_trainable=True)
    out: dict[str, Any] = {}
    with torch.no_grad():
        ours.eval()
        hf.eval()
        out["loss_ours"] = float(_adapter_loss(ours, batch, hf=False))
        out["loss_hf"] = float(_adapter_loss(hf, batch, hf=True))
    out["loss_abs_diff"] = abs(out["loss_ours"] - out["loss_hf"])
    out["trainable_params"] = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad)
        for name, m in (("ours_frozen", ours), ("ours_lm_trainable", full), ("hf_frozen", hf))
    }
    steps = {
        name: adapter_step_fn(model, batch, name == "hf_frozen")
        for name, model in (("ours_frozen", ours), ("ours_lm_trainable", full), ("hf_frozen", hf))
    }
    for step in steps.values():
        for _ in range(bc.warmup):
            step()
    for name, times in time_interleaved(steps, bc.repeats).items():
        out[name] = _rate(bc.adapter_batch, times)
    del ours, hf, full
    for name in ("ours_frozen", "ours_lm_trainable", "hf_frozen"):
        out[name]["peak_mb"] = peak_memory_mb(bc, path, name)
    out["frozen_memory_ratio"] = out["ours_frozen"]["peak_mb"] / out["ours_lm_trainable"]["peak_mb"]
    out["hf_frozen_memory_ratio"] = out["ours_frozen"]["peak_mb"] / out["hf_frozen"]["peak_mb"]
    out["speedup_vs_hf"] = out["ours_frozen"]["per_s"] / out["hf_frozen"]["per_s"]
    out["speedup_vs_hf_paired"] = paired_speedup(out["ours_frozen"]["times_s"], out["hf_frozen"]["times_s"])
    out["speedup_vs_lm_trainable"] = out["ours_frozen"]["per_s"] / out["ours_lm_trainable"]["per_s"]
    return out


# ---- peak memory in a fresh process ---------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key}")


def memory_probe(bc_json: str, path: str, kind: str) -> float:
    """In a fresh process: MiB of peak resident memory of `memory_steps` adapter steps, above the pre-model RSS."""
    import transformers.models.mllama.modeling_mllama  # noqa: F401  (code, not training memory: import first)

    import mm.models.mllama  # noqa: F401

    bc = BenchConfig(**json.loads(bc_json))
    torch.manual_seed(0)
    batch = adapter_batch(bc, bc.adapter_batch, bc.adapter_seq)
    gc.collect()
    base = _proc_status_kb("VmRSS")
    if kind == "hf_frozen":
        from transformers import MllamaForConditionalGeneration

        model = MllamaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
        freeze_mllama_lm(model, mllama_xattn_text_layers(model))
    else:
        model = load_hf_mllama_for_bench(Path(path), lm_trainable=kind == "ours_lm_trainable")
    step = adapter_step_fn(model, batch, kind == "hf_frozen")
    gc.collect()
    # Forget the loading transient (file mapping + tensors read before they reach the model): reset the
    # high-water mark to the current resident size, model in memory.
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(bc.memory_steps):
        step()
    peak = _proc_status_kb("VmHWM")
    return (peak - base) / 1024


def peak_memory_mb(bc: BenchConfig, path: Path, kind: str) -> float:
    """Run `memory_probe` in a fresh Python process (mmap threshold fixed, so freed buffers leave RSS)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    code = (
        "import sys, torch; from mm.app.bench import memory_probe; "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        "print('PEAK_MB', memory_probe(sys.argv[1], sys.argv[2], sys.argv[3]))"
    )
    cfg = json.dumps(asdict(bc))
    res = subprocess.run(
        [sys.executable, "-c", code, cfg, str(path), kind],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in res.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    raise RuntimeError(f"memory probe {kind} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")


# ---- captioning -----------------------------------------------------------------------------------------
@torch.inference_mode()
def bench_caption(bc: BenchConfig, path: Path) -> dict[str, Any]:
    """Item 4: greedy caption of one max-tile image, ours (media K/V cached) vs transformers' generate."""
    from mm.lm import generate

    ours, hf = load_mllama_pair(path)
    ours.eval()
    hf.eval()
    batch = adapter_batch(bc, 1, bc.caption_prompt, seed=4)
    res: dict[str, list[list[int]]] = {}

    def run_ours(n: int = bc.caption_new) -> None:
        media = ours.encode_media(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        res["ours"] = generate(ours, batch["input_ids"], n, model_kwargs={"media": media})

    def run_hf(n: int = bc.caption_new) -> None:
        out = hf.generate(
            **batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        res["hf"] = out[:, bc.caption_prompt :].tolist()

    out: dict[str, Any] = {}
    for fn in (run_ours, run_hf):
        for _ in range(bc.warmup):
            fn(max(1, bc.caption_new // 8))
    for name, times in time_interleaved({"ours": run_ours, "hf": run_hf}, bc.repeats).items():
        out[name] = _rate(bc.caption_new, times)
    out["tokens_equal"] = res["ours"] == res["hf"]
    out["tokens_agree_frac"] = _agreement(res["ours"], res["hf"])
    out["speedup"] = out["ours"]["per_s"] / out["hf"]["per_s"]
    out["speedup_paired"] = paired_speedup(out["ours"]["times_s"], out["hf"]["times_s"])
    return out


# ---- the run --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(bc: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the five benchmarks; returns the JSON record (top-level ratio keys + details)."""
    import transformers

    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "load_average": list(os.getloadavg()),
            "warmup": bc.warmup,
            "repeats": bc.repeats,
            "note": "ratios are ours/theirs measured in one process; absolute numbers are noisy on a shared machine",
            "memory_method": "fresh process per config, MALLOC_MMAP_THRESHOLD_=65536, "
            "VmHWM (reset after loading) - VmRSS after imports, before the model",
        },
        "config": asdict(bc),
    }
    res["matmul_peak"] = {}
    for name in bc.dtypes:  # alone, before the rest; the MFU uses the peak timed among the training steps
        log(f"matmul peak {name}")
        res["matmul_peak"][name] = measure_matmul_peak(_DTYPES[name], bc.matmul_n, bc.warmup, bc.repeats)
    res["lm_train"] = {}
    for name in bc.dtypes:
        log(f"LM training step {name}")
        res["lm_train"][name] = bench_lm_train(bc, name)
        r = res["lm_train"][name]
        log(
            f"  speedup {r['speedup']:.3f}, ours {r['ours']['per_s']:.0f} tok/s, hf {r['hf']['per_s']:.0f} tok/s"
        )
        r["mfu_ours"] = r["ours"]["flops_per_s"] / r["matmul_peak"]["per_s"]
        r["mfu_hf"] = r["hf"]["flops_per_s"] / r["matmul_peak"]["per_s"]
    res["generate"] = {}
    for b in bc.gen_batches:
        log(f"generation batch {b}")
        r = res["generate"][f"b{b}"] = bench_generate(bc, b)
        log(
            f"  speedup {r['speedup']:.3f}, ours {r['ours']['per_s']:.1f} tok/s, hf {r['hf']['per_s']:.1f} tok/s"
        )
    with tempfile.TemporaryDirectory(prefix="mm-bench-") as tmp:
        path = save_mllama(bc, Path(tmp) / "mllama")
        log("image-adapter step")
        r = res["adapter_step"] = bench_adapter(bc, path)
        log(f"  vs hf {r['speedup_vs_hf']:.3f}, frozen/full memory {r['frozen_memory_ratio']:.3f}")
        log("captioning")
        r = res["caption"] = bench_caption(bc, path)
        log(f"  speedup {r['speedup']:.3f}")
    lt, gen, ad = res["lm_train"], res["generate"], res["adapter_step"]
    ratios = {
        "lm_train_speedup_fp32": lt["fp32"]["speedup"] if "fp32" in lt else None,
        "lm_train_speedup_bf16": lt["bf16"]["speedup"] if "bf16" in lt else None,
        "generate_speedup_b1": gen.get("b1", {}).get("speedup"),
        "generate_speedup_b8": gen.get("b8", {}).get("speedup"),
        "caption_speedup": res["caption"]["speedup"],
        "frozen_memory_ratio": ad["frozen_memory_ratio"],
        "mllama_step_speedup": ad["speedup_vs_hf"],
        "mfu_fp32": lt["fp32"]["mfu_ours"] if "fp32" in lt else None,
        "mfu_bf16": lt["bf16"]["mfu_ours"] if "bf16" in lt else None,
    }
    res["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    return {**ratios, **res}


def format_table(res: dict[str, Any]) -> str:
    """A Markdown table of the run: ours, transformers, ratio."""
    rows = [("benchmark", "ours", "transformers", "ratio (ours/theirs)")]
    for d, r in res["lm_train"].items():
        rows.append((f"LM train step {d}, tokens/s", f"{r['ours']['per_s']:.0f}", f"{r['hf']['per_s']:.0f}",
                     f"{r['speedup']:.2f}x (paired {r['speedup_paired']:.2f}x)"))  # fmt: skip
    for d, r in res["lm_train"].items():
        rows.append((f"MFU {d} (matmul peak {r['matmul_peak']['per_s'] / 1e9:.0f} GFLOP/s)",
                     f"{r['mfu_ours']:.2f}", f"{r['mfu_hf']:.2f}", f"{r['mfu_ours'] / r['mfu_hf']:.2f}x"))  # fmt: skip
    for b, r in res["generate"].items():
        rows.append((f"generate {b}, new tokens/s", f"{r['ours']['per_s']:.1f}", f"{r['hf']['per_s']:.1f}",
                     f"{r['speedup']:.2f}x (paired {r['speedup_paired']:.2f}x)"))  # fmt: skip
    a = res["adapter_step"]
    rows.append(("image-adapter step (LM frozen), samples/s", f"{a['ours_frozen']['per_s']:.2f}",
                 f"{a['hf_frozen']['per_s']:.2f}", f"{a['speedup_vs_hf']:.2f}x (paired {a['speedup_vs_hf_paired']:.2f}x)"))  # fmt: skip
    rows.append(("image-adapter step peak memory, MiB", f"{a['ours_frozen']['peak_mb']:.0f}",
                 f"{a['hf_frozen']['peak_mb']:.0f}", f"{a['hf_frozen_memory_ratio']:.2f}x"))  # fmt: skip
    rows.append(("ours, LM trainable: samples/s, peak MiB",
                 f"{a['ours_lm_trainable']['per_s']:.2f}, {a['ours_lm_trainable']['peak_mb']:.0f}", "-",
                 f"frozen/full memory {a['frozen_memory_ratio']:.2f}x"))  # fmt: skip
    c = res["caption"]
    rows.append(("caption (1 image, 4 tiles), new tokens/s", f"{c['ours']['per_s']:.1f}", f"{c['hf']['per_s']:.1f}",
                 f"{c['speedup']:.2f}x (paired {c['speedup_paired']:.2f}x)"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def checks(res: dict[str, Any]) -> list[str]:
    """Parity checks of the run (both sides computed the same thing); empty when all hold."""
    bad = []
    for d, r in res["lm_train"].items():
        tol = 1e-3 if d == "fp32" else 5e-2
        if r["loss_abs_diff"] > tol:
            bad.append(f"LM train {d}: losses differ by {r['loss_abs_diff']:.2e}")
    for b, r in res["generate"].items():
        if not r["tokens_equal"]:
            bad.append(f"generate {b}: tokens differ (agreement {r['tokens_agree_frac']:.3f})")
    if res["adapter_step"]["loss_abs_diff"] > 1e-3:
        bad.append(f"adapter step: losses differ by {res['adapter_step']['loss_abs_diff']:.2e}")
    if not res["caption"]["tokens_equal"]:
        bad.append(f"caption: tokens differ (agreement {res['caption']['tokens_agree_frac']:.3f})")
    return bad


def main(json_path: str | None = None, quick: bool = False) -> int:
    """`mm bench`: run, print the table (stdout), write the JSON; exit 1 if a parity check fails."""
    bc = quick_config() if quick else full_config()
    res = run_bench(bc, log=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    res["checks_failed"] = checks(res)
    print(format_table(res))
    print({k: None if res[k] is None else round(res[k], 3) for k in RATIO_KEYS})
    for msg in res["checks_failed"]:
        print(f"mm bench: parity check failed: {msg}", file=sys.stderr)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["checks_failed"] else 0
