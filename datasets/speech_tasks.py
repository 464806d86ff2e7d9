"""The speech stage's rows per sample: which task a clip trains (ASR or speech translation, AST) and which audio
condition it is heard under, both drawn from (seed, the sample's stream `position`), so that a sample gets the
same row in every run, with any number of processes and DataLoader workers, and a fresh draw each epoch (the
position grows over the epochs).

- Task: with probability `ast_fraction` a row is a translation row: the clip's audio, the AST prompt and, as the
  target, the record's `spanish` field (its translation); the row then has the layout of the text corpus's
  parallel line `{english} {AST prompt}{spanish}` with the speech in the English sentence's place, as ASR rows
  have the layout of its repeat lines. The CTC target of a translation row stays the English transcript (the
  words the audio holds): the CTC head learns what is said whatever the text task is.
- Condition: with probability `condition_prob` a clip is heard under one of `conditions` (names of
  `mm.datasets.audio_conditions.CONDITIONS`, chosen uniformly), applied to the decoded waveform with a seed
  from the position, then featurised. The decoder keeps the waveform beside the clean features
  (`audio_decoder(keep_wave=True)`); a feature cache holds the clean sample and the condition is applied at
  each draw, so cached and uncached runs give the same rows.

- Spoken questions: a record with an `answer` (a question manifest, `mm.world.speech`'s `questions_*` splits) is
  always a spoken-question row: its `context` (the conversation so far, e.g. the scene "a large red circle.")
  before the speech, no prompt after it (`DIALOGUE_PROMPT`, the paper's spoken dialogue) and the answer as the
  target: the layout of the corpus's question lines `{scene} {question} {answer}`; the CTC target is the
  question as spoken.

A record marked `asr_only` (e.g. scrambled words, which have no translation) is never a translation row.

With `ast_fraction=0`, no conditions and no question records every sample passes through unchanged (the ASR
rows of before).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mm.prompts import DIALOGUE_PROMPT

from .audio import AudioFeatures, SpeechCollator
from .audio_conditions import CONDITIONS, apply_condition
from .seeding import derive_seed
from .skips import BadSample

__all__ = ["SpeechBatches", "SpeechRows", "is_question", "unit_draw"]

log = logging.getLogger("mm.datasets.speech_tasks")


def unit_draw(*parts: object) -> float:
    """A number in [0, 1) fixed by the parts (`derive_seed`'s 53 low bits)."""
    return (derive_seed(*parts) & ((1 << 53) - 1)) / float(1 << 53)


def is_question(meta: Any) -> bool:
    """Whether a record's metadata makes it a spoken question (it has a string `answer`)."""
    return isinstance(meta, dict) and isinstance(meta.get("answer"), str)


@dataclass
class SpeechRows:
    """Per-sample task and condition (see the module doc); `__call__` maps a sample to its row's sample."""

    ast_fraction: float = 0.0
    ast_prompt: str = ""
    conditions: Sequence[str] = field(default_factory=tuple)
    condition_prob: float = 0.0
    features: AudioFeatures | None = (
        None  # needed with conditions: the waveform's features after the condition
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ast_fraction <= 1.0:
            raise ValueError(f"data.ast_fraction must be in [0, 1], got {self.ast_fraction}")
        if self.ast_fraction > 0 and not self.ast_prompt.strip():
            raise ValueError("speech translation rows need a non-empty AST prompt")
        if not 0.0 <= self.condition_prob <= 1.0:
            raise ValueError(f"data.condition_prob must be in [0, 1], got {self.condition_prob}")
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"data.conditions: unknown {unknown}; known: {', '.join(CONDITIONS)}")
        self.conditions = tuple(self.conditions)
        if self.conditions and self.features is None:
            raise ValueError("audio conditions in training need the feature transform")

    @property
    def active(self) -> bool:
        """Whether any sample can change (else the rows are the plain ASR rows)."""
        return self.ast_fraction > 0 or bool(self.conditions and self.condition_prob > 0)

    def task(self, position: int) -> str:
        """ "ast" or "asr" for the sample at a stream position."""
        if self.ast_fraction <= 0:
            return "asr"
        return "ast" if unit_draw("mm.speech.task", self.seed, position) < self.ast_fraction else "asr"

    def condition(self, position: int) -> str | None:
        """The audio condition of the sample at a stream position (None: as decoded)."""
        if not self.conditions or self.condition_prob <= 0:
            return None
        if unit_draw("mm.speech.condition", self.seed, position) >= self.condition_prob:
            return None
        k = derive_seed("mm.speech.condition.which", self.seed, position) % len(self.conditions)
        return self.conditions[k]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample of its row: a spoken question's context and answer; translation target and prompt, and
        conditioned features, where drawn."""
        meta = sample.get("meta")
        question = is_question(meta)
        if not question and (not self.active or "position" not in sample):
            return sample
        out = dict(sample)
        if question:
            context = meta.get("context")
            out.update(
                text=meta["answer"].strip(),
                prompt=DIALOGUE_PROMPT,
                context=context.strip() if isinstance(context, str) else "",
                ctc_text=sample["text"],
            )
        if "position" not in sample:
            return out
        position = int(sample["position"])
        asr_only = isinstance(meta, dict) and bool(meta.get("asr_only"))
        if not question and not asr_only and self.task(position) == "ast":
            meta = sample.get("meta")
            spanish = meta.get("spanish") if isinstance(meta, dict) else None
            if not isinstance(spanish, str) or not spanish.strip():
                raise ValueError(
                    f"{sample.get('source', 'a training clip')}: no 'spanish' string in its record, but "
                    f"data.ast_fraction={self.ast_fraction} makes translation rows (each training record "
                    "needs its Spanish translation under 'spanish')"
                )
            out.update(text=spanish.strip(), prompt=self.ast_prompt, ctc_text=sample["text"])
        name = self.condition(position)
        if name is not None:
            if "wave" not in sample:
                raise ValueError("audio conditions need the decoded waveform (audio_decoder(keep_wave=True))")
            wave = apply_condition(
                name, sample["wave"], seed=derive_seed("mm.speech.noise", self.seed, position)
            )
            try:
                out["features"] = self.features(wave)  # type: ignore[misc]
            except BadSample as e:  # e.g. a level the silence check refuses: the clean features, logged
                log.warning("%s under %s: %s; trained clean", sample.get("source"), name, e)
            out["condition"] = name
        return out


class SpeechBatches:
    """The stage's collate: each sample through `SpeechRows`, then the `SpeechCollator` (picklable, for
    DataLoader workers)."""

    def __init__(self, rows: SpeechRows, collator: SpeechCollator) -> None:
        self.rows, self.collator = rows, collator

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate one training batch."""
        return self.collator([self.rows(s) for s in samples])
