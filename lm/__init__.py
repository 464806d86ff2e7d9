"""mm.lm: the core Llama 3 language model (config presets, model, KV cache, tokenizer, generation) and the IO
helpers every checkpoint format shares (`mm.lm.io`).

Imports nothing from the other rooms.
"""

from typing import Any

from .config import PRESETS, LMConfig, RopeScaling, preset
from .doc_attention import positions_in_documents
from .generate import generate
from .kv_cache import KVCache
from .model import RMSNorm, Transformer, apply_rope, rope_inv_freq
from .tokenizer import Tokenizer
from .vocab import SPECIAL_TOKENS

# `load_hf`, `save_hf` (Hugging Face Llama) and `load_meta` (Meta format) are checkpoint formats: they live in
# `mm.formats`, which builds on this package. They are exported here for users (`from mm.lm import load_hf`) but
# imported only on first use, through the module `__getattr__`: importing `mm.formats` while `mm.lm` is being
# imported would be circular, and `lm` imports nothing from the layers above it.
_FORMATS = {
    "load_hf": "mm.formats.hf_llama",
    "save_hf": "mm.formats.hf_llama",
    "load_meta": "mm.formats.meta_llama",
}


def __getattr__(name: str) -> Any:
    """The checkpoint-format entry points, imported lazily from `mm.formats` (see the comment above)."""
    if name in _FORMATS:
        import importlib

        return getattr(importlib.import_module(_FORMATS[name]), name)
    raise AttributeError(f"module 'mm.lm' has no attribute {name!r}")


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
