"""Hugging Face Llama `config.json` <-> our `LMConfig` (both RoPE config formats read, both written)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mm.formats.hf_llama.names import CONFIG_NAME, SUPPORTED_ROPE_TYPES
from mm.lm.config import LMConfig, RopeScaling


def _rope_from_hf(d: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    new = d.get("rope_parameters") or {}
    if not isinstance(new, Mapping) or any(isinstance(v, Mapping) for v in new.values()):
        raise ValueError(f"{source}: rope_parameters must be one flat dict of RoPE settings, got {new!r}")
    new = dict(new)
    legacy = dict(d.get("rope_scaling") or {})
    if d.get("rope_theta") is not None:
        legacy.setdefault("rope_theta", d["rope_theta"])
    for params in (new, legacy):  # older configs say "type" where newer ones say "rope_type"
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
    for key in sorted(set(new) & set(legacy)):
        if new[key] != legacy[key]:
            raise ValueError(
                f"{source}: rope_parameters[{key!r}]={new[key]!r} disagrees with the legacy "
                f"rope_theta/rope_scaling value {legacy[key]!r}"
            )
    rope = {**legacy, **new}
    theta = float(rope.get("rope_theta", 10000.0))  # transformers' default theta when none is given
    rope_type = rope.get("rope_type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported rope_type {rope_type!r}; supported values: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            f"{source}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, None
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in rope:
            raise ValueError(f"{source}: rope_type 'llama3' needs {key!r} in rope_parameters/rope_scaling")
    # As transformers: without original_max_position_embeddings, the model's max_position_embeddings is used.
    original = rope.get("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    scaling = RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_seq_len=int(original),
    )
    return theta, scaling


def config_from_hf(d: Mapping[str, Any], source: str = CONFIG_NAME) -> LMConfig:
    """Our `LMConfig` from a Hugging Face Llama `config.json` dict (`source` names the file in errors)."""
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {d['model_type']!r} is not supported (only 'llama')")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"{source}: {key}=true is not supported (our decoder has no biases)")

    def need(key: str) -> Any:
        if d.get(key) is None:
            raise ValueError(f"{source}: missing required key {key!r}")
        return d[key]

    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = d.get("head_dim")
    if head_dim is not None and (dim % n_heads != 0 or int(head_dim) != dim // n_heads):
        head_dim = int(head_dim)
    else:
        head_dim = None
    theta, scaling = _rope_from_hf(d, source)
    try:
        return LMConfig(
            dim=dim,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            vocab_size=int(need("vocab_size")),
            ffn_dim=int(need("intermediate_size")),
            head_dim=head_dim,
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),  # transformers' LlamaConfig default
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def config_to_hf(cfg: LMConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Hugging Face `LlamaForCausalLM` `config.json` dict for `cfg` (both RoPE formats, weights in `dtype`)."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "rope_parameters": rope_parameters,  # transformers >= 5
        "rope_theta": cfg.rope_theta,  # legacy keys (transformers 4.x), accepted by 5.x too
        "rope_scaling": rope_scaling,
        # Our config knows no token ids; null rather than LlamaConfig's Llama 2 defaults (1, 2).
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
