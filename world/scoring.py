"""Scorers of the shapes world's captions, plugged into the stages' evaluation by name
(`scorers: [exact_match, "mm.world.scoring:shapes_attributes"]` for images, `"mm.world.scoring:motion_report"`
for videos; see `mm.stages.evaluation.score`): per-attribute accuracy of image captions (size, colour, shape,
object count, left-right order) and of motion captions (colour, shape, direction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .grammar import parse_caption

__all__ = ["caption_attribute_report", "motion_report", "shapes_attributes"]


def caption_attribute_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float | int]:
    """Exact match and per-attribute accuracy of image captions against the world's references.

    size / colour / shape: over every reference object, the predicted object in the same left-to-right slot
    has that word; count: the number of objects is right; order (two-object references whose predicted objects
    are the same two objects in either order): they are in the reference's left-to-right order.
    """
    counts = dict.fromkeys(("size", "color", "shape", "objects", "count", "order", "order_n", "parsed"), 0)
    for pred, ref in zip(preds, refs, strict=True):
        want = parse_caption(ref)
        if want is None:
            raise ValueError(f"reference caption {ref!r} is not a caption of the shapes world")
        got = parse_caption(pred) or []
        counts["parsed"] += int(bool(got))
        counts["count"] += int(len(got) == len(want))
        for i, obj in enumerate(want):
            counts["objects"] += 1
            for j, key in enumerate(("size", "color", "shape")):
                counts[key] += int(i < len(got) and got[i][j] == obj[j])
        if len(want) == 2 and len(got) == 2 and sorted(got) == sorted(want) and want[0] != want[1]:
            counts["order_n"] += 1
            counts["order"] += int(got == want)
    n, objs = max(1, len(refs)), max(1, counts["objects"])
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / n,
        "size_accuracy": counts["size"] / objs,
        "color_accuracy": counts["color"] / objs,
        "shape_accuracy": counts["shape"] / objs,
        "count_accuracy": counts["count"] / n,
        "order_accuracy": counts["order"] / max(1, counts["order_n"]),
        "order_n": counts["order_n"],
        "well_formed": counts["parsed"] / n,
        "n": len(refs),
    }


def shapes_attributes(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float | int]:
    """`caption_attribute_report` when every reference is a caption of the world, else no figures."""
    if not all(parse_caption(r) is not None for r in refs):
        return {}
    return caption_attribute_report(preds, refs)


def motion_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Exact match, and accuracy of the colour, shape and direction words ("a red circle moves left")."""

    def parts(caption: str) -> tuple[str | None, str | None, str | None]:
        words = caption.split()
        if "moves" not in words:
            return None, None, None
        k = words.index("moves")
        color = words[k - 2] if k >= 2 else None
        shape = words[k - 1] if k >= 1 else None
        return color, shape, words[k + 1] if k + 1 < len(words) else None

    n = max(1, len(refs))
    got = [parts(p) for p in preds]
    want = [parts(r) for r in refs]
    acc = [sum(g[j] == w[j] for g, w in zip(got, want, strict=True)) / n for j in range(3)]
    return {
        "exact_match": sum(p == r for p, r in zip(preds, refs, strict=True)) / n,
        "color_accuracy": acc[0],
        "shape_accuracy": acc[1],
        "direction_accuracy": acc[2],
        "n": len(refs),
    }
