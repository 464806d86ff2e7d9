"""The speech stage's held-out figures beyond the WER (`mm.stages.evaluation.evaluate_wer`): speech translation
(BLEU with sacrebleu and exact match of the Spanish, against each record's `spanish` field) and the WER under each
audio condition of `mm.datasets.audio_conditions` (the condition applied to clip i with seed i, so every run
hears the same audio), and the accuracy of the answers to spoken questions (records with `context` and
`answer`: the answer's exact match, overall and per question `family`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mm.datasets.audio import AudioFeatures, decode_audio
from mm.datasets.audio_conditions import CONDITIONS, apply_condition
from mm.datasets.media import read_manifest
from mm.datasets.skips import BadSample
from mm.datasets.speech_tasks import is_question
from mm.lm import Tokenizer
from mm.models.speech import SpeechLM, answer_features, transcribe_features, translate_features
from mm.stages.evaluation import bleu_report, load_audio_clips, normalize_text, word_error_rate

__all__ = [
    "evaluate_conditions",
    "evaluate_questions",
    "evaluate_translation",
    "is_question_manifest",
    "translation_report",
]

log = logging.getLogger("mm.stages.speech_eval")


def translation_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, 0-100) and exact match (after `normalize_text`: case and punctuation aside)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} translations for {len(refs)} references")
    em = sum(normalize_text(p) == normalize_text(r) for p, r in zip(preds, refs, strict=True))
    return {**bleu_report(preds, refs), "exact_match": em / max(1, len(refs))}


def evaluate_translation(
    model: SpeechLM, tok: Tokenizer, features: AudioFeatures, manifest: str, n: int, prompt: str
) -> dict[str, Any]:
    """Translate the first `n` usable clips of a manifest (AST `prompt`); BLEU and exact match against `spanish`."""
    recs = read_manifest(manifest, "audio")[:n]
    missing = [str(r.media) for r in recs if not isinstance(r.meta.get("spanish"), str)]
    if missing:
        raise ValueError(
            f"{manifest}: {len(missing)} records have no 'spanish' string (first: {missing[0]}); speech "
            "translation is evaluated against each record's Spanish translation"
        )
    feats, kept, skipped = load_audio_clips(recs, features)
    refs = [r.meta["spanish"].strip() for r in kept]
    hyps = translate_features(model, tok, feats, prompt=prompt)
    res = translation_report(hyps, refs)
    res["skipped"] = skipped
    res["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]
    return res


def evaluate_conditions(
    model: SpeechLM,
    tok: Tokenizer,
    features: AudioFeatures,
    manifest: str,
    n: int,
    prompt: str,
    conditions: Sequence[str],
) -> dict[str, float]:
    """WER of the first `n` usable clips of a manifest under each condition (clip i with seed i)."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"eval_conditions: unknown {unknown}; known: {', '.join(CONDITIONS)}")
    waves, refs = [], []
    for r in read_manifest(manifest, "audio")[:n]:
        try:
            wave = decode_audio(r.media)
            features(wave)  # the clean clip must be usable
        except BadSample as e:
            log.warning("evaluation: skipped %s (%s)", r.media, e)
            continue
        waves.append(wave)
        refs.append(r.text)
    out: dict[str, float] = {}
    for name in conditions:
        feats, kept = [], []
        for i, (wave, ref) in enumerate(zip(waves, refs, strict=True)):
            try:
                feats.append(features(apply_condition(name, wave, seed=i)))
            except BadSample as e:  # counted as an empty transcript: the audio was lost
                log.warning("evaluation: clip %d under %s unusable (%s)", i, name, e)
                feats.append(None)
            kept.append(ref)
        usable = [f for f in feats if f is not None]
        texts = iter(transcribe_features(model, tok, usable, prompt=prompt))
        hyps = [next(texts) if f is not None else "" for f in feats]
        out[name] = word_error_rate(kept, hyps)
    return out


def is_question_manifest(manifest: str) -> bool:
    """Whether a JSONL manifest holds spoken questions (every record has an `answer`; shards: no)."""
    if not manifest.endswith(".jsonl"):
        return False
    recs = read_manifest(manifest, "audio")
    return bool(recs) and all(is_question(r.meta) for r in recs)


def evaluate_questions(
    model: SpeechLM, tok: Tokenizer, features: AudioFeatures, manifest: str, n: int
) -> dict[str, Any]:
    """Answer the first `n` usable spoken questions of a manifest, each after its record's `context`, with no
    prompt; accuracy (exact match after `normalize_text`) overall and per `family`."""
    recs = read_manifest(manifest, "audio")[:n]
    bad = [str(r.media) for r in recs if not is_question(r.meta)]
    if bad:
        raise ValueError(
            f"{manifest}: {len(bad)} records have no 'answer' string (first: {bad[0]}); spoken questions are "
            "scored against each record's answer"
        )
    feats, kept, skipped = load_audio_clips(recs, features)
    contexts = [str(r.meta.get("context") or "") for r in kept]
    hyps = answer_features(model, tok, feats, contexts)
    right = [normalize_text(h) == normalize_text(r.meta["answer"]) for h, r in zip(hyps, kept, strict=True)]
    by_family: dict[str, list[bool]] = {}
    for ok, r in zip(right, kept, strict=True):
        by_family.setdefault(str(r.meta.get("family", "?")), []).append(ok)
    return {
        "accuracy": sum(right) / max(1, len(right)),
        "n": len(right),
        "skipped": skipped,
        "by_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())},
        "examples": [
            {"context": c, "question": r.text, "answer": r.meta["answer"], "hyp": h}
            for c, r, h in list(zip(contexts, kept, hyps, strict=True))[:5]
        ],
    }
