"""The demo's human-readable report: `OUT/report.md` with PNG figures in `OUT/figures/`.

Built from `OUT/report.json` and the stages' `metrics.jsonl`: loss curves per stage, exact-match learning
curves of the image and video stages, a grid of held-out images with predicted and true captions, per-attribute
tables of the image and video captions, a robustness table (the image-anneal bundle on JPEG, anti-aliased and
unusually sized images), strips of held-out videos with their captions, a WER table with example transcripts,
the LM fingerprint before and after, wall time per stage, and the machine it ran on. Parts of the report.json
sections it does not hold are left out, and so are the loss curves of stages no section lists (a stage folder
left from an earlier run). The figures are drawn by `mm.app.report_figures`; this module writes the Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm.app.demo_chat import chat_report_section
from mm.app.report_figures import (
    STAGE_ORDER,
    caption_grid_figure,
    exact_match_curves_figure,
    loss_curves_figure,
    read_losses,
    video_strips_figure,
)

__all__ = [
    "IMAGE_ATTRIBUTE_COLUMNS",
    "SECTIONS",
    "STAGE_ORDER",
    "VARIANT_DESCRIPTIONS",
    "VIDEO_ATTRIBUTE_COLUMNS",
    "attribute_table",
    "caption_grid_figure",
    "curve_table",
    "exact_match_curves_figure",
    "loss_curves_figure",
    "read_losses",
    "stage_rows",
    "video_strips_figure",
    "write_report",
]

SECTIONS = (
    "lm",
    "image",
    "video",
    "speech",
    "chat",
)  # report.json's sections, in the order the demo runs them

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


def _fmt(x: Any, digits: int = 3) -> str:
    """A number with `digits` decimals if it is a float, else as str()."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _cell(x: Any) -> str:
    """A table cell: "-" for a missing figure."""
    return "-" if x is None else _fmt(x)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table: the heading row, the rule under it, then one line per row (cells as str())."""

    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(head), "|" + " --- |" * len(head), *(line(r) for r in rows)]


def _section(title: str, *blocks: list[str]) -> list[str]:
    """A `## title` section: its blocks of lines (notes, tables, figures) after it, blank lines between; empty
    blocks are left out."""
    md = ["", f"## {title}"]
    for block in blocks:
        if block:
            md += ["", *block]
    return md


def attribute_table(
    rows: dict[str, dict[str, Any]], columns: tuple[tuple[str, str], ...], first: str, count: str
) -> list[str]:
    """Markdown table: one row per name in `rows`, one column per (key, heading), then the sample count."""
    keys = [k for k, _ in columns]
    lines = []
    for name, r in rows.items():
        cells = [_cell(r.get(k)) for k in keys]
        if "order_accuracy" in keys and r.get("order_n") is not None:  # how many captions it was scored on
            i = keys.index("order_accuracy")
            cells[i] = f"{cells[i]} ({r['order_n']})" if r["order_n"] else "-"
        lines.append([name, *cells, _cell(r.get("n"))])
    return _table([first, *(h for _, h in columns), count], lines)


def curve_table(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown table of learning curves: one row per stage and evaluation (step, the stage's seconds of
    training before it, exact match)."""
    rows = [
        [
            stage,
            c["step"],
            _cell(None if c.get("seconds") is None else round(c["seconds"])),
            _cell(c.get("value")),
        ]
        for stage, curve in curves.items()
        for c in curve
        if c.get("step") is not None
    ]
    return _table(["stage", "step", "seconds", "exact match"], rows) if rows else []


