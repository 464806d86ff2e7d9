"""The demo report's figures (matplotlib, Agg backend: no display needed), each a PNG under `OUT/figures/`.

Loss curves per stage, exact match against step, a grid of held-out images with predicted and true captions,
and strips of held-out video frames. Each returns what it drew, and draws nothing when it has nothing to draw.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mm.app.report")

STAGE_ORDER = (
    "lm-pretrain",
    "clip-pretrain",
    "image-pretrain",
    "image-anneal",
    "video",
    "bestrq-pretrain",
    "speech",
)  # loss-curve panels in the order the demo runs the stages


def _plt() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay the figure out, write it to `path` as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_losses(metrics: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a stage's metrics.jsonl (records without a loss are skipped)."""
    steps, losses = [], []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            steps.append(int(rec["step"]))
            losses.append(float(rec["loss"]))
    return steps, losses


def loss_curves_figure(out: Path, path: Path, only: list[str] | None = None) -> list[str]:
    """One panel per stage that has OUT/<stage>/metrics.jsonl (of the stages in `only`, if given); returns the
    stages drawn."""
    stages = [s for s in STAGE_ORDER if (out / s / "metrics.jsonl").is_file()]
    stages += sorted(
        p.parent.name for p in out.glob("*/metrics.jsonl") if p.parent.name not in stages
    )  # any other stage
    if only is not None:
        stages = [s for s in stages if s in only]
    if not stages:
        return []
    plt = _plt()
    cols = min(3, len(stages))
    rows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, stages, strict=False):
        steps, losses = read_losses(out / stage / "metrics.jsonl")
        ax.plot(steps, losses, lw=1.2)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    _save(plt, fig, path)
    return stages


def _wrap(text: str, width: int = 26) -> str:
    """`text` broken into lines of at most `width` characters (a longer word gets a line of its own)."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def caption_grid_figure(examples: list[dict[str, Any]], path: Path, cols: int = 4) -> int:
    """Images with predicted (green if exact, red if not) and true captions; returns the number drawn."""
    from PIL import Image

    shown = [e for e in examples if Path(e["image"]).is_file()][: cols * 3]
    if not shown:
        return 0
    plt = _plt()
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.4 * rows), squeeze=False)
    for ax, e in zip(axes.flat, shown, strict=False):
        with Image.open(e["image"]) as im:
            ax.imshow(im.convert("RGB"))
        ok = e["pred"] == e["text"]
        ax.set_title(f"pred: {_wrap(e['pred'])}", fontsize=7.5, color="green" if ok else "red")
        ax.set_xlabel(f"true: {_wrap(e['text'])}", fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    _save(plt, fig, path)
    return len(shown)


def video_strips_figure(
    examples: list[dict[str, Any]], path: Path, n_videos: int = 4, n_frames: int = 6
) -> int:
    """A row of evenly spaced frames per video, titled with predicted and true captions; returns rows drawn."""
    import numpy as np

    rows = []
    for e in examples:
        if len(rows) == n_videos:
            break
        try:
            from decord import VideoReader, cpu

            vr = VideoReader(str(e["video"]), ctx=cpu(0))
            idx = np.linspace(0, len(vr) - 1, n_frames).round().astype(int).tolist()
            rows.append((e, vr.get_batch(idx).asnumpy()))
        except Exception as err:  # a missing or unreadable clip: leave it out of the figure
            log.warning("report: cannot read %s (%s)", e.get("video"), err)
    if not rows:
        return 0
    plt = _plt()
    fig, axes = plt.subplots(len(rows), n_frames, figsize=(1.6 * n_frames, 1.9 * len(rows)), squeeze=False)
    for r, (e, frames) in enumerate(rows):
        for c in range(n_frames):
            ax = axes[r][c]
            ax.imshow(frames[c])
            ax.set_xticks([])
            ax.set_yticks([])
        ok = e["pred"] == e["text"]
        axes[r][0].set_title(
            f"pred: {e['pred']}   |   true: {e['text']}",
            fontsize=8,
            loc="left",
            color="green" if ok else "red",
        )
    _save(plt, fig, path)
    return len(rows)


def exact_match_curves_figure(curves: dict[str, list[dict[str, Any]]], path: Path) -> int:
    """Exact match against step (left) and against seconds (right; the stages end to end in the order given,
    each from where the one before ended), one line per stage (`{stage: [{step, seconds, value}, ...]}`);
    returns the lines drawn."""
    points = {
        stage: [
            (c["step"], c.get("seconds"), c["value"])
            for c in curve
            if c.get("step") is not None and c.get("value") is not None
        ]
        for stage, curve in curves.items()
    }
    points = {stage: sorted(p, key=lambda x: x[0]) for stage, p in points.items() if p}
    if not points:
        return 0
    plt = _plt()
    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    offset = 0.0
    for stage, p in points.items():
        ax.plot([x for x, _, _ in p], [y for _, _, y in p], marker="o", ms=3, lw=1.2, label=stage)
        timed = [(s, y) for _, s, y in p if s is not None]
        if timed:
            ax_s.plot(
                [offset + s for s, _ in timed], [y for _, y in timed], marker="o", ms=3, lw=1.2, label=stage
            )
            offset += max(s for s, _ in timed)
    ax.set_xlabel("step (of each stage)", fontsize=8)
    ax_s.set_xlabel("seconds of training (stages end to end)", fontsize=8)
    for a in (ax, ax_s):
        a.set_ylabel("held-out exact match", fontsize=8)
        a.set_ylim(-0.02, 1.02)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    _save(plt, fig, path)
    return len(points)
