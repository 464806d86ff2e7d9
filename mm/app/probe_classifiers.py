"""The probes of `mm probe`: an attention-pooling probe over an image's token set (one learned query per target)
and linear probes on per-word vectors, trained with AdamW on the training images, scored on held-out ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm.app.probe_targets import IGNORE, N_CLASSES, TARGETS, score


class AttentionPoolProbe(nn.Module):
    """One learned query per target: softmax attention over real tokens, then a linear classifier each."""

    def __init__(self, dim: int, n_classes: Sequence[int]) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(len(n_classes), dim))  # zero: mean pooling at the start
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in n_classes)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """x (B, M, F), mask (B, M) True for real tokens -> one (B, classes) logit tensor per target."""
        scores = torch.einsum("bmf,kf->bkm", x, self.queries) * self.scale
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        pooled = torch.einsum("bkm,bmf->bkf", scores.softmax(-1), x)
        return [head(pooled[:, k]) for k, head in enumerate(self.heads)]


class LinearProbes(nn.Module):
    """One linear classifier per target on a vector per target: x (B, K, F) -> K logit tensors."""

    def __init__(self, dim: int, n_classes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (B, K, F) -> one (B, classes) logit tensor per target (mask unused)."""
        return [head(x[:, k]) for k, head in enumerate(self.heads)]


def standardize(
    train: torch.Tensor, test: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training set's per-feature mean and std (over real tokens when masked)."""
    flat = train[mask] if mask is not None else train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def fit_probe(
    probe: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    y: torch.Tensor,
    *,
    steps: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Train `probe` (summed cross-entropy over targets, undefined labels ignored) with AdamW; eval mode."""
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    order, pos = torch.randperm(n, generator=gen), 0
    probe.train()
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        logits = probe(x[idx], None if mask is None else mask[idx])
        yb = y[idx]
        loss = x.new_zeros(())
        for k, lg in enumerate(logits):
            keep = yb[:, k] != IGNORE
            if keep.any():
                loss = loss + F.cross_entropy(lg[keep], yb[keep, k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def predict(
    probe: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_size: int = 512
) -> torch.Tensor:
    """Argmax class per probed target (N, K)."""
    out = []
    for s in range(0, x.shape[0], batch_size):
        logits = probe(x[s : s + batch_size], None if mask is None else mask[s : s + batch_size])
        out.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1))
    return torch.cat(out)


def _full(pred: torch.Tensor) -> torch.Tensor:
    """Predictions of the probed targets (N, k <= K) padded with `IGNORE` to every target (N, K)."""
    return F.pad(pred, (0, len(TARGETS) - pred.shape[1]), value=IGNORE)


@dataclass
class ProbeScore:
    """A trained probe's held-out accuracy and count per target, and its accuracy on its training set."""

    accuracy: dict[str, float | None]
    n: dict[str, int]
    train_accuracy: dict[str, float | None]
    pred: torch.Tensor  # (N, K) held-out predictions


def pooled_probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    steps: int = 400,
    seed: int = 0,
) -> ProbeScore:
    """Attention-pooling probe on token sets, (features (N, M, F), mask (N, M), labels (N, K)) train -> test."""
    (xa, ma, ya), (xb, mb, yb) = train, test
    xa, xb = standardize(xa, xb, ma)
    torch.manual_seed(seed)
    probe = fit_probe(AttentionPoolProbe(xa.shape[-1], N_CLASSES), xa, ma, ya, steps=steps, seed=seed)
    pred = _full(predict(probe, xb, mb))
    acc, n = score(pred, yb)
    return ProbeScore(acc, n, score(_full(predict(probe, xa, ma)), ya)[0], pred)


# Which probe (by attribute kind) reads each target at the xattn point: slots 1 and 2 share one per kind.
_XATTN_GROUPS: dict[str, tuple[int, ...]] = {"size": (0, 3), "colour": (1, 4), "shape": (2, 5), "count": (6,)}


def xattn_probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int = 400,
    seed: int = 0,
) -> ProbeScore:
    """Linear probes on per-word vectors (N, K, D) with labels (N, K): one per kind, scored per target."""
    (xa, ya), (xb, yb) = train, test
    pred = torch.full_like(yb, IGNORE)
    pred_train = torch.full_like(ya, IGNORE)
    for g, cols in enumerate(_XATTN_GROUPS.values()):
        c = list(cols)
        va, la = xa[:, c].reshape(-1, xa.shape[-1]), ya[:, c].reshape(-1)
        keep = la != IGNORE
        if not keep.any():
            continue
        vtrain, vb = standardize(va[keep], xb[:, c].reshape(-1, xb.shape[-1]))
        torch.manual_seed(seed + g)
        probe = LinearProbes(va.shape[-1], [N_CLASSES[cols[0]]])
        fit_probe(probe, vtrain[:, None], None, la[keep, None], steps=steps, seed=seed + g)
        pred[:, c] = predict(probe, vb[:, None], None).reshape(-1, len(c))
        va = standardize(va[keep], va)[1]
        pred_train[:, c] = predict(probe, va[:, None], None).reshape(-1, len(c))
    acc, n = score(pred, yb)
    return ProbeScore(acc, n, score(pred_train, ya)[0], pred)
