"""Llama 3.2 Vision checkpoints (one module per part: `config`, `vision`, `text` (LM and cross-attention names),
`files`, `load`, `export`): transformers' `MllamaForConditionalGeneration` directories <-> `MultimodalLM`
(`paper-notes.md` section 3; transformers' `models/mllama/modeling_mllama.py` is the reference for the layout).

A Mllama directory holds `config.json` (`text_config`, `vision_config`, `image_token_index`), safetensors weights
(one file or shards + index) in the layout `save_pretrained` writes and Meta's released checkpoints use, and
usually `preprocessor_config.json`:

    language_model.model.embed_tokens.weight  (V + 8, D): the LM's V rows, then 8 extra tokens (<|image|> = V)
    language_model.model.layers.{j}.*         j counts ALL text layers: self-attention layers (Llama names), and
                                              at each j in text_config.cross_attention_layers a gated
                                              cross-attention layer (cross_attn.*, cross_attn_attn_gate, ...)
    language_model.model.norm.weight, language_model.lm_head.weight (V, D)
    vision_model.*                            MllamaVisionModel (`vision.py`)
    multi_modal_projector.{weight,bias}       vision features -> LM width

In mm the LM stays a plain Llama `Transformer` (frozen, fingerprinted) and a `CrossAttentionBlock` sits before
the LM layer it precedes: text layer j in `cross_attention_layers` -> before LM layer j - (cross-attention layers
before j); the 11B's [3, 8, ..., 38] are the paper's "before layers 3, 7, ..., 31". The 8 extra embeddings
are `MultimodalLM.extra_tok_embeddings` (Meta's `learnable_embedding`: outside the frozen LM, trained with the
adapter); logits cover the LM's V ids. Self-attention q/k rows are permuted to our interleaved RoPE layout
(`mm.formats.hf_llama`); the vision model maps onto `ImageEncoder` with Mllama's attention mask (`mask_mode="mllama"`)
and, as Mllama, no bias on the attention output projections (`mllama_image_encoder`).

Rows that see no image (tokens before a sequence's first `<|image|>`): by default mm zeroes their whole
cross-attention output, as Meta's reference (`full_text_row_masked_out_mask`); transformers lets them attend to
every media token and zeroes only the FFN part (its issue #39379). `load_hf_mllama(..., hf_row_compat=True)`
reproduces transformers' logits on every row; the default agrees on every row that sees an image, and the
difference enters only through the rows that see none (in a causal LM it then reaches later tokens).

Intermediate vision features: `intermediate_layers_indices` (the released [3, 7, 15, 23, 30]) name block
INPUTS in Meta's reference, which trained the weights (and in transformers 4.45), block OUTPUTS in transformers
5.x. mm reads them as Meta does; `intermediate_from="block_output"` reproduces transformers 5.x. `save_hf_mllama`
writes the indices transformers 5.x needs to compute what mm computes (each block-input index minus one) and
marks them `intermediate_from: "block_output"` in `vision_config`, so mm reads its own exports back unchanged.

Weights are read with safetensors only (never pickle). Every problem with a checkpoint is a
`MllamaCheckpointError` (a ValueError) naming the key, what was found and what was expected.
"""

from mm.formats.hf_mllama.config import (
    MLLAMA_EXTRA_TOKENS,
    TRAINABLE,
    MllamaCheckpointError,
    MllamaSpec,
    config_from_mllama,
    read_mllama_config,
    xattn_layers_from_mllama,
    xattn_layers_to_mllama,
)
from mm.formats.hf_mllama.export import mllama_config_json, preprocessor_config, save_hf_mllama
from mm.formats.hf_mllama.load import (
    build_mllama_model,
    load_hf_mllama,
    load_hf_mllama_lm,
    load_hf_mllama_transform,
    mllama_image_inputs,
)
from mm.formats.hf_mllama.text import mm_to_mllama_state_dict
from mm.formats.hf_mllama.vision import (
    load_mllama_vision_state_dict,
    mllama_image_encoder,
    mllama_vision_state_dict,
)

__all__ = [
    "MLLAMA_EXTRA_TOKENS",
    "MllamaCheckpointError",
    "MllamaSpec",
    "TRAINABLE",
    "build_mllama_model",
    "config_from_mllama",
    "load_hf_mllama",
    "load_hf_mllama_lm",
    "load_hf_mllama_transform",
    "load_mllama_vision_state_dict",
    "mllama_config_json",
    "mllama_image_encoder",
    "mllama_image_inputs",
    "mllama_vision_state_dict",
    "mm_to_mllama_state_dict",
    "preprocessor_config",
    "read_mllama_config",
    "save_hf_mllama",
    "xattn_layers_from_mllama",
    "xattn_layers_to_mllama",
]
