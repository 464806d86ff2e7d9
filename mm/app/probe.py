"""Stage-by-stage probe of the image path (`mm probe`): where image information is lost on its way from the
image encoder into the frozen LM's captions, in the shapes world.

Targets per image, read from its caption (`caption_targets`): size, colour and shape of object slot 1 and slot
2 (left to right; slot 2 only for two-object images) and `count` (one or two objects); probes train on training
images and are scored on held-out ones. `order` (left-right order) is derived the same way at every point:
over two-object images with two different colours whose two slot colours the point names correctly as a set,
the fraction that names them in the right order, left first (so 0.5 is chance; `n_scored` gives the count).

Probe points, in the order the information flows:

1. `encoder`: the image encoder's pre-projection features (multi-layer, `forward_features`), frozen. An
   attention-pooling probe (`AttentionPoolProbe`: one learned query per target, softmax attention over the
   image's real tokens, a linear classifier on the pooled vector) trained with AdamW for a fixed number of steps.
2. `projected`: the same probe on the projected media tokens (LM width: what the cross-attention reads).
3. `xattn`: captions teacher-forced through the model; at the position whose next-token prediction is a caption
   word, the summed contribution of the image cross-attention blocks to the residual stream (output minus input
   of each block). A linear probe per attribute kind (size, colour, shape: both slots share one; count at the
   position that predicts " and" or the end of text). `next_token` is the model's own teacher-forced accuracy
   on those words (all of a word's tokens right): what the caption loss sees; its order uses the colour words
   the model predicts at the two colour positions.
4. `caption`: the model's greedy captions (as `mm caption`), read into the same targets by slot.
5. `lm_text`: the frozen LM alone, told the caption in text in the corpus's repeat-line format
   (`<bos>{caption}. Repeat after me in English: {caption}.`), greedy: can the LM write every caption of the
   world? `lm_text_no_period` gives the caption without the final full stop (and accepts one in the answer).

`chance` is the held-out accuracy of always answering the training set's most frequent class (order: 0.5).
`slot1_by_count` splits slot 1 into one-object images (is the attribute seen at all?) and two-object images
(is it bound to the left object?).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.app.probe_classifiers import (
    AttentionPoolProbe,
    LinearProbes,
    ProbeScore,
    fit_probe,
    pooled_probe_accuracy,
    predict,
    standardize,
    xattn_probe_accuracy,
)
from mm.app.probe_collect import Collected, XAttnTap, collect, word_spans
from mm.app.probe_targets import (
    ATTRS,
    IGNORE,
    N_CLASSES,
    POINTS,
    TARGETS,
    VOCAB,
    caption_accuracies,
    caption_targets,
    chance_accuracies,
    predicted_targets,
    score,
    slot1_by_count,
    targets_of_objects,
)
from mm.prompts import ASR_PROMPT
from mm.world import parse_caption

__all__ = [
    "ATTRS",
    "IGNORE",
    "N_CLASSES",
    "POINTS",
    "TARGETS",
    "VOCAB",
    "AttentionPoolProbe",
    "Collected",
    "LinearProbes",
    "ProbeScore",
    "XAttnTap",
    "caption_accuracies",
    "caption_targets",
    "chance_accuracies",
    "collect",
    "fit_probe",
    "format_table",
    "lm_text_repeat",
    "pooled_probe_accuracy",
    "predict",
    "predicted_targets",
    "run_probe",
    "score",
    "slot1_by_count",
    "standardize",
    "targets_of_objects",
    "word_spans",
    "xattn_probe_accuracy",
]

log = logging.getLogger("mm.app.probe")


@torch.no_grad()
def lm_text_repeat(
    lm: nn.Module, tok: Any, captions: Sequence[str], *, period: bool = True
) -> dict[str, Any]:
    """The frozen LM repeating each caption told in text, in the corpus's repeat-line format (greedy)."""
    from mm.lm import generate

    lm.eval()
    sentences = [c.strip() + ("." if period else "") for c in captions]
    # The corpus line is `{sentence} {ASR_PROMPT}{sentence}` as bos + ids + eos; the prompt's trailing space
    # is tokenized with the answer (" a ..."), so the prompt ends at "English:".
    prompts = [[tok.bos_id, *tok.encode(f"{s} {ASR_PROMPT.rstrip()}")] for s in sentences]
    outs: list[str] = []
    for s in range(0, len(prompts), 64):
        new = generate(lm, prompts[s : s + 64], 32, stop_tokens=[tok.eos_id, tok.eot_id], pad_id=tok.pad_id)
        outs.extend(" ".join(tok.decode(t).split()) for t in new)
    res = caption_accuracies(outs, captions)
    # Without the full stop in the prompt the LM still ends its sentence with one: not counted as an error.
    same = [o == s or (not period and o.removesuffix(".") == s) for o, s in zip(outs, sentences)]
    res["exact_match"] = sum(same) / max(1, len(sentences))
    res["examples"] = [{"caption": c, "output": o} for c, o, ok in zip(captions, outs, same) if not ok][:10]
    return res


