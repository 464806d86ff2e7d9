"""Mllama's text-model names: the gated cross-attention layers (`XATTN_NAMES`), and every tensor of a model
under its Mllama checkpoint name (`mm_to_mllama_state_dict`: the LM's self-attention layers with q/k permuted as
`mm.formats.hf_llama` does, the 8 extra token embeddings, the cross-attention layers and the vision model)."""

from __future__ import annotations

import re

import torch

from mm.encoders.image import ImageEncoder
from mm.formats.hf_llama import mm_to_hf_state_dict
from mm.formats.hf_mllama.config import MLLAMA_EXTRA_TOKENS, MllamaCheckpointError, xattn_layers_to_mllama
from mm.formats.hf_mllama.vision import mllama_vision_state_dict
from mm.models.multimodal import MultimodalLM

# Cross-attention decoder layer (relative to language_model.model.layers.{j}.) -> CrossAttentionBlock.
XATTN_NAMES = (
    ("cross_attn.q_proj.weight", "attention.wq.weight"),
    ("cross_attn.k_proj.weight", "attention.wk.weight"),
    ("cross_attn.v_proj.weight", "attention.wv.weight"),
    ("cross_attn.o_proj.weight", "attention.wo.weight"),
    ("cross_attn.q_norm.weight", "attention.q_norm.weight"),
    ("cross_attn.k_norm.weight", "attention.k_norm.weight"),
    ("cross_attn_attn_gate", "gate_attn"),
    ("cross_attn_mlp_gate", "gate_ffn"),
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
)


def mm_to_mllama_state_dict(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under its Mllama checkpoint name (the layout `save_pretrained` writes)."""
    c = model.lm.cfg
    sd = model.state_dict()
    llama = mm_to_hf_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("lm.")}, c)
    xs = sorted(model.xattn_layers)
    out: dict[str, torch.Tensor] = {}
    extra = sd.get("extra_tok_embeddings.weight")
    if extra is None:  # a model without Mllama's extra tokens uses none of them: zero rows
        extra = llama["model.embed_tokens.weight"].new_zeros(MLLAMA_EXTRA_TOKENS, c.dim)
    if extra.shape[0] != MLLAMA_EXTRA_TOKENS:
        raise MllamaCheckpointError(
            f"extra_tok_embeddings.weight: found {extra.shape[0]} extra tokens, expected {MLLAMA_EXTRA_TOKENS}"
        )
    out["language_model.model.embed_tokens.weight"] = torch.cat([llama["model.embed_tokens.weight"], extra])
    out["language_model.model.norm.weight"] = llama["model.norm.weight"]
    out["language_model.lm_head.weight"] = llama.get("lm_head.weight", llama["model.embed_tokens.weight"])
    for name, t in llama.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            i = int(m[1])
            j = i + sum(x <= i for x in xs)  # the cross-attention layers before it count as text layers
            out[f"language_model.model.layers.{j}.{m[2]}"] = t
    for j, i in zip(xattn_layers_to_mllama(xs), xs):
        for hf, ours in XATTN_NAMES:
            out[f"language_model.model.layers.{j}.{hf}"] = sd[f"image_xattn.{i}.{ours}"]
    if not isinstance(model.image_encoder, ImageEncoder):
        raise MllamaCheckpointError(
            f"image_encoder: found {type(model.image_encoder).__name__}, expected an ImageEncoder"
        )
    out.update(mllama_vision_state_dict(model.image_encoder))
    return out
