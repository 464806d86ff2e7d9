"""How `generate` runs its one-token decode steps (`DECODE_MODES`), and the compiled step.

- "dynamic": the cache grows by one position per step and attention sees the filled prefix (new shapes every
  step; nothing to compile).
- "static": after the prefill the cache switches to its static mode (`KVCache.start_static`): the new key goes
  to a tensor position and attention runs over the whole buffer under a mask, so every step has the same shapes.
- "compiled": the static step through `torch.compile` (one graph for every step: fused norms, RoPE, SwiGLU and
  the mask, no Python per layer; on CUDA with CUDA graphs, "reduce-overhead"). Compiling costs seconds to tens
  of seconds once per model, batch size and cache length in each process (cache lengths are rounded up to
  `LENGTH_BUCKET`; Inductor's disk cache does not keep frozen graphs).
- "auto" (the default): "compiled" for a model of at least `AUTO_COMPILE_MIN_PARAMS` parameters, whose
  decode step reads enough weights that the compiled step saves milliseconds per token, and "dynamic" below it
  (the demo's and the tests' models: a compile of seconds to tens of seconds per shape would not pay there).
  `set_default_decode_mode` (the CLI's `--decode`) or the environment variable `MM_DECODE` fix one mode instead.

The prefill (the whole prompt) always runs eagerly on the dynamic cache: its shape changes with every prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .kv_cache import KVCache

DECODE_MODES = ("auto", "dynamic", "static", "compiled")
LENGTH_BUCKET = 64  # compiled/static caches are allocated in multiples of this (fewer distinct shapes)

AUTO_COMPILE_MIN_PARAMS = 8_000_000
_default: dict[str, str] = {}


def set_default_decode_mode(mode: str) -> None:
    """Set what "auto" means for every later `generate` call ("auto", "dynamic", "static" or "compiled")."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "auto":  # no fixed mode: `MM_DECODE`, else the size rule
        _default.pop("mode", None)
    else:
        _default["mode"] = mode


def default_decode_mode() -> str:
    """The process-wide mode: `set_default_decode_mode`'s, else `MM_DECODE`'s, else "auto"."""
    import os

    mode = _default.get("mode") or os.environ.get("MM_DECODE") or "auto"
    if mode not in DECODE_MODES:
        raise ValueError(f"MM_DECODE must be one of {DECODE_MODES}, got {mode!r}")
    return mode


def resolve_decode_mode(mode: str, model: torch.nn.Module) -> str:
    """The concrete mode `generate` runs `model` with: "auto" -> the process default, and an "auto" default ->
    "compiled" for models of at least `AUTO_COMPILE_MIN_PARAMS` parameters, else "dynamic"."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "auto":
        mode = default_decode_mode()
    if mode == "auto":
        lm = getattr(model, "lm", model)  # a composite model decodes through its LM (encoders run once)
        n = sum(p.numel() for p in lm.parameters())
        mode = "compiled" if n >= AUTO_COMPILE_MIN_PARAMS else "dynamic"
    return mode


def cache_length(total: int, max_seq_len: int, mode: str) -> int:
    """The cache length for `total` positions: exact when dynamic, else rounded up to `LENGTH_BUCKET` (at most
    `max_seq_len`, and never below `total`)."""
    if mode == "dynamic":
        return total
    return max(total, min(-(-total // LENGTH_BUCKET) * LENGTH_BUCKET, max_seq_len))


def _step(
    model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kw: dict[str, Any]
) -> torch.Tensor:
    """One forward of one new token per row on a static cache: the last logits (B, V)."""
    return model(tokens, positions=positions, cache=cache, last_only=True, **kw)[:, -1]


# Inductor's CPU options for the decode step: weights folded in as constants and prepacked ("freezing"), and
# its C++ GEMM templates tried against the library's ("max_autotune": at one to a few rows per step they
# win by about 2x); no autotuning report on stderr.
CPU_OPTIONS: dict[str, Any] = {
    "freezing": True,
    "max_autotune": True,
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def quiet_compile_logs() -> None:
    """Import what Inductor imports on its first compile with the one warning it prints on a machine without a
    CUDA runtime ("No CUDA runtime is found") silenced; nothing else changes."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def _weights_stamp(model: torch.nn.Module) -> int:
    """Changes whenever a parameter or buffer is replaced or updated in place (its version counter)."""
    items = []
    for t in (*model.parameters(), *model.buffers()):
        try:
            items.append((id(t), t._version))
        except RuntimeError:  # an inference tensor keeps no version counter: it cannot be updated in place
            items.append((id(t), -1))
    return hash(tuple(items))


def compiled_step(model: torch.nn.Module, device_type: str) -> Callable[..., torch.Tensor]:
    """`_step` through `torch.compile` for `model` (no dynamic shapes; on the CPU `CPU_OPTIONS`, on CUDA
    "reduce-overhead" CUDA graphs), made once per model and state of its weights: with freezing the weights are
    compiled in, so a model whose weights changed since (a training step, `load_state_dict`, `.to`) gets a newly
    compiled step (its own code object, so the stale graphs are dropped with the old one)."""
    # CUDA graphs read the live weights; CPU freezing compiles them in, so there the step follows the weights
    stamp = (_weights_stamp(model) if device_type == "cpu" else 0, device_type)
    held = model.__dict__.get("_mm_decode_step")
    if held is not None and held[0] == stamp:
        return held[1]
    import torch._dynamo
    import torch._inductor.config

    quiet_compile_logs()
    # one graph per batch size and cache length: allow as many as an evaluation with several batch sizes uses
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fresh = type(_step)(_step.__code__.replace(co_name=f"_step_{id(model):x}"), _step.__globals__, "_step")
    if device_type == "cuda":
        fn = torch.compile(fresh, dynamic=False, mode="reduce-overhead")
    else:
        compiled = torch.compile(fresh, dynamic=False)

        def fn(*args: Any) -> torch.Tensor:
            # the options as Inductor's config while the step runs (and compiles), as `torch.compile(options=)`
            # does not pass freezing to the graph's compilation
            with torch._inductor.config.patch(CPU_OPTIONS):
                return compiled(*args)

    model.__dict__["_mm_decode_step"] = (stamp, fn)
    return fn


def decode_step(mode: str, model: torch.nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    """The function `generate` calls per new token for a resolved mode: (model, tokens (B, 1), positions (B, 1),
    cache, model kwargs) -> logits (B, V)."""
    return compiled_step(model, device.type) if mode == "compiled" else _step


__all__ = [
    "CPU_OPTIONS",
    "AUTO_COMPILE_MIN_PARAMS",
    "DECODE_MODES",
    "LENGTH_BUCKET",
    "cache_length",
    "compiled_step",
    "decode_step",
    "default_decode_mode",
    "quiet_compile_logs",
    "resolve_decode_mode",
    "set_default_decode_mode",
]
