"""Configuration of the Llama 3 dense decoder, with presets for the paper's shapes (Llama 3 paper, Table 3).

`LMConfig` is a plain dataclass; presets are builders returning one (`preset("llama3-8b")`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Document attention for packed rows: "flex" (FlexAttention with a block mask built from the document
# boundaries), "varlen" (one causal attention per document: the flash varlen kernel on CUDA in half
# precision, a per-document SDPA loop otherwise), "dense" (a (B, 1, T, T) boolean mask, the reference) or
# "auto" (flex on CUDA; on CPU dense up to `lm.doc_attention.DENSE_DOC_MASK_MAX_T` = 512 tokens, varlen beyond).
DOC_ATTENTION = ("auto", "flex", "varlen", "dense")


@dataclass
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class LMConfig:
    """Shape and numerics of a Llama 3-style dense GQA decoder."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int | None = None  # when None: Meta's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    head_dim: int | None = None  # when None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02
    # How packed rows (`doc_ids`) keep documents apart; see `lm/model.py` and DOC_ATTENTION.
    doc_attention: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.doc_attention not in DOC_ATTENTION:
            raise ValueError(
                f"LMConfig.doc_attention must be one of {sorted(DOC_ATTENTION)}, got {self.doc_attention!r}"
            )
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LMConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                f"(allowed: {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]})"
            )
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise ValueError(f"LMConfig.n_heads={self.n_heads} must divide dim={self.dim}, or set head_dim")
        if self.hd % 2 != 0:
            raise ValueError(f"LMConfig head_dim must be even for RoPE, got {self.hd}")

    @property
    def hd(self) -> int:
        """Per-head width."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width: explicit `ffn_dim`, else Meta's rounding rule."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict:
        """Plain dict (for JSON/YAML)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown LMConfig keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shape (equals the built model's)."""
        d, hd = self.dim, self.hd
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        ffn = 3 * d * self.hidden_dim
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d
        n = self.n_layers * per_layer + d
        if include_embeddings:
            n += emb if self.tie_embeddings else 2 * emb
        elif not self.tie_embeddings:
            n += emb  # the output projection is not an embedding
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x non-embedding params + 12 x layers x dim x seq (PaLM appendix B)."""
        return 6 * self.num_params(include_embeddings=False) + 12 * self.n_layers * self.dim * seq_len


_LLAMA31_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)
_LLAMA32_SCALING = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)

PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "llama3-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "llama3-405b": dict(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2,
        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "llama3.2-1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
        rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_embeddings=True,
    ),
    "llama3.2-3b": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
        rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_embeddings=True,
    ),
    # Small shapes for tests and the embedded demo.
    "tiny": dict(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, ffn_dim=352, max_seq_len=512,
        rope_theta=10000.0,
    ),
    "nano": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=160, max_seq_len=256,
        rope_theta=10000.0,
    ),
}  # fmt: skip


def preset(name: str, **overrides: object) -> LMConfig:
    """Build the named preset, with field overrides (e.g. `preset("tiny", vocab_size=4096)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; allowed: {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    if isinstance(kw.get("rope_scaling"), RopeScaling):
        kw["rope_scaling"] = RopeScaling(**asdict(kw["rope_scaling"]))
    kw.update(overrides)
    return LMConfig(**kw)


__all__ = ["DOC_ATTENTION", "LMConfig", "RopeScaling", "PRESETS", "preset"]
