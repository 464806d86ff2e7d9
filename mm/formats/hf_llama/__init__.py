"""Hugging Face interop: load and save our `Transformer` as a `transformers` `LlamaForCausalLM` directory.

Follows the Hugging Face Llama checkpoint format (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`) as read by `transformers.LlamaForCausalLM.from_pretrained`, and Meta's
llama-models / transformers' `convert_llama_weights_to_hf.py` for the q/k permutation: Hugging Face stores
q/k rows in the rotate-half RoPE layout, we use Meta's interleaved layout (dims 2i and 2i+1 rotate together).

Everything that knows Hugging Face names lives here, in one small package: `config` (`config_from_hf` /
`config_to_hf` map the config), `names` (`hf_to_mm_state_dict` / `mm_to_hf_state_dict` map the weights), `load`
and `save` (files written through `mm.lm.io`). Weights are only ever read
with `safetensors` (never pickle). Both RoPE config formats are read: transformers 5's `rope_parameters`
and the legacy `rope_theta` + `rope_scaling` keys; both are written. `load_hf(..., device="meta")` reads
nothing: each tensor says where its values live, so that a sharded run reads only each process's rows.
"""

from mm.formats.hf_llama.config import config_from_hf, config_to_hf
from mm.formats.hf_llama.load import ComputedTensor, SafetensorsTensor, load_hf, stored_dtype
from mm.formats.hf_llama.names import (
    SUPPORTED_ROPE_TYPES,
    hf_name_map,
    hf_to_mm_state_dict,
    interleaved_to_rotate_half,
    mm_to_hf_state_dict,
    rope_heads,
    rotate_half_to_interleaved,
)
from mm.formats.hf_llama.save import save_hf

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "ComputedTensor",
    "SafetensorsTensor",
    "config_from_hf",
    "config_to_hf",
    "hf_name_map",
    "hf_to_mm_state_dict",
    "interleaved_to_rotate_half",
    "load_hf",
    "mm_to_hf_state_dict",
    "rope_heads",
    "rotate_half_to_interleaved",
    "save_hf",
    "stored_dtype",
]