def stage_rows(report: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(stage, seconds in this run, seconds when the stage was computed, reused) of every stage in the report.

    Every section (`lm`, `image`, `video`, `speech`, `chat`) lists its stages the same way, under `stages`.
    """
    rows = []
    for part in SECTIONS:
        for stage, rec in (report.get(part) or {}).get("stages", {}).items():
            this_run, computed = rec.get("wall_time_s"), rec.get("stage_seconds")
            rows.append((stage, this_run, this_run if computed is None else computed, rec.get("reused")))
    return rows


def _headline_section(report: dict[str, Any]) -> list[str]:
    """The title, the machine and time line, and the table of each part's top-level numbers."""
    m = report.get("machine", {})
    computed = sum(c for _, _, c, _ in stage_rows(report) if isinstance(c, (int, float)))
    machine = (
        f"Machine: {m.get('cpu', m.get('processor', '?'))}, {m.get('threads', '?')} threads, {m.get('platform', '?')}; "
        f"torch {m.get('torch', '?')}. This run: {_fmt(report.get('wall_time_s'), 0)} s; computing every stage took"
        f" {_fmt(computed, 0)} s."
    )
    rows = [
        [f"{key}.{k}", _fmt(v)]
        for key in ("image", "video", "speech")
        for k, v in report.get(key, {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    if "lm" in report:
        rows.append(["lm.heldout_ppl", _fmt(report["lm"].get("heldout_ppl"))])
    rows.append(["lm_frozen", report.get("lm_frozen")])
    return ["# mm demo report", "", machine, *_section("Headline figures", _table(["figure", "value"], rows))]


def _stages_section(report: dict[str, Any]) -> list[str]:
    """Seconds per stage, when computed and in this run."""
    note = (
        "Seconds each stage took when it was computed, and in this run (0 when its cached result was reused)."
    )
    rows = [[s, _fmt(c, 1), _fmt(t, 1), r] for s, t, c, r in stage_rows(report)]
    return _section("Stages", [note], _table(["stage", "computed in (s)", "this run (s)", "reused"], rows))


def _fingerprint_section(report: dict[str, Any]) -> list[str]:
    """The LM's fingerprint before and after the multimodal stages (nothing without one)."""
    fp = report.get("lm_fingerprint", {})
    if not fp:
        return []
    return _section(
        "The frozen LM",
        [
            f"- fingerprint after LM pretraining: `{fp.get('before')}`",
            f"- fingerprint after every multimodal stage: `{fp.get('after')}`",
            f"- identical: **{fp.get('before') == fp.get('after')}**",
        ],
    )


def _loss_curves_section(out: Path, report: dict[str, Any]) -> list[str]:
    """The loss curves of the report's stages (nothing if none has metrics)."""
    only = [s for s, _, _, _ in stage_rows(report)]
    if not loss_curves_figure(out, out / "figures" / "loss_curves.png", only=only):
        return []
    return _section("Loss curves", ["![loss curves](figures/loss_curves.png)"])


def _learning_curves_section(out: Path, report: dict[str, Any]) -> list[str]:
    """Every part's `exact_match_curves`, as a figure and a table (nothing without a point)."""
    curves = {}  # every section's `exact_match_curves` ({stage: curve}), in demo order
    for part in SECTIONS:
        curves.update((report.get(part) or {}).get("exact_match_curves") or {})
    if not any(curves.values()):
        return []
    note = (
        "Exact match of the held-out captions during each stage (every `train.eval_every` steps, on the first"
        " held-out images); the last point of a stage is its final evaluation. Seconds: the stage's training"
        " time before that evaluation (earlier evaluations and checkpoints included), on the machine below."
    )
    drawn = exact_match_curves_figure(curves, out / "figures" / "exact_match_curves.png")
    figure = ["![exact match against step](figures/exact_match_curves.png)"] if drawn else []
    return _section("Learning curves (held-out exact match)", [note], figure, curve_table(curves))


def _image_sections(out: Path, report: dict[str, Any]) -> list[str]:
    """Held-out images with their captions, the per-attribute table and the robustness table."""
    image = report.get("image", {})
    md = []
    if caption_grid_figure(image.get("examples", []), out / "figures" / "image_captions.png"):
        note = "Predicted caption above each image (green: exact match), true caption below."
        md += _section("Held-out images", [note], ["![held-out images](figures/image_captions.png)"])
    if image.get("attributes"):
        note = (
            "Colour, shape and size: share of true objects whose word in the same left-to-right slot is right;"
            " count: the number of objects is right; left-right order: two-object captions naming the right two"
            " objects (how many in brackets) that put them in the right order; well-formed: captions of the"
            " world's grammar."
        )
        table = attribute_table(image["attributes"], IMAGE_ATTRIBUTE_COLUMNS, "split", "images")
        md += _section("Image captions per attribute", [note], table)
    if image.get("robustness"):
        note = (
            "New scenes of the training colour-shape pairs, drawn in ways the training images never are; the"
            " first row is the held-out split, drawn as in training, for comparison."
        )
        kinds = [f"- {kind}: {VARIANT_DESCRIPTIONS.get(kind, kind)}" for kind in image["robustness"]]
        rows = dict(image["robustness"])
        if "heldout" in (image.get("attributes") or {}):
            rows = {"heldout (drawn as in training)": image["attributes"]["heldout"], **rows}
        table = attribute_table(rows, IMAGE_ATTRIBUTE_COLUMNS, "images", "n")
        md += _section("Robustness (image-anneal on images drawn differently)", [note], kinds, table)
    return md


def _video_sections(out: Path, report: dict[str, Any]) -> list[str]:
    """Strips of held-out videos with their captions, and the per-attribute table."""
    video = report.get("video", {})
    md = []
    if video_strips_figure(video.get("examples", []), out / "figures" / "video_strips.png"):
        md += _section("Held-out videos", ["![held-out videos](figures/video_strips.png)"])
    if video.get("attributes"):
        table = attribute_table(video["attributes"], VIDEO_ATTRIBUTE_COLUMNS, "split", "clips")
        md += _section("Video captions per attribute", table)
    return md


def _speech_section(report: dict[str, Any]) -> list[str]:
    """WER per split (with the CTC and text-copy baselines), per held-out voice, and example transcripts."""
    speech = report.get("speech", {})
    if not speech:
        return []
    note = (
        "WER of the transcripts the frozen LM writes after the speech; beside it, the audio side alone (the"
        " adapter's CTC head, greedy) and the LM repeating the same sentences given as text."
    )
    wer = [
        [split, *(_fmt(speech.get(f"{kind}wer_{split}")) for kind in ("", "ctc_", "lm_copy_"))]
        for split in ("heldout_sentences", "heldout_voices", "untrained_forms", "untrained_voices")
        if f"wer_{split}" in speech
    ]
    ast = [
        [split, _fmt(speech.get(f"ast_bleu_{split}")), _fmt(speech.get(f"ast_exact_match_{split}"))]
        for split in ("heldout_sentences", "heldout_voices", "untrained_forms", "untrained_voices")
        if f"ast_bleu_{split}" in speech
    ]
    questions = [[f, _fmt(a)] for f, a in (speech.get("question_accuracy_by_family") or {}).items()]
    if "question_accuracy" in speech:
        questions.append(["all", _fmt(speech["question_accuracy"])])
    conditions = [[c, _fmt(w)] for c, w in (speech.get("wer_by_condition") or {}).items()]
    long = speech.get("long_recording") or {}
    long_lines = []
    if long:
        long_lines = [
            f"A {_fmt(long.get('seconds'), 0)}-second recording of {long.get('sentences')} sentences with pauses, "
            f"transcribed whole (cut on silence, pieces in order): WER {_fmt(long.get('wer'))}.",
            "",
            f"- reference: `{long.get('reference')}`",
            f"- transcript: `{long.get('transcript')}`",
        ]
    per_voice = speech.get("wer_per_voice") or {}
    voices = [[voice, _fmt(w)] for voice, w in per_voice.items()]
    examples = speech.get("examples") or {}
    if isinstance(examples, list):
        examples = {"heldout": examples}
    transcripts = [
        [split, e.get("ref", e.get("question", e.get("text"))), e.get("hyp", e.get("pred"))]
        for split, es in examples.items()
        for e in (es or [])[:4]
    ]
    return _section(
        "Speech recognition",
        [note],
        _table(["split", "WER", "audio side alone (CTC)", "LM repeating the text"], wer),
        _table(["held-out voice", "WER"], voices) if voices else [],
        _table(["audio condition (held-out sentences)", "WER"], conditions) if conditions else [],
        long_lines,
        _table(["split", "reference", "transcript"], transcripts) if transcripts else [],
    ) + (
        _section(
            "Speech translation and spoken questions",
            [
                "Translations into Spanish (sacrebleu BLEU, exact match) and answers to spoken questions asked"
                " with no text prompt after a scene given in text (accuracy per question family)."
            ],
            _table(["split", "BLEU", "exact match"], ast) if ast else [],
            _table(["spoken question family", "accuracy"], questions) if questions else [],
        )
        if ast or questions
        else []
    )


def _lm_completions_section(report: dict[str, Any]) -> list[str]:
    """The LM's greedy completions of the demo prompts (nothing without any)."""
    if "lm" not in report or not report["lm"].get("completions"):
        return []
    return _section("LM completions (greedy)", [f"- `{v}`" for v in report["lm"]["completions"].values()])


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write OUT/report.md and OUT/figures/*.png for a demo report; returns the Markdown file."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    md = [
        *_headline_section(report),
        *_stages_section(report),
        *_fingerprint_section(report),
        *_loss_curves_section(out, report),
        *_learning_curves_section(out, report),
        *_image_sections(out, report),
        *_video_sections(out, report),
        *_speech_section(report),
        *chat_report_section(report),
        *_lm_completions_section(report),
    ]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
