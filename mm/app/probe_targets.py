"""What `mm probe` reads from an image and how it scores it: the targets (size, colour and shape of object slots
1 and 2, the object count, their left-right order) of a shapes-world caption, as labels and as read from a
generated caption, and the accuracy per target (order derived from the two colour slots)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mm.world import COLORS, SHAPES, SIZES, parse_caption

ATTRS: tuple[str, ...] = ("size", "colour", "shape")
VOCAB: dict[str, tuple[str, ...]] = {"size": SIZES, "colour": tuple(COLORS), "shape": SHAPES}
TARGETS: tuple[str, ...] = (
    "size_1",
    "colour_1",
    "shape_1",
    "size_2",
    "colour_2",
    "shape_2",
    "count",
    "order",
)
# Classes of the probed targets (all but `order`, which is derived from the colour slots).
N_CLASSES: tuple[int, ...] = (*(len(VOCAB[a]) for a in ATTRS), *(len(VOCAB[a]) for a in ATTRS), 2)
POINTS: tuple[str, ...] = ("chance", "encoder", "projected", "xattn", "next_token", "caption", "lm_text")
IGNORE = -1  # label of a target an image does not have


def targets_of_objects(objects: Sequence[tuple[str, str, str]]) -> list[int]:
    """Labels (one per `TARGETS` entry, `IGNORE` where undefined) of objects given left to right.

    `order` holds 1 where the order is scored (two objects of different colours), else `IGNORE`; its accuracy
    is derived from the two colour slots (`score`)."""
    y = [IGNORE] * len(TARGETS)
    for slot, obj in enumerate(objects[:2]):
        for j, attr in enumerate(ATTRS):
            y[3 * slot + j] = VOCAB[attr].index(obj[j])
    y[6] = len(objects) - 1
    if len(objects) == 2 and objects[0][1] != objects[1][1]:
        y[7] = 1
    return y


def caption_targets(text: str) -> list[int]:
    """Labels of a shapes-world caption (see `targets_of_objects`); ValueError if it is not one."""
    objects = parse_caption(text)
    if not objects or len(objects) > 2:
        raise ValueError(f"{text!r} is not a caption of the shapes world (1-2 objects)")
    return targets_of_objects(objects)


def predicted_targets(text: str) -> list[int]:
    """A generated caption read into targets by slot (`IGNORE`, i.e. wrong, where it names nothing there)."""
    objects = parse_caption(text.strip().removesuffix(".")) or []
    y = targets_of_objects(objects[:2]) if objects else [IGNORE] * len(TARGETS)
    y[6] = len(objects) - 1 if objects else IGNORE
    return y


def score(pred: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, float | None], dict[str, int]]:
    """Accuracy and count per target over the rows where it is defined (accuracy None where none is).

    `pred` (N, K) holds predicted classes (`IGNORE` = none, always wrong); its order column is unused: order
    is scored on rows whose two predicted colours are the true two, as the fraction with colour 1 right."""
    acc: dict[str, float | None] = {}
    n: dict[str, int] = {}
    for k, name in enumerate(TARGETS):
        keep = y[:, k] != IGNORE
        if name == "order":
            p1, p2, y1, y2 = pred[:, 1], pred[:, 4], y[:, 1], y[:, 4]
            keep = keep & (((p1 == y1) & (p2 == y2)) | ((p1 == y2) & (p2 == y1)))
            right = p1 == y1
        else:
            right = pred[:, k] == y[:, k]
        n[name] = int(keep.sum())
        acc[name] = float(right[keep].float().mean()) if keep.any() else None
    return acc, n


def slot1_by_count(pred: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float | None]]:
    """Slot-1 accuracies on one-object and on two-object images apart (detection versus binding)."""
    out = {}
    for name, rows in (("one", y[:, 6] == 0), ("two", y[:, 6] == 1)):
        acc, _ = score(pred[rows], y[rows])
        out[name] = {k: acc[k] for k in TARGETS[:3]}
    return out


def chance_accuracies(y_train: torch.Tensor, y_test: torch.Tensor) -> dict[str, float | None]:
    """Held-out accuracy of always answering each target's most frequent training class (order: 0.5)."""
    pred = torch.zeros_like(y_test)
    for k in range(len(TARGETS)):
        col = y_train[:, k][y_train[:, k] != IGNORE]
        pred[:, k] = int(col.bincount().argmax()) if col.numel() else 0
    acc, _ = score(pred, y_test)
    acc["order"] = 0.5
    return acc


def caption_accuracies(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Accuracy and count per target of generated captions against references, and exact match."""
    y = torch.tensor([caption_targets(r) for r in refs], dtype=torch.long).reshape(-1, len(TARGETS))
    pred = torch.tensor([predicted_targets(p) for p in preds], dtype=torch.long).reshape(-1, len(TARGETS))
    acc, n = score(pred, y)
    exact = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / max(1, len(refs))
    return {"accuracy": acc, "n": n, "exact_match": exact, "pred": pred}
