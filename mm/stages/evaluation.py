"""Held-out evaluation shared by the stages, the demo and the probe: captions (images), descriptions (videos),
word error rate (speech), with pluggable scorers.

A scorer maps (predictions, references) to a dict of figures. `SCORERS` holds the generic ones (`exact_match`,
`wer`, `bleu`); a stage config names its scorers (`scorers: [exact_match, ...]`), and a name `module:function`
(e.g. the demo world's `mm.world.scoring:shapes_attributes`) is imported on first use and registered. The
figures of a stage's scorers are merged in order (a later scorer's key replaces an earlier one's).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mm.datasets.audio import AudioFeatures
from mm.datasets.media import MediaTextDataset, read_manifest
from mm.datasets.skips import BadSample
from mm.datasets.tiling import TileTransform
from mm.datasets.video import VideoCaptionCollator, video_decoder
from mm.lm import Tokenizer
from mm.models.caption import caption_images, load_rgb
from mm.models.multimodal import MultimodalLM
from mm.models.speech import SpeechLM, copy_transcripts, ctc_transcripts, transcribe_features
from mm.models.video import ClipFeatures, describe_clips

log = logging.getLogger("mm.stages.evaluation")


def exact_match_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Exact match, and `attribute_accuracy`: the share of reference words (not a/an/and) matched in place."""
    em = sum(p == r for p, r in zip(preds, refs, strict=True)) / max(1, len(refs))
    correct = total = 0
    for p, r in zip(preds, refs, strict=True):
        pw, rw = p.split(), r.split()
        for i, w in enumerate(rw):
            if w in ("a", "and", "an"):
                continue
            total += 1
            correct += int(i < len(pw) and pw[i] == w)
    return {"exact_match": em, "attribute_accuracy": correct / max(1, total), "n": len(refs)}


def evaluate_captions(
    model: MultimodalLM,
    tok: Tokenizer,
    transform: TileTransform,
    manifests: list[str],
    *,
    limit: int,
    prompt: str,
    max_tiles: int,
    scorers: Sequence[str] = ("exact_match",),
) -> dict[str, Any]:
    """Caption the first `limit` images of each held-out manifest; the figures of `scorers`."""
    res = {}
    for m in manifests:
        recs = read_manifest(m, "image")[:limit]
        images = [load_rgb(r.media) for r in recs]
        preds = caption_images(model, tok, transform, images, prompt=prompt, max_tiles=max_tiles)
        refs = [r.text for r in recs]
        res[Path(m).stem] = {
            **score(preds, refs, scorers),
            "examples": [
                {"image": str(r.media), "text": r.text, "pred": p}
                for r, p in zip(recs[:16], preds, strict=False)
            ],
        }
    return res


def load_clips(
    manifest: str | Path, transform: TileTransform, n_frames: int, limit: int = 0
) -> tuple[list[dict[str, Any]], list[str]]:
    """The first `limit` (0 = all) usable clips of a manifest, tiled, and their captions."""
    ds = MediaTextDataset(manifest, video_decoder(transform, n_frames=n_frames), max_bad_fraction=1.0)
    samples = []
    for i in range(len(ds)):
        if limit and len(samples) == limit:
            break
        sample = ds.load(i)
        if sample is not None:
            samples.append(sample)
    return samples, [s["text"] for s in samples]


def evaluate_videos(
    model: MultimodalLM,
    collator: VideoCaptionCollator,
    transform: TileTransform,
    manifests: list[str],
    n_frames: int,
    limit: int,
    features: ClipFeatures | None = None,
    scorers: Sequence[str] = ("exact_match",),
) -> dict[str, Any]:
    """Describe the first `limit` clips of each held-out manifest; the figures of `scorers`."""
    res = {}
    for m in manifests:
        samples, refs = load_clips(m, transform, n_frames, limit)
        preds = describe_clips(model, collator, samples, features=features)
        res[Path(m).stem] = {
            **score(preds, refs, scorers),
            "examples": [
                {"video": str(s.get("source", "")), "text": r, "pred": p}
                for s, r, p in zip(samples[:8], refs, preds, strict=False)
            ],
        }
    return res


