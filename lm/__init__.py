"""mm.lm: the core Llama 3 language model (config presets, model, KV cache, tokenizer, generation, HF interop).

Imports nothing from the other rooms.
"""

from .config import PRESETS, LMConfig, RopeScaling, preset
from .doc_attention import positions_in_documents
from .generate import generate
from .hf import load_hf, save_hf
from .kv_cache import KVCache
from .meta import load_meta
from .model import RMSNorm, Transformer, apply_rope, rope_inv_freq
from .tokenizer import Tokenizer
from .vocab import SPECIAL_TOKENS

__all__ = [
    "PRESETS",
    "SPECIAL_TOKENS",
    "KVCache",
    "LMConfig",
    "RMSNorm",
    "RopeScaling",
    "Tokenizer",
    "Transformer",
    "apply_rope",
    "generate",
    "load_hf",
    "load_meta",
    "positions_in_documents",
    "preset",
    "rope_inv_freq",
    "save_hf",
]
