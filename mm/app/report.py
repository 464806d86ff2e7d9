"""The demo's human-readable report: `OUT/report.md` with PNG figures in `OUT/figures/`.

Built from `OUT/report.json` and the stages' `metrics.jsonl`: loss curves per stage, exact-match learning
curves of the image and video stages, a grid of held-out images with predicted and true captions, per-attribute
tables of the image and video captions, a robustness table (the image-anneal bundle on JPEG, anti-aliased and
unusually sized images), strips of held-out videos with their captions, a WER table with example transcripts,
the LM fingerprint before and after, wall time per stage, and the machine it ran on. Parts of the report.json
sections it does not hold are left out, and so are the loss curves of stages no section lists (a stage folder
left from an earlier run). Figures use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mm.app.report")

SECTIONS = ("lm", "image", "video", "speech")  # report.json's sections, in the order the demo runs them
STAGE_ORDER = (
    "lm-pretrain",
    "clip-pretrain",
    "image-pretrain",
    "image-anneal",
    "video",
    "bestrq-pretrain",
    "speech",
)


def _plt() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stages


def _wrap(text: str, width: int = 26) -> str:
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(rows)


def exact_match_curves_figure(curves: dict[str, list[dict[str, Any]]], path: Path) -> int:
    """Exact match against step, one line per stage (`{stage: [{step, value}, ...]}`); returns lines drawn."""
    points = {
        stage: [
            (c["step"], c["value"]) for c in curve if c.get("step") is not None and c.get("value") is not None
        ]
        for stage, curve in curves.items()
    }
    points = {stage: sorted(p) for stage, p in points.items() if p}
    if not points:
        return 0
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for stage, p in points.items():
        ax.plot([x for x, _ in p], [y for _, y in p], marker="o", ms=3, lw=1.2, label=stage)
    ax.set_xlabel("step (of each stage)", fontsize=8)
    ax.set_ylabel("held-out exact match", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(points)


# (key in a caption_attribute_report / motion_report, column heading)
IMAGE_ATTRIBUTE_COLUMNS = (
    ("exact_match", "exact match"),
    ("color_accuracy", "colour"),
    ("shape_accuracy", "shape"),
    ("size_accuracy", "size"),
    ("count_accuracy", "count"),
    ("order_accuracy", "left-right order"),
    ("well_formed", "well-formed"),
)
VIDEO_ATTRIBUTE_COLUMNS = (
    ("exact_match", "exact match"),
    ("color_accuracy", "colour"),
    ("shape_accuracy", "shape"),
    ("direction_accuracy", "direction"),
)
VARIANT_DESCRIPTIONS = {
    "jpeg": "JPEG at quality 40-85",
    "antialias": "drawn at 4x and downsampled (anti-aliased edges)",
    "sizes": "exact 1:1 and 4:1, sizes off the training buckets, object sides at the ends of their ranges",
}


def _cell(x: Any) -> str:
    """A table cell: "-" for a missing figure."""
    return "-" if x is None else _fmt(x)


def attribute_table(
    rows: dict[str, dict[str, Any]], columns: tuple[tuple[str, str], ...], first: str, count: str
) -> list[str]:
    """Markdown table: one row per name in `rows`, one column per (key, heading), then the sample count."""
    head = [first, *(h for _, h in columns), count]
    md = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        cells = [_cell(r.get(k)) for k, _ in columns]
        keys = [k for k, _ in columns]
        if "order_accuracy" in keys and r.get("order_n") is not None:  # how many captions it was scored on
            i = keys.index("order_accuracy")
            cells[i] = f"{cells[i]} ({r['order_n']})" if r["order_n"] else "-"
        md.append("| " + " | ".join([name, *cells, _cell(r.get("n"))]) + " |")
    return md


def curve_table(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown table of learning curves: one row per step, one column per stage ("-" where not evaluated)."""
    stages = [s for s, c in curves.items() if c]
    if not stages:
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    for stage in stages:
        for c in curves[stage]:
            if c.get("step") is not None:
                by_step.setdefault(c["step"], {})[stage] = c.get("value")
    md = ["| step | " + " | ".join(stages) + " |", "|" + " --- |" * (len(stages) + 1)]
    for step in sorted(by_step):
        md.append(f"| {step} | " + " | ".join(_cell(by_step[step].get(s)) for s in stages) + " |")
    return md


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def stage_rows(report: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(stage, seconds in this run, seconds when the stage was computed, reused) of every stage in the report.

    Every section (`lm`, `image`, `video`, `speech`) lists its stages the same way, under `stages`.
    """
    rows = []
    for part in SECTIONS:
        for stage, rec in (report.get(part) or {}).get("stages", {}).items():
            this_run, computed = rec.get("wall_time_s"), rec.get("stage_seconds")
            rows.append((stage, this_run, this_run if computed is None else computed, rec.get("reused")))
    return rows


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write OUT/report.md and OUT/figures/*.png for a demo report; returns the Markdown file."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    md = ["# mm demo report", ""]
    m = report.get("machine", {})
    md += [
        f"Machine: {m.get('cpu', m.get('processor', '?'))}, {m.get('threads', '?')} threads, {m.get('platform', '?')}; "
        f"torch {m.get('torch', '?')}. This run: {_fmt(report.get('wall_time_s'), 0)} s; computing every stage took"
        f" {_fmt(sum(c for _, _, c, _ in stage_rows(report) if isinstance(c, (int, float))), 0)} s.",
        "",
        "## Headline figures",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for key in ("image", "video", "speech"):
        for k, v in report.get(key, {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                md.append(f"| {key}.{k} | {_fmt(v)} |")
    if "lm" in report:
        md.append(f"| lm.heldout_ppl | {_fmt(report['lm'].get('heldout_ppl'))} |")
    md.append(f"| lm_frozen | {report.get('lm_frozen')} |")
    md += [
        "",
        "## Stages",
        "",
        "Seconds each stage took when it was computed, and in this run (0 when its cached result was reused).",
        "",
        "| stage | computed in (s) | this run (s) | reused |",
        "| --- | --- | --- | --- |",
    ]
    md += [f"| {s} | {_fmt(c, 1)} | {_fmt(t, 1)} | {r} |" for s, t, c, r in stage_rows(report)]
    fp = report.get("lm_fingerprint", {})
    if fp:
        md += [
            "",
            "## The frozen LM",
            "",
            f"- fingerprint after LM pretraining: `{fp.get('before')}`",
            f"- fingerprint after every multimodal stage: `{fp.get('after')}`",
            f"- identical: **{fp.get('before') == fp.get('after')}**",
        ]
    stages = loss_curves_figure(out, figs / "loss_curves.png", only=[s for s, _, _, _ in stage_rows(report)])
    if stages:
        md += ["", "## Loss curves", "", "![loss curves](figures/loss_curves.png)"]
    image, video = report.get("image", {}), report.get("video", {})
    curves = {}  # every section's `exact_match_curves` ({stage: curve}), in demo order
    for part in SECTIONS:
        curves.update((report.get(part) or {}).get("exact_match_curves") or {})
    if any(curves.values()):
        md += [
            "",
            "## Learning curves (held-out exact match)",
            "",
            "Exact match of the held-out captions during each stage (every `train.eval_every` steps, on the first"
            " held-out images); the last point of a stage is its final evaluation.",
            "",
        ]
        if exact_match_curves_figure(curves, figs / "exact_match_curves.png"):
            md += ["![exact match against step](figures/exact_match_curves.png)", ""]
        md += curve_table(curves)
    if caption_grid_figure(image.get("examples", []), figs / "image_captions.png"):
        md += [
            "",
            "## Held-out images",
            "",
            "Predicted caption above each image (green: exact match), true caption below.",
            "",
            "![held-out images](figures/image_captions.png)",
        ]
    if image.get("attributes"):
        md += [
            "",
            "## Image captions per attribute",
            "",
            "Colour, shape and size: share of true objects whose word in the same left-to-right slot is right;"
            " count: the number of objects is right; left-right order: two-object captions naming the right two"
            " objects (how many in brackets) that put them in the right order; well-formed: captions of the"
            " world's grammar.",
            "",
        ]
        md += attribute_table(image["attributes"], IMAGE_ATTRIBUTE_COLUMNS, "split", "images")
    if image.get("robustness"):
        md += [
            "",
            "## Robustness (image-anneal on images drawn differently)",
            "",
            "New scenes of the training colour-shape pairs, drawn in ways the training images never are; the"
            " first row is the held-out split, drawn as in training, for comparison.",
            "",
        ]
        md += [f"- {kind}: {VARIANT_DESCRIPTIONS.get(kind, kind)}" for kind in image["robustness"]]
        rows = dict(image["robustness"])
        if "heldout" in (image.get("attributes") or {}):
            rows = {"heldout (drawn as in training)": image["attributes"]["heldout"], **rows}
        md += ["", *attribute_table(rows, IMAGE_ATTRIBUTE_COLUMNS, "images", "n")]
    if video_strips_figure(video.get("examples", []), figs / "video_strips.png"):
        md += ["", "## Held-out videos", "", "![held-out videos](figures/video_strips.png)"]
    if video.get("attributes"):
        md += ["", "## Video captions per attribute", ""]
        md += attribute_table(video["attributes"], VIDEO_ATTRIBUTE_COLUMNS, "split", "clips")
    speech = report.get("speech", {})
    if speech:
        md += [
            "",
            "## Speech recognition",
            "",
            "WER of the transcripts the frozen LM writes after the speech; beside it, the audio side alone (the"
            " adapter's CTC head, greedy) and the LM repeating the same sentences given as text.",
            "",
            "| split | WER | audio side alone (CTC) | LM repeating the text |",
            "| --- | --- | --- | --- |",
        ]
        for split in ("heldout_sentences", "heldout_voices"):
            if f"wer_{split}" in speech:
                md.append(
                    f"| {split} | {_fmt(speech.get(f'wer_{split}'))} | {_fmt(speech.get(f'ctc_wer_{split}'))}"
                    f" | {_fmt(speech.get(f'lm_copy_wer_{split}'))} |"
                )
        per_voice = speech.get("wer_per_voice") or {}
        if per_voice:
            md += ["", "| held-out voice | WER |", "| --- | --- |"]
            md += [f"| {voice} | {_fmt(w)} |" for voice, w in per_voice.items()]
        examples = speech.get("examples") or {}
        if isinstance(examples, list):
            examples = {"heldout": examples}
        rows = [(split, e) for split, es in examples.items() for e in (es or [])[:4]]
        if rows:
            md += ["", "| split | reference | transcript |", "| --- | --- | --- |"]
            md += [
                f"| {split} | {e.get('ref', e.get('text'))} | {e.get('hyp', e.get('pred'))} |"
                for split, e in rows
            ]
    if "lm" in report and report["lm"].get("completions"):
        md += ["", "## LM completions (greedy)", ""]
        md += [f"- `{v}`" for v in report["lm"]["completions"].values()]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