def normalize_text(text: str) -> str:
    """Lower case; anything but letters, digits, apostrophes and whitespace -> space; whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s']|_", " ", text.lower()).split())


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER (jiwer) after `normalize_text` on references and hypotheses."""
    import jiwer

    r = [normalize_text(t) for t in refs]
    h = [normalize_text(t) for t in hyps]
    keep = [i for i, t in enumerate(r) if t]
    return float(jiwer.wer([r[i] for i in keep], [h[i] for i in keep]))


def wer_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Corpus word error rate (`word_error_rate`) of predictions against references."""
    return {"wer": word_error_rate(list(refs), list(preds)), "n": len(refs)}


def bleu_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, one reference per prediction, 0-100)."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score), "n": len(refs)}


Scorer = Callable[[Sequence[str], Sequence[str]], dict[str, Any]]
SCORERS: dict[str, Scorer] = {"exact_match": exact_match_report, "wer": wer_report, "bleu": bleu_report}


def register_scorer(name: str, scorer: Scorer) -> None:
    """Make `scorer` available to stage configs as `name`."""
    SCORERS[name] = scorer


def resolve_scorer(name: str) -> Scorer:
    """The scorer registered as `name`, or `module:function` imported (and registered) on first use."""
    if name not in SCORERS:
        module, sep, attr = name.partition(":")
        if not sep:
            raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}, or module:function")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"scorer {name!r}: no function {attr!r} in module {module!r} ({e})") from None
        if not callable(fn):
            raise ValueError(f"scorer {name!r}: {module}.{attr} is not a function")
        register_scorer(name, fn)
    return SCORERS[name]


def check_scorers(scorers: Sequence[str]) -> None:
    """Refuse, before training, a `scorers:` entry that names no scorer (the message names the entry)."""
    for name in scorers:
        try:
            resolve_scorer(name)
        except ValueError as e:
            raise ValueError(f"scorers: {e}") from None


def score(preds: Sequence[str], refs: Sequence[str], scorers: Sequence[str]) -> dict[str, Any]:
    """The figures of each named scorer, merged in order."""
    res: dict[str, Any] = {}
    for name in scorers:
        res.update(resolve_scorer(name)(preds, refs))
    return res


def load_audio_clips(recs: Sequence[Any], features: AudioFeatures) -> tuple[list[Any], list[Any], int]:
    """The features of the records' clips, the records they came from, and how many were skipped (each logged)."""
    feats, kept, skipped = [], [], 0
    for r in recs:
        try:
            feats.append(features.load(r.media))
        except BadSample as e:
            skipped += 1
            log.warning("evaluation: skipped %s (%s)", r.media, e)
            continue
        kept.append(r)
    return feats, kept, skipped


def evaluate_wer(
    model: SpeechLM, tok: Tokenizer, features: AudioFeatures, manifest: str, n: int, prompt: str
) -> dict[str, Any]:
    """Transcribe the first `n` usable clips of a manifest; WER overall and per voice (when recorded)."""
    feats, kept, skipped = load_audio_clips(read_manifest(manifest, "audio")[:n], features)
    refs, voices = [r.text for r in kept], [r.meta.get("voice") for r in kept]
    hyps = transcribe_features(model, tok, feats, prompt=prompt)
    res: dict[str, Any] = {"wer": word_error_rate(refs, hyps), "n": len(refs), "skipped": skipped}
    res["exact_match"] = sum(normalize_text(a) == normalize_text(b) for a, b in zip(refs, hyps)) / max(
        1, len(refs)
    )
    if any(v is not None for v in voices):
        per = {}
        for v in sorted({v for v in voices if v is not None}):
            idx = [i for i, u in enumerate(voices) if u == v]
            per[v] = word_error_rate([refs[i] for i in idx], [hyps[i] for i in idx])
        res["wer_per_voice"] = per
    res["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]
    if model.speech_adapter.ctc_blank is not None:  # what the audio side alone recognises (no LM)
        res["ctc_wer"] = word_error_rate(refs, ctc_transcripts(model, tok, feats))
    res["lm_copy_wer"] = word_error_rate(refs, copy_transcripts(model.lm, tok, refs, prompt))
    return res