class _Laps:
    """Wall seconds per phase of the run, each phase timed from the end of the one before."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.wall: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the phase `name` as ending now."""
        now = time.perf_counter()
        self.wall[name] = round(now - self.last, 2)
        self.last = now

    def total(self) -> dict[str, float]:
        """Every phase and the total since the start."""
        self.wall["total"] = round(time.perf_counter() - self.start, 2)
        return self.wall


@dataclass
class _Points:
    """Per probe point, in the order scored: held-out accuracy, rows scored, accuracy on the probe's own
    training set (trained probes only) and slot 1 on one- and two-object held-out images apart."""

    labels: torch.Tensor  # held-out labels (N, K)
    accuracy: dict[str, dict[str, float | None]] = field(default_factory=dict)
    n_scored: dict[str, dict[str, int]] = field(default_factory=dict)
    train_accuracy: dict[str, dict[str, float | None]] = field(default_factory=dict)
    slot1_by_count: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)

    def add(
        self,
        name: str,
        accuracy: dict[str, float | None],
        n: dict[str, int],
        pred: torch.Tensor,
        train_accuracy: dict[str, float | None] | None = None,
    ) -> None:
        """Record a point from its scores and held-out predictions (N, K)."""
        self.accuracy[name], self.n_scored[name] = accuracy, n
        if train_accuracy is not None:
            self.train_accuracy[name] = train_accuracy
        self.slot1_by_count[name] = slot1_by_count(pred, self.labels)


def _records(manifest: str | Path, n: int) -> list[Any]:
    """The first `n` records of a manifest whose captions are of the shapes world."""
    from mm.datasets.media import read_manifest

    return [r for r in read_manifest(manifest, "image") if parse_caption(r.text)][:n]


def _probe_points(points: _Points, tr: Collected, te: Collected, steps: int, seed: int, laps: _Laps) -> None:
    """Points 1-3 (trained probes on encoder features, projected tokens, xattn contributions) and the model's
    teacher-forced next-token predictions."""
    probes = {
        "encoder": lambda: pooled_probe_accuracy(
            (tr.features, tr.mask, tr.labels), (te.features, te.mask, te.labels), steps=steps, seed=seed
        ),
        "projected": lambda: pooled_probe_accuracy(
            (tr.projected, tr.mask, tr.labels), (te.projected, te.mask, te.labels), steps=steps, seed=seed
        ),
        "xattn": lambda: xattn_probe_accuracy(
            (tr.words, tr.labels), (te.words, te.labels), steps=steps, seed=seed
        ),
    }
    for name, run in probes.items():
        log.info("probe: %s", name)
        res = run()
        points.add(name, res.accuracy, res.n, res.pred, res.train_accuracy)
        laps.lap(name)
    points.add("next_token", *score(te.next_token, te.labels), te.next_token)


def _text_points(
    points: _Points, bundle: tuple[nn.Module, Any, Any, dict[str, Any]], records: list[Any], laps: _Laps
) -> dict[str, Any]:
    """Points 4 and 5: the model's greedy captions and the LM repeating each caption told in text (with and
    without the full stop); their scores and the captions."""
    from mm.models.caption import caption_images, load_rgb

    model, tok, transform, meta = bundle
    refs = [r.text for r in records]
    images = [load_rgb(r.media) for r in records]
    preds = caption_images(model, tok, transform, images, prompt=meta["prompt"], max_tiles=meta["max_tiles"])
    cap = caption_accuracies(preds, refs)
    points.add("caption", cap["accuracy"], cap["n"], cap["pred"])
    laps.lap("caption")
    lm_dot = lm_text_repeat(model.lm, tok, refs, period=True)
    lm_bare = lm_text_repeat(model.lm, tok, refs, period=False)
    points.add("lm_text", lm_dot["accuracy"], lm_dot["n"], lm_dot["pred"])
    laps.lap("lm_text")
    return {"refs": refs, "preds": preds, "caption": cap, "lm_text": lm_dot, "lm_text_no_period": lm_bare}


def _dims(model: nn.Module, tr: Collected) -> dict[str, Any]:
    """Widths of the encoder features and projected tokens, tokens per image, the xattn layers."""
    return {
        "encoder": int(tr.features.shape[-1]),
        "projected": int(tr.projected.shape[-1]),
        "tokens": int(tr.features.shape[1]),
        "xattn_layers": [int(i) for i in model.image_xattn],
    }


def _xattn_mean_norm(te: Collected) -> float:
    """Mean norm of the xattn contribution at the located words of the held-out captions."""
    defined = te.labels[:, :7] != IGNORE
    xnorm = te.words[:, :7].norm(dim=-1)[defined]
    return float(xnorm.mean()) if xnorm.numel() else 0.0


