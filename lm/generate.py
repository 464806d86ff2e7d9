"""Autoregressive generation with a KV cache: greedy by default, temperature / nucleus (top-p) sampling,
batched prompts of different lengths (left-padded; positions count real tokens only), per-sequence stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .decode import cache_length, decode_step, resolve_decode_mode
from .kv_cache import KVCache


def _as_prompts(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        return [row.tolist() for row in input_ids]
    prompts = [list(p) for p in input_ids]
    if prompts and not isinstance(prompts[0], list | tuple) and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single flat prompt
    return prompts


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits (B, V): argmax at temperature 0, else top-p sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] | None = None,
    *,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    decode: str = "auto",
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per prompt; returns the new tokens of each (stop token excluded).

    `model_kwargs` go to every forward call unchanged (e.g. a composite model's precomputed media context).
    Prompt ids must lie below `model.input_vocab_size` when the model has one, else below `cfg.vocab_size`.
    `decode` picks how the one-token steps run (`lm.decode.DECODE_MODES`: "dynamic", "static", "compiled", or
    "auto", the default); every mode gives the same tokens.
    """
    extra = dict(model_kwargs or {})
    prompts = _as_prompts(input_ids)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = set(int(t) for t in (stop_tokens or ()))
    cfg = model.cfg
    B, T = len(prompts), max(len(p) for p in prompts)
    total = T + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {T} tokens + {max_new_tokens} new tokens = {total} exceeds max_seq_len={cfg.max_seq_len}"
        )
    vocab = getattr(model, "input_vocab_size", cfg.vocab_size)  # a composite model may embed extra ids
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    device = next(model.parameters()).device
    mode = resolve_decode_mode(decode, model)

    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, T), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: the last prompt token of every row is at T - 1
        tokens[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p) :] = True
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    padded = not bool(mask.all())

    cache = KVCache.for_model(model, B, cache_length(total, cfg.max_seq_len, mode))
    logits = model(
        tokens,
        positions=positions,
        attention_mask=mask if padded else None,
        cache=cache,
        last_only=True,
        **extra,
    )
    next_pos = positions[:, -1] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_fn = decode_step(mode, model, device)
    if mode != "dynamic":
        cache.start_static()
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_p, generator)  # (B,)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in stops:
                done[i] = True
            else:
                out[i].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        logits = step_fn(model, nxt[:, None], next_pos[:, None], cache, extra)[:, None]
        next_pos = next_pos + 1
    return out
