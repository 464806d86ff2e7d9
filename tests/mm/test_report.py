"""The demo's Markdown report: sections follow what was run, figures are written and readable."""

import json

from PIL import Image

from mm.app.report import (
    caption_grid_figure,
    exact_match_curves_figure,
    loss_curves_figure,
    read_losses,
    stage_rows,
    write_report,
)
from mm.world import synth_shapes


def test_report_sections_and_figures(tmp_path):
    for stage, n in (("lm-pretrain", 30), ("image-pretrain", 12)):
        d = tmp_path / stage
        d.mkdir()
        lines = [json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) for s in range(1, n + 1)]
        (d / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"step": n, "eval/x": 1.0})]) + "\n")
    manifest = synth_shapes(tmp_path / "data", n=5, seed=0, split="heldout")
    recs = [json.loads(x) for x in manifest.read_text().splitlines()]
    examples = [
        {
            "image": str(manifest.parent / r["image"]),
            "text": r["text"],
            "pred": r["text"] if i % 2 else "a cat",
        }
        for i, r in enumerate(recs)
    ]
    report = {
        "machine": {"processor": "x86_64", "threads": 2, "platform": "Linux", "torch": "2.x"},
        "wall_time_s": 321.0,
        "lm": {
            "heldout_ppl": 2.3,
            "wall_time_s": 70.0,
            "stage_seconds": 71.0,
            "reused": False,
            "completions": {"a": "a red circle"},
            "stages": {"lm-pretrain": {"wall_time_s": 71.0, "stage_seconds": 71.0, "reused": False}},
        },
        "image": {
            "caption_exact_match": 0.4,
            "stages": {"image-pretrain": {"wall_time_s": 0.5, "stage_seconds": 80.0, "reused": True}},
            "examples": examples,
        },
        "lm_frozen": True,
        "lm_fingerprint": {"before": "ab12", "after": "ab12"},
    }
    md = write_report(tmp_path, report).read_text()
    assert "| image.caption_exact_match | 0.400 |" in md
    assert "| image-pretrain | 80.0 | 0.5 | True |" in md  # computed in 80 s earlier, reused in this run
    assert "| lm-pretrain | 71.0 | 71.0 | False |" in md
    assert "This run: 321 s; computing every stage took 151 s." in md
    assert "identical: **True**" in md
    assert "![loss curves](figures/loss_curves.png)" in md and "![held-out images]" in md
    assert "Held-out videos" not in md and "Speech recognition" not in md  # not run: no section
    for section in (
        "per attribute",
        "## Robustness",
        "## Learning curves",
    ):  # no figures for them: no section
        assert section not in md
    for name in ("loss_curves.png", "image_captions.png"):
        with Image.open(tmp_path / "figures" / name) as im:
            assert im.size[0] > 400 and im.size[1] > 200
    assert read_losses(tmp_path / "lm-pretrain" / "metrics.jsonl")[1][:2] == [3.0, 1.5]
    assert (
        caption_grid_figure(
            [{"image": str(tmp_path / "none.png"), "text": "a", "pred": "a"}], tmp_path / "x.png"
        )
        == 0
    )


def image_figures(em, color, shape, size, count, order, order_n, n):
    return {
        "exact_match": em,
        "color_accuracy": color,
        "shape_accuracy": shape,
        "size_accuracy": size,
        "count_accuracy": count,
        "order_accuracy": order,
        "order_n": order_n,
        "well_formed": 0.995,
        "n": n,
    }


def attribute_report():
    """A report with per-attribute, robustness and learning-curve figures for the image and video parts."""
    return {
        "image": {
            "caption_exact_match": 0.61,
            "attributes": {
                "heldout": image_figures(0.61, 0.93, 0.88, 0.97, 0.99, 0.875, 40, 200),
                "heldout_pairs": image_figures(0.12, 0.71, 0.64, 0.96, 0.98, 0.5, 30, 200),
            },
            "robustness": {
                "jpeg": image_figures(0.55, 0.91, 0.86, 0.95, 0.97, 0.8, 20, 100),
                "antialias": image_figures(0.47, 0.89, 0.84, 0.94, 0.96, 0.0, 0, 100),
                "sizes": image_figures(0.33, 0.81, 0.77, 0.62, 0.93, 0.75, 16, 100),
            },
            "exact_match_curves": {
                "image-pretrain": [
                    {"step": 100, "seconds": 20.4, "value": 0.05},
                    {"step": 200, "seconds": 40.6, "value": 0.21},
                ],
                "image-anneal": [
                    {"step": 100, "seconds": 35.0, "value": 0.44},
                    {"step": 250, "seconds": 88.2, "value": 0.52},
                    {"step": 300, "value": 0.61},  # a record from before seconds were logged
                ],
            },
        },
        "video": {
            "caption_exact_match": 0.71,
            "attributes": {
                "heldout": {
                    "exact_match": 0.71,
                    "color_accuracy": 0.96,
                    "shape_accuracy": 0.94,
                    "direction_accuracy": 0.99,
                    "n": 200,
                },
                "heldout_pairs": {"exact_match": 0.08, "direction_accuracy": 0.97, "n": 120},
            },
            "exact_match_curves": {"video": [{"step": 300, "value": 0.66}, {"step": 900, "value": 0.71}]},
        },
    }


