"""Preallocated key/value cache for incremental decoding (one buffer per layer, filled left to right).

Two modes. Dynamic (the default): `length` is a Python int, new keys are written at `length` and attention sees
the filled prefix only, so every step has a new shape. Static (`start_static`, gpt-fast's static cache): the
write position is a tensor (`pos`), keys are written with `index_copy_` and attention runs over the whole buffer
with a mask hiding the unfilled end, so every decode step has the same shapes and nothing in it reads a Python
int that changes: one compiled graph (`lm.decode.compiled_step`) serves every step.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer (n_layers tensors (B, n_kv_heads, max_len, head_dim)), plus key validity."""

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
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        # one tensor per layer, not views of one: a compiled step then updates each in place (a view of a shared
        # buffer is functionalised into a copy of the whole buffer per layer)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.batch_size, self.max_len, self._length = batch_size, max_len, 0
        self.has_padding = False  # some key so far is padding (then attention needs a mask)
        self.pos: torch.Tensor | None = None  # static mode: the next write position, (1,) int64

    @property
    def static(self) -> bool:
        """Whether writes go to the tensor position `pos` (fixed shapes; `start_static`)."""
        return self.pos is not None

    @property
    def length(self) -> int:
        """Positions filled so far (static mode: read from `pos`, a host read)."""
        return int(self.pos.item()) if self.pos is not None else self._length

    @length.setter
    def length(self, value: int) -> None:
        if self.pos is not None:
            self.pos.fill_(value)
        else:
            self._length = value

    def start_static(self) -> None:
        """Switch to static mode at the current length (after a prefill): later forwards write at `pos` and
        attend over the whole buffer, their shapes independent of the step."""
        if self.pos is None:
            self.pos = torch.full((1,), self._length, dtype=torch.long, device=self.valid.device)

    def new_positions(self, T: int) -> torch.Tensor:
        """Static mode: the buffer indices (T,) the next T keys go to."""
        assert self.pos is not None, "new_positions is for a static cache (start_static)"
        return self.pos + torch.arange(T, device=self.pos.device)

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
        """Record which of the T new positions are real tokens; return validity of all keys (B, length+T), in
        static mode of the whole buffer (B, max_len)."""
        if self.pos is not None:
            new = (
                attention_mask.bool()
                if attention_mask is not None
                else self.valid.new_ones(self.batch_size, T)
            )
            self.valid.index_copy_(1, self.new_positions(T), new)
            return self.valid
        if attention_mask is not None:
            self.valid[:, self.length : self.length + T] = attention_mask.bool()
            self.has_padding = self.has_padding or not bool(attention_mask.all())
        else:
            self.valid[:, self.length : self.length + T] = True
        return self.valid[:, : self.length + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k/v (B, KV, T, hd) after the cached ones; return all keys and values so far (static mode:
        the whole buffers, unfilled positions included; the context's mask hides them)."""
        T = k.shape[2]
        if self.pos is not None:
            idx = self.new_positions(T)
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
            return self.k[layer], self.v[layer]
        end = self.length + T
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """Mark T more positions as filled (called once per forward, after all layers)."""
        if self.pos is not None:
            self.pos.add_(T)  # in place: a compiled step reads no changing Python int
        else:
            self._length += T

    def reset(self) -> None:
        """Empty the cache without reallocating (back to dynamic mode)."""
        self.pos, self._length = None, 0
        self.valid.fill_(True)
        self.has_padding = False
