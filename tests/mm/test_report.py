"""The demo's Markdown report: sections follow what was run, figures are written and readable."""

import json

from PIL import Image

from mm.datasets.shapes import synth_shapes
from mm.report import caption_grid_figure, read_losses, write_report


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
