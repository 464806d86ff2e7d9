"""Preallocated key/value cache for incremental decoding (one buffer per layer, filled left to right)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, (n_layers, B, n_kv_heads, max_len, head_dim), plus key validity."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.has_padding = False  # some key so far is padding (then attention needs a mask)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, batch_size: int, max_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A cache shaped for `model` (a `Transformer`), on its device and dtype."""
        cfg = model.cfg
        p = next(model.parameters())
        return cls(
            cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.hd, dtype=dtype or p.dtype, device=p.device
        )

    def update_valid(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        """Record which of the T new positions are real tokens; return validity of all keys (B, length+T)."""
        if attention_mask is not None:
            self.valid[:, self.length : self.length + T] = attention_mask.bool()
            self.has_padding = self.has_padding or not bool(attention_mask.all())
        else:
            self.valid[:, self.length : self.length + T] = True
        return self.valid[:, : self.length + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k/v (B, KV, T, hd) after the cached ones; return all keys and values so far."""
        T = k.shape[2]
        end = self.length + T
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """Mark T more positions as filled (called once per forward, after all layers)."""
        self.length += T

    def reset(self) -> None:
        """Empty the cache without reallocating."""
        self.length = 0
        self.valid.fill_(True)
        self.has_padding = False