def markdown_section(md, title):
    """The lines of the `## ` section of md titled `title`, up to the next one."""
    lines = md.splitlines()
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_report_attribute_robustness_and_curve_sections(tmp_path):
    report = attribute_report()
    md = write_report(tmp_path, report).read_text()

    image = markdown_section(md, "## Image captions per attribute")
    assert (
        "| split | exact match | colour | shape | size | count | left-right order | well-formed | images |"
        in image
    )
    assert "| heldout | 0.610 | 0.930 | 0.880 | 0.970 | 0.990 | 0.875 (40) | 0.995 | 200 |" in image
    assert "| heldout_pairs | 0.120 | 0.710 | 0.640 | 0.960 | 0.980 | 0.500 (30) | 0.995 | 200 |" in image
    robust = markdown_section(md, "## Robustness (image-anneal on images drawn differently)")
    assert (
        "| heldout (drawn as in training) | 0.610 | 0.930 | 0.880 | 0.970 | 0.990 | 0.875 (40) | 0.995 | 200 |"
        in robust
    )
    assert "| jpeg | 0.550 | 0.910 | 0.860 | 0.950 | 0.970 | 0.800 (20) | 0.995 | 100 |" in robust
    assert (
        "| antialias | 0.470 | 0.890 | 0.840 | 0.940 | 0.960 | - | 0.995 | 100 |" in robust
    )  # no pair to order
    assert "| sizes | 0.330 | 0.810 | 0.770 | 0.620 | 0.930 | 0.750 (16) | 0.995 | 100 |" in robust
    assert any(line.startswith("- jpeg: JPEG at quality 40-85") for line in robust)
    video = markdown_section(md, "## Video captions per attribute")
    assert "| split | exact match | colour | shape | direction | clips |" in video
    assert "| heldout | 0.710 | 0.960 | 0.940 | 0.990 | 200 |" in video
    assert "| heldout_pairs | 0.080 | - | - | 0.970 | 120 |" in video  # missing figures shown as "-"
    curves = markdown_section(md, "## Learning curves (held-out exact match)")
    assert "![exact match against step](figures/exact_match_curves.png)" in curves
    assert "| stage | step | seconds | exact match |" in curves
    assert "| image-pretrain | 100 | 20 | 0.050 |" in curves
    assert "| image-pretrain | 200 | 41 | 0.210 |" in curves
    assert "| image-anneal | 250 | 88 | 0.520 |" in curves
    assert "| image-anneal | 300 | - | 0.610 |" in curves
    assert "| video | 900 | - | 0.710 |" in curves
    with Image.open(tmp_path / "figures" / "exact_match_curves.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
    # Headline figures still list only the numbers at the top of each part.
    assert "| image.caption_exact_match | 0.610 |" in md and "| video.caption_exact_match | 0.710 |" in md
    empty = {"image-pretrain": [{"step": 5, "value": None}]}
    assert (
        exact_match_curves_figure(empty, tmp_path / "none.png") == 0 and not (tmp_path / "none.png").exists()
    )


def test_every_section_lists_its_stages_the_same_way(tmp_path):
    video_rec = {"wall_time_s": 0.2, "stage_seconds": 47.0, "reused": True}
    report = {
        "lm": {"stages": {"lm-pretrain": {"wall_time_s": 0.1, "stage_seconds": 70.0, "reused": True}}},
        "speech": {"stages": {"speech": {"wall_time_s": 9.0, "reused": False}}},
        # `stage` is the alias `mm demo` prints from; the row comes from `stages` only
        "video": {"stages": {"video": video_rec}, "stage": video_rec},
    }
    assert stage_rows(report) == [
        ("lm-pretrain", 0.1, 70.0, True),
        ("video", 0.2, 47.0, True),
        ("speech", 9.0, 9.0, False),
    ]
    for stage in ("lm-pretrain", "speech"):  # a stage folder left from an earlier run: no panel for it
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert loss_curves_figure(tmp_path, tmp_path / "a.png", only=["lm-pretrain"]) == ["lm-pretrain"]
    assert loss_curves_figure(tmp_path, tmp_path / "b.png") == ["lm-pretrain", "speech"]