def run_probe(
    checkpoint: str | Path,
    train_manifest: str | Path,
    heldout_manifest: str | Path,
    *,
    n_train: int = 1500,
    n_heldout: int = 300,
    steps: int = 400,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Every probe point on a trained image-stage bundle (the module docstring); a JSON-ready dict.

    Keys: `accuracy[point][target]` (None: not defined there), `n` (held-out images per target),
    `n_scored[point][target]` (order: the rows scored), `train_accuracy` (probes on their own training set),
    `slot1_by_count`, `exact_match` (caption, lm_text, lm_text_no_period), `dims`, `xattn_mean_norm`, examples,
    `wall_seconds` per phase, and the run's settings."""
    from mm.stages.image_model import load_image_bundle

    laps = _Laps()
    torch.manual_seed(seed)
    bundle = load_image_bundle(Path(checkpoint))
    train_recs, test_recs = _records(train_manifest, n_train), _records(heldout_manifest, n_heldout)
    if not train_recs or not test_recs:
        raise ValueError("the manifests hold no caption of the shapes world")
    log.info("probe: %s, %d training and %d held-out images", checkpoint, len(train_recs), len(test_recs))
    laps.lap("load")
    tr = collect(*bundle, train_recs, batch_size=batch_size, what="train images")
    te = collect(*bundle, test_recs, batch_size=batch_size, what="held-out images")
    laps.lap("collect")
    points = _Points(te.labels, accuracy={"chance": chance_accuracies(tr.labels, te.labels)})
    _probe_points(points, tr, te, steps, seed, laps)
    text = _text_points(points, bundle, test_recs, laps)
    wall = laps.total()
    return {
        "checkpoint": str(checkpoint),
        "train": str(train_manifest),
        "heldout": str(heldout_manifest),
        "n_train": len(train_recs),
        "n_heldout": len(test_recs),
        "steps": steps,
        "seed": seed,
        "targets": list(TARGETS),
        "points": list(POINTS),
        "accuracy": points.accuracy,
        "n": {name: int((te.labels[:, k] != IGNORE).sum()) for k, name in enumerate(TARGETS)},
        "n_scored": points.n_scored,
        "train_accuracy": points.train_accuracy,
        "slot1_by_count": points.slot1_by_count,
        "exact_match": {k: text[k]["exact_match"] for k in ("caption", "lm_text", "lm_text_no_period")},
        "dims": _dims(bundle[0], tr),
        "xattn_mean_norm": _xattn_mean_norm(te),
        "caption_examples": [
            {"caption": r, "pred": p} for r, p in zip(text["refs"], text["preds"]) if r != p
        ][:10],
        "lm_text_examples": text["lm_text"]["examples"],
        "wall_seconds": wall,
    }


def format_table(result: dict[str, Any]) -> str:
    """The probe points (rows) by target (columns) as a fixed-width text table, with exact-match figures."""
    names = list(result["targets"])
    head = f"{'point':<11}" + "".join(f"{n:>9}" for n in names) + f"{'exact':>8}"
    lines = [head, "-" * len(head)]
    for point in result["points"]:
        row = result["accuracy"].get(point)
        if row is None:
            continue
        cells = "".join(f"{row[n]:>9.3f}" if row.get(n) is not None else f"{'-':>9}" for n in names)
        em = result["exact_match"].get(point)
        lines.append(f"{point:<11}{cells}" + (f"{em:>8.3f}" if em is not None else f"{'-':>8}"))
    lines.append(f"{'n':<11}" + "".join(f"{result['n'][n]:>9d}" for n in names))
    lines.append(
        "slot 1 on one-object | on two-object images (detecting an attribute | binding it to the left object):"
    )
    attrs = " ".join(f"{k:>7}" for k in ("size", "colour", "shape"))
    lines.append(f"  {'point':<11}{attrs} |{attrs}")
    for point, split in result["slot1_by_count"].items():
        cells = [
            f"{split[c][k]:.3f}" if split[c][k] is not None else "-"
            for c in ("one", "two")
            for k in TARGETS[:3]
        ]
        lines.append(
            f"  {point:<11}"
            + " ".join(f"{x:>7}" for x in cells[:3])
            + " |"
            + " ".join(f"{x:>7}" for x in cells[3:])
        )
    order_n = ", ".join(f"{p} {c['order']}" for p, c in result["n_scored"].items())
    em = result["exact_match"]
    lines.append(f"order scored on (colour pair named right): {order_n}")
    lines.append(
        f"lm_text without the final full stop: exact {em['lm_text_no_period']:.3f}; "
        f"wall {result['wall_seconds']['total']:.1f}s"
    )
    return "\n".join(lines)
