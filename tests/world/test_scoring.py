"""Evaluation scorers: the generic ones (exact match, WER, BLEU), names resolved as `module:function`, and the
world's per-attribute scorer plugged in by name, giving the figures the image stage always reported."""

import pytest

from mm.stages.evaluation import SCORERS, check_scorers, exact_match_report, resolve_scorer, score
from mm.world.scoring import caption_attribute_report, motion_report, shapes_attributes

REFS = ["a large red circle", "a small blue square and a large green circle", "a small red triangle"]
PREDS = ["a large red circle", "a small blue square and a large red circle", "a large red triangle"]


def test_world_scorer_by_name_gives_the_merged_caption_figures():
    figures = score(PREDS, REFS, ["exact_match", "mm.world.scoring:shapes_attributes"])
    assert figures == {**exact_match_report(PREDS, REFS), **caption_attribute_report(PREDS, REFS)}
    assert list(figures)[:3] == ["exact_match", "attribute_accuracy", "n"]
    assert resolve_scorer("mm.world.scoring:shapes_attributes") is shapes_attributes
    assert score(PREDS, REFS, ["mm.world.scoring:motion_report"]) == motion_report(PREDS, REFS)


def test_world_scorer_gives_nothing_for_other_captions():
    assert shapes_attributes(["a dog"], ["a cat on a mat"]) == {}
    assert (
        score(["a dog"], ["a dog"], ["exact_match", "mm.world.scoring:shapes_attributes"])["exact_match"] == 1
    )


def test_generic_scorers():
    assert set(SCORERS) >= {"exact_match", "wer", "bleu"}
    wer = score(["the cat sat"], ["the cat sat down"], ["wer"])
    assert wer == {"wer": pytest.approx(0.25), "n": 1}
    pytest.importorskip("sacrebleu")
    bleu = score(REFS, REFS, ["bleu"])
    assert bleu["bleu"] == pytest.approx(100.0) and bleu["n"] == 3
    assert score(PREDS, REFS, ["bleu"])["bleu"] < 100.0


def test_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="unknown scorer"):
        score(PREDS, REFS, ["nope"])


def test_misnamed_scorer_is_refused_naming_module_and_function():
    with pytest.raises(ValueError, match="no function 'shape_attributes' in module 'mm.world.scoring'"):
        check_scorers(["exact_match", "mm.world.scoring:shape_attributes"])
    with pytest.raises(ValueError, match="no function 'x' in module 'mm.no_such_module'"):
        check_scorers(["mm.no_such_module:x"])
    with pytest.raises(ValueError, match="scorers: unknown scorer 'nope'"):
        check_scorers(["nope"])
