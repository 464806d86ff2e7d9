"""Summed next-token cross-entropy through the LM's output head, at once or a chunk of tokens at a time.

At once, the (N, V) logits are cast to float32 together: at a 128K-token step of a Llama 3 vocabulary (128,256
ids) that is 67 GB, and the backward adds the same again for their gradient. In chunks (`chunk` tokens, e.g.
`train.loss_chunk`), the head (final norm, output projection, float32 cast, cross-entropy) runs on one chunk at a
time under non-reentrant activation checkpointing: the forward keeps only each chunk's input rows and labels,
and the backward recomputes one chunk's logits at a time, so at most one chunk's logits and their gradients
exist at once. Loss and gradients are the whole computation's (summed in another order); the price is one more
output projection per token in the backward. Without autograd (evaluation) the chunks simply run one by one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _summed_ce(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed float32 cross-entropy of head(h) (N, V) against labels (N,), -100 ignored."""
    return F.cross_entropy(head(h).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def head_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, labels: torch.Tensor, chunk: int = 0
) -> torch.Tensor:
    """Summed cross-entropy (label -100 ignored) of the logits head(h) for hidden states h (..., D) against labels
    of h's leading shape; `chunk` tokens at a time under activation checkpointing when 0 < chunk < tokens."""
    if chunk < 0:
        raise ValueError(f"loss chunk (train.loss_chunk) must be >= 0 tokens (0 = all at once), got {chunk}")
    if tuple(h.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the hidden states {tuple(h.shape)} (expected "
            f"{tuple(h.shape[:-1])})"
        )
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    n = labels.shape[0]
    if chunk == 0 or chunk >= n:
        return _summed_ce(head, h, labels)
    grad = torch.is_grad_enabled()
    parts = []
    for s in range(0, n, chunk):
        hs, ys = h[s : s + chunk], labels[s : s + chunk]
        if grad:  # the head has no randomness: no RNG state to stash
            parts.append(checkpoint(_summed_ce, head, hs, ys, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_summed_ce(head, hs, ys))
    return torch.stack(parts).sum()


__all__ = ["IGNORE_INDEX", "head_cross_entropy"]
