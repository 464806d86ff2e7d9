"""mm: extend a frozen Llama 3-style language model with image, video and speech.

The rooms install as `mm.lm`, `mm.encoders`, `mm.adapters`, `mm.datasets`; this package holds the
composition layer, training, and the `mm` command line. `from mm import load_hf_mllama, save_hf_mllama`
(Llama 3.2 Vision directories <-> `MultimodalLM`, see `mm.formats.hf_mllama`) imports torch on first use only.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = ("load_hf_mllama", "save_hf_mllama")


def __getattr__(name: str) -> Any:
    """Lazy top-level exports (keep `import mm` and `mm --help` free of torch)."""
    if name in _LAZY:
        from mm.formats import hf_mllama

        return getattr(hf_mllama, name)
    raise AttributeError(f"module 'mm' has no attribute {name!r}")


__all__ = ["__version__", "load_hf_mllama", "save_hf_mllama"]
