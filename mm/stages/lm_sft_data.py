"""The `lm-sft` stage's training rows and its text-QA evaluation.

Rows (`SFTRows`): chat conversations of JSONL manifests (`mm.datasets.chat`, labels on the assistant's tokens
only) interleaved with plain corpus documents (labels on every token) at a fixed fraction, addressed by
position like every training stream (`mm.datasets.loader`): position g is a plain row exactly when
floor((g + 1) f) > floor(g f), with f the text fraction as a fraction of small integers, so every global batch
holds its share of plain rows and the row at g is a pure function of (data, seed, g). The k-th chat row (k = g -
floor(g f)) is entry k mod N of epoch k // N's seeded permutation of all conversations, likewise the plain
rows; a conversation that cannot be used (a media item: text-only manifests have no decoders; longer than
`max_len`) is skipped and counted, its place taken by the next one of the stream.

Text QA (`answer_questions`): each held-out conversation up to its last assistant turn is the prompt (with the
assistant header), the greedy answer up to `<|eot_id|>` is compared with that turn after `mm.models.chat.normalize_answer`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from mm.datasets.chat import ChatDataset
from mm.datasets.chat_collate import ChatCollator
from mm.datasets.loader import add_counts
from mm.datasets.seeding import derive_seed
from mm.datasets.text import IGNORE_INDEX, read_documents
from mm.models.chat import answer_conversations
from mm.stages.chat_eval import conversations, family_report

__all__ = ["CollateRows", "SFTRows", "answer_questions", "plain_row", "text_fraction"]

MAX_DENOMINATOR = 1000  # the text fraction is used as a fraction p/q with q at most this


def text_fraction(value: float) -> Fraction:
    """The share of plain rows as an exact fraction (ValueError unless 0 <= value < 1)."""
    if not 0 <= value < 1:
        raise ValueError(f"data.text_fraction={value}; must be in [0, 1) (chat rows must remain)")
    return Fraction(value).limit_denominator(MAX_DENOMINATOR)


def plain_row(ids: Sequence[int], bos: int, eos: int, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of a plain document: bos + ids + eos cut to `max_len` tokens, every next token a label."""
    row = [bos, *ids, eos][:max_len]
    return row, [*row[1:], IGNORE_INDEX]


class CollateRows:
    """Rows -> `tokens`, `labels`, `attention_mask` (right-padded to the batch's longest row)."""

    def __init__(self, tokenizer: Any) -> None:
        self.collator = ChatCollator(tokenizer)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate a batch."""
        return self.collator.text([s["ids"] for s in samples], [s["labels"] for s in samples])


class SFTRows:
    """Position-addressed rows of chat manifests mixed with plain documents (module docstring); `sample(g)` ->
    {"ids", "labels", "kind"}, `stats()` the counts of this process (or DataLoader worker)."""

    def __init__(
        self,
        manifests: Sequence[str],
        texts: Sequence[str],
        tokenizer: Any,
        *,
        fraction: float,
        seed: int,
        max_len: int,
        doc_split: str = "line",
        max_bad_fraction: float = 0.05,
    ) -> None:
        self.tok, self.seed, self.max_len = tokenizer, seed, max_len
        self.fraction = text_fraction(fraction)
        self.chats = [
            ChatDataset(m, tokenizer, {}, max_bad_fraction=max_bad_fraction, max_len=max_len)
            for m in manifests
        ]
        self.offsets = [0]
        for d in self.chats:
            self.offsets.append(self.offsets[-1] + len(d))
        self.docs = [doc for p in texts for doc in read_documents(p, doc_split=doc_split)]
        if self.fraction and not self.docs:
            raise ValueError(f"data.text_fraction={fraction} but `data.text` names no documents")
        self._orders: dict[tuple[str, int], list[int]] = {}
        self.counts = {"chat_rows": 0, "text_rows": 0}

    def n_plain(self, g: int) -> int:
        """Plain rows among positions [0, g)."""
        return g * self.fraction.numerator // self.fraction.denominator

    def is_plain(self, g: int) -> bool:
        """Whether position g holds a plain document."""
        return self.n_plain(g + 1) > self.n_plain(g)

    def _order(self, kind: str, epoch: int, n: int) -> list[int]:
        key = (kind, epoch)
        if key not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            order = list(range(n))
            random.Random(derive_seed("mm.lm_sft", kind, self.seed, epoch)).shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def _entry(self, kind: str, k: int, n: int) -> int:
        epoch, i = divmod(k, n)
        return self._order(kind, epoch, n)[i]

    def sample(self, g: int) -> dict[str, Any]:
        """The row at global position g."""
        if g < 0:
            raise ValueError(f"positions start at 0, got {g}")
        if self.is_plain(g):
            doc = self.docs[self._entry("text", self.n_plain(g), len(self.docs))]
            ids, labels = plain_row(self.tok.encode(doc), self.tok.bos_id, self.tok.eos_id, self.max_len)
            self.counts["text_rows"] += 1
            return {"ids": ids, "labels": labels, "kind": "text"}
        k, n = g - self.n_plain(g), self.offsets[-1]
        for step in range(2 * n + 1):
            j = self._entry("chat", k + step, n)
            d = bisect.bisect_right(self.offsets, j) - 1
            s = self.chats[d].load(j - self.offsets[d])
            if s is not None:
                self.counts["chat_rows"] += 1
                return {"ids": s["ids"], "labels": s["labels"], "kind": "chat"}
        raise ValueError(f"no usable conversation in two passes over {[str(d.manifest) for d in self.chats]}")

    def global_position(self, state: dict[str, Any]) -> int:
        """The position a saved state names ({"position": P}; {} is 0)."""
        if state and "position" not in state:
            raise ValueError(f"data state {state} is not a position of the lm-sft rows")
        return int(state.get("position", 0)) if state else 0

    def stats(self) -> dict[str, Any]:
        """Rows read per kind and the conversations tried and skipped (per reason, with examples)."""
        out: dict[str, Any] = dict(self.counts)
        for d in self.chats:
            out = add_counts(out, d.stats.as_dict())
        return out


@torch.no_grad()
def answer_questions(
    model: torch.nn.Module,
    tok: Any,
    manifest: str | Path,
    *,
    limit: int,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    n_examples: int = 8,
) -> dict[str, Any]:
    """Greedy answers to `limit` conversations of a text-QA manifest (spread over it; all when it holds no
    more), through the chat evaluation (`mm.stages.chat_eval`): exact match after `normalize_answer`, per
    question family, and the first few (question, answer, reference)."""
    samples, refs, families, questions, _ = conversations(manifest, tok, {}, limit)
    if not samples:
        raise ValueError(f"held-out chat manifest {manifest} has no usable conversations")
    preds = answer_conversations(model, tok, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    report = family_report(preds, refs, families)
    return {
        "exact_match": report["accuracy"],
        "n": report["n"],
        "per_family": report["by_family"],
        "examples": [
            {"question": q, "answer": p, "reference": r}
            for q, p, r in list(zip(questions, preds, refs, strict=True))[:n_examples]
        ],
    }
