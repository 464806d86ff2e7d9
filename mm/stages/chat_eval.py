"""Held-out evaluation of chat models: visual question answering by question family (the manifest's `family`
field), exact match after normalisation (`mm.models.chat.normalize_answer`), with examples per family.

Each held-out conversation is answered from everything before its last assistant turn; that turn is the
reference. Conversations whose media cannot be read are skipped and counted, as in training.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mm.datasets.chat import read_chat_manifest
from mm.datasets.media import MediaDecoder
from mm.datasets.skips import BadSample
from mm.lm import Tokenizer
from mm.models.chat import answer_conversations, normalize_answer, prompt_sample
from mm.models.multimodal import MultimodalLM

log = logging.getLogger("mm.stages.chat_eval")

__all__ = ["evaluate_chat", "family_report"]


def family_report(
    preds: Sequence[str], refs: Sequence[str], families: Sequence[str], *, examples: int = 2
) -> dict[str, Any]:
    """Accuracy overall and per family (normalised exact match), with a few examples per family."""
    hits: dict[str, list[int]] = defaultdict(list)
    shown: dict[str, list[dict[str, str]]] = defaultdict(list)
    for p, r, f in zip(preds, refs, families, strict=True):
        ok = normalize_answer(p) == normalize_answer(r)
        hits[f].append(int(ok))
        if len(shown[f]) < examples:
            shown[f].append({"answer": p, "reference": r})
    n = len(refs)
    return {
        "accuracy": sum(sum(h) for h in hits.values()) / max(1, n),
        "n": n,
        "by_family": {f: sum(h) / len(h) for f, h in sorted(hits.items())},
        "n_by_family": {f: len(h) for f, h in sorted(hits.items())},
        "examples": dict(sorted(shown.items())),
    }


def family_key(meta: Mapping[str, Any]) -> str:
    """The family a conversation is reported under: its `family`, marked `(video)` for a question about a
    clip that is also asked about images (colour, shape, describe)."""
    family = str(meta.get("family", "all"))
    return f"{family} (video)" if meta.get("media") == "video" and family != "motion" else family


def conversations(
    manifest: str | Path, tok: Tokenizer, decoders: Mapping[str, MediaDecoder], limit: int
) -> tuple[list[dict[str, Any]], list[str], list[str], list[str], dict[str, int]]:
    """`limit` conversations of a manifest (all with 0; else spread evenly over the file) as prompts, with
    their reference answers, families and questions, and the skips by reason."""
    samples, refs, families, questions = [], [], [], []
    skipped: dict[str, int] = defaultdict(int)
    records = read_chat_manifest(manifest)
    if limit and limit < len(records):  # spread over the file (held-out files are written family by family)
        records = [records[i * len(records) // limit] for i in range(limit)]
    for rec in records:
        last = max(i for i, m in enumerate(rec.messages) if m["role"] == "assistant")
        try:
            samples.append(prompt_sample(tok, rec.messages[:last], decoders))
        except (BadSample, ValueError) as e:
            skipped[getattr(e, "reason", "unreadable")] += 1
            log.warning("%s: skipped in evaluation: %s", rec.source, e)
            continue
        refs.append("".join(x["text"] for x in rec.messages[last]["content"]))
        families.append(family_key(rec.meta))
        user = rec.messages[last - 1]["content"] if last else []
        questions.append(" ".join(x["text"] for x in user if x["type"] == "text"))
    return samples, refs, families, questions, dict(skipped)


def evaluate_chat(
    model: MultimodalLM,
    tok: Tokenizer,
    decoders: Mapping[str, MediaDecoder],
    manifests: Sequence[str],
    *,
    limit: int,
    merge: int = 1,
    max_tiles: int = 4,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Answer `limit` conversations (spread over the file; 0 = all) of each held-out chat manifest; accuracy
    per family."""
    res = {}
    for m in manifests:
        samples, refs, families, questions, skipped = conversations(m, tok, decoders, limit)
        preds = answer_conversations(
            model, tok, samples, merge=merge, max_tiles=max_tiles, max_new_tokens=max_new_tokens
        )
        report = family_report(preds, refs, families)
        for f, shown in report["examples"].items():  # the question with each example
            k = [i for i, fam in enumerate(families) if fam == f][: len(shown)]
            for e, i in zip(shown, k):
                e["question"] = questions[i]
        res[Path(m).stem] = {**report, "skipped": skipped}
    return res
