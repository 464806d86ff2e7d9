"""Hugging Face Llama parameter names and the q/k row permutation between their RoPE layout and ours."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mm.lm.config import LMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_ROPE_TYPES = ("default", "llama3")
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# ---- the name mapping (the only place that knows Hugging Face parameter names) --------------------------
# (Hugging Face name, our name); per-layer entries are relative to `model.layers.N.` / `layers.N.`.
_GLOBAL_NAMES = (
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
)
_LAYER_NAMES = (
    ("self_attn.q_proj.weight", "attention.wq.weight"),
    ("self_attn.k_proj.weight", "attention.wk.weight"),
    ("self_attn.v_proj.weight", "attention.wv.weight"),
    ("self_attn.o_proj.weight", "attention.wo.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
)
# Buffers some older Hugging Face checkpoints carry; recomputed from the config, so skipped on load.
_IGNORED_HF_KEY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_name_map(cfg: LMConfig) -> dict[str, str]:
    """Hugging Face parameter name -> our name, for every tensor a checkpoint of `cfg` holds."""
    names = {}
    for hf, mm in _GLOBAL_NAMES:
        if not (hf == "lm_head.weight" and cfg.tie_embeddings):
            names[hf] = mm
    for i in range(cfg.n_layers):
        for hf, mm in _LAYER_NAMES:
            names[f"model.layers.{i}.{hf}"] = f"layers.{i}.{mm}"
    return names


def rope_heads(hf_name: str, cfg: LMConfig) -> int | None:
    """Number of heads whose rows must be permuted for this tensor (q and k projections), else None."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return cfg.n_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return cfg.n_kv_heads
    return None


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute q/k rows per head from Meta's interleaved RoPE layout to Hugging Face's rotate-half layout."""
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_rotate_half`: Hugging Face q/k rows -> Meta's interleaved layout."""
    return w.reshape(n_heads, 2, head_dim // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def hf_to_mm_state_dict(sd: Mapping[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face Llama state dict to ours (q/k permuted to interleaved; tied output = embedding)."""
    names = hf_name_map(cfg)
    missing = [k for k in names if k not in sd]
    if missing:
        raise KeyError(f"Hugging Face state dict lacks {len(missing)} tensors, first {missing[:5]}")
    unexpected = [
        k for k in sd if k not in names and not _IGNORED_HF_KEY.match(k) and k != "lm_head.weight"
    ]  # a tied checkpoint may still carry lm_head: our output shares the embedding instead
    if unexpected:
        raise KeyError(
            f"Hugging Face state dict has {len(unexpected)} unexpected tensors, first {unexpected[:5]}"
        )
    out = {}
    for hf, mm in names.items():
        t = sd[hf]
        heads = rope_heads(hf, cfg)
        out[mm] = rotate_half_to_interleaved(t, heads, cfg.hd) if heads is not None else t
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def mm_to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Map our state dict to Hugging Face Llama names (q/k permuted to rotate-half; no lm_head when tied)."""
    out = {}
    for hf, mm in hf_name_map(cfg).items():
        if mm not in sd:
            raise KeyError(f"state dict lacks {mm!r} (Hugging Face {hf!r})")
        t = sd[mm]
        heads = rope_heads(hf, cfg)
        out[hf] = interleaved_to_rotate_half(t, heads, cfg.hd) if heads is not None else t
    return out
