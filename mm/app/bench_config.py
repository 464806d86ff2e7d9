"""Shapes and repeat counts of `mm bench` (`BenchConfig`), its three presets, and the names the run shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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
# The same figures, mm's best against transformers' best (None where the run skipped that pair).
BEST_KEYS = (
    "lm_train_speedup_fp32_vs_best",
    "lm_train_speedup_bf16_vs_best",
    "generate_speedup_b1_vs_best",
    "generate_speedup_b8_vs_best",
    "caption_speedup_vs_best",
)
IMAGE_TOKEN_OFFSET = 0  # <|image|> = the first id after the LM's vocabulary, as Llama 3.2 Vision
BOS = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    # which figures also run the best pair (mm compiled against transformers compiled / static cache)
    best_dtypes: tuple[str, ...] = ("fp32", "bf16")
    best_gen_batches: tuple[int, ...] = (1, 8)
    best_caption: bool = True


def full_config() -> BenchConfig:
    """The issue's shapes, 5 timed repeats."""
    return BenchConfig(warmup=1, repeats=5)


def quick_config() -> BenchConfig:
    """The issue's shapes, 2 timed repeats (`--quick`)."""
    return BenchConfig(warmup=1, repeats=2, memory_steps=2)


def tiny_config() -> BenchConfig:
    """Tiny shapes for the test: everything runs in seconds; the best pair (compiles) for float32 training and
    batch-1 generation only."""
    return BenchConfig(
        lm=dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256, max_seq_len=64,
                rope_theta=10000.0),
        train_batch=2, train_seq=32, gen_prompt=8, gen_new=8, gen_batches=(1, 8),
        vision=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                    intermediate_size=64, image_size=28, patch_size=14, max_num_tiles=4,
                    intermediate_layers_indices=[1]),
        cross_attention_layers=(1, 4), adapter_batch=2, adapter_seq=12, caption_prompt=6, caption_new=6,
        matmul_n=128, warmup=1, repeats=2, memory_steps=1,
        best_dtypes=("fp32",), best_gen_batches=(1,), best_caption=False,
    )  # fmt: skip
