"""One pass of `mm probe` over captioned images: the image encoder's features before and after projection, the
image cross-attention blocks' contribution at each caption word (teacher-forced), and the model's own
predictions of those words."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.app.probe_targets import ATTRS, IGNORE, TARGETS, VOCAB, caption_targets
from mm.models.media import MediaInput

log = logging.getLogger("mm.app.probe")


class XAttnTap:
    """Context manager recording, on every forward, each image cross-attention block's output minus input."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = list(model.image_xattn.values())
        self.deltas: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self.deltas.append(output - args[0])

    def __enter__(self) -> XAttnTap:
        self._handles = [blk.register_forward_hook(self._hook) for blk in self.blocks]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pop_sum(self) -> torch.Tensor:
        """The blocks' contributions since the last call, summed (B, T, D); then cleared."""
        if not self.deltas:
            raise RuntimeError("no image cross-attention block ran (no media given?)")
        total = torch.stack(self.deltas).sum(0)
        self.deltas = []
        return total


def word_spans(tok: Any, tail: str, text: str) -> dict[int, tuple[int, int]] | None:
    """Token span [start, end) of each word of a caption within `encode(tail + text)`; None if BPE merges
    across a word boundary (then the words cannot be located). Word 0 ("a") is not located."""
    words = text.split()
    full = tok.encode(tail + text)
    spans: dict[int, tuple[int, int]] = {}
    prev = tok.encode(tail + words[0])
    if full[: len(prev)] != prev:
        return None
    for i in range(1, len(words)):
        cur = tok.encode(tail + " ".join(words[: i + 1]))
        if cur[: len(prev)] != prev or full[: len(cur)] != cur:
            return None
        spans[i] = (len(prev), len(cur))
        prev = cur
    return spans


@dataclass
class Collected:
    """What one pass over a set of images gives: token sets, per-word vectors, labels, model predictions."""

    features: torch.Tensor  # (N, M, F) pre-projection encoder features, zero-padded
    projected: torch.Tensor  # (N, M, D) projected media tokens
    mask: torch.Tensor  # (N, M) real tokens
    words: torch.Tensor  # (N, K, D) summed xattn contribution at the position predicting each target word
    labels: torch.Tensor  # (N, K)
    next_token: torch.Tensor  # (N, K) teacher-forced predicted class (the true one only if the whole word is)


# Caption word index of each target (slot 1: words 1-3, slot 2: words 6-8; count: the token after word 3).
_WORD_OF_TARGET: tuple[int, ...] = (1, 2, 3, 6, 7, 8)


def _first_token_classes(tok: Any) -> list[dict[int, int]]:
    """Per probed target: the first token id of each class's word (as it follows a word) -> its class."""
    kinds = []
    for attr in ATTRS:
        table: dict[int, int] = {}
        for c, word in enumerate(VOCAB[attr]):
            table.setdefault(tok.encode(" " + word)[0], c)
        kinds.append(table)
    count = {tok.eos_id: 0, tok.encode(" and")[0]: 1}
    return [*kinds, *kinds, count]


class _ProjectionTap:
    """Context manager recording the image encoder's projection input (features) and output (media tokens)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.project = encoder.project
        self.captured: dict[str, torch.Tensor] = {}
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self.captured["features"], self.captured["projected"] = args[0], output

    def __enter__(self) -> _ProjectionTap:
        self._handle = self.project.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def pop(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, M, F) and projected tokens (B, M, D) of the last encoding; then cleared."""
        if "features" not in self.captured:
            raise RuntimeError("the image encoder did not call its projection (cannot read features)")
        f, p = self.captured.pop("features"), self.captured.pop("projected")
        return f.reshape(batch, -1, f.shape[-1]), p.reshape(batch, -1, p.shape[-1])


class _CaptionReader:
    """Where each target's word sits in a teacher-forced caption, and what the model predicted there."""

    def __init__(self, tok: Any, collator: Any, prompt: str) -> None:
        self.tok, self.collator = tok, collator
        self.start = len(collator.prefix)
        self.tail = prompt[len(prompt.rstrip()) :]  # trailing whitespace: tokenized with the caption
        self.classes = _first_token_classes(tok)
        self.skipped = 0  # captions whose words the tokenizer merges across spaces

    def _located(self, spans: dict[int, tuple[int, int]], text: str) -> list[tuple[Any, Any]]:
        """Token span of each target's word in the caption ((None, None) where the caption has none)."""
        # count: the position after the first object predicts " and" (two) or the end (one)
        after = spans[4][0] if 4 in spans else len(self.collator.caption_ids(text))
        return [spans.get(i, (None, None)) for i in _WORD_OF_TARGET] + [(after, after + 1)]

    def read(
        self, texts: Sequence[str], tokens: torch.Tensor, delta: torch.Tensor, top: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per caption: the xattn contribution (B, K, D) at the position predicting each target's word, the
        labels (B, K) and the predicted classes (B, K) (the true one only if the whole word is right)."""
        B = len(texts)
        w = torch.zeros(B, len(TARGETS), delta.shape[-1])
        y = torch.full((B, len(TARGETS)), IGNORE, dtype=torch.long)
        pr = torch.full((B, len(TARGETS)), IGNORE, dtype=torch.long)
        start = self.start
        for b, text in enumerate(texts):
            spans = word_spans(self.tok, self.tail, text)
            if spans is None:
                self.skipped += 1
                continue
            y[b] = torch.tensor(caption_targets(text))
            for k, (a, e) in enumerate(self._located(spans, text)):
                if a is None:
                    continue
                w[b, k] = delta[b, start + a - 1]
                guess = self.classes[k].get(int(top[b, start + a - 1]), IGNORE)
                whole = bool(
                    (top[b, start + a - 1 : start + e - 1] == tokens[b, start + a : start + e]).all()
                )
                pr[b, k] = guess if guess != int(y[b, k]) or whole else IGNORE
        return w, y, pr


def _collate_images(records: Sequence[Any], transform: Any, collator: Any) -> dict[str, torch.Tensor]:
    """A training-style batch (tiles and teacher-forced caption) of captioned image records."""
    from mm.models.caption import load_rgb

    samples = []
    for r in records:
        tiled = transform(load_rgb(r.media))
        samples.append({"tiles": tiled.tiles, "aspect_ratio_id": tiled.aspect_ratio_id, "text": r.text})
    return collator(samples)


def _forward(
    model: nn.Module, batch: dict[str, torch.Tensor], proj: _ProjectionTap, tap: XAttnTap
) -> tuple[torch.Tensor, ...]:
    """One batch through encoder and model: features, projected tokens, their real-token mask, the xattn
    contribution (B, T, D) and the argmax next token at every position."""
    B = len(batch["tokens"])
    ctx = model.encode_media(batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    f, p = proj.pop(B)
    per_tile = model.image_encoder.num_tokens_per_tile
    m = batch["aspect_ratio_mask"].bool().repeat_interleave(per_tile, dim=-1).reshape(B, -1)
    logits = model(batch["tokens"], {"image": MediaInput(ctx, batch["cross_attention_mask"])})
    return f, p, m, tap.pop_sum(), logits.argmax(-1)


def _concat(parts: dict[str, list[torch.Tensor]]) -> Collected:
    """The batches' tensors concatenated, token sets (features, projected, mask) zero-padded to the longest."""
    M = max(x.shape[1] for x in parts["features"])

    def padded(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.pad(x, (0, 0) * (x.dim() - 2) + (0, M - x.shape[1])) for x in xs])

    return Collected(
        features=padded(parts["features"]),
        projected=padded(parts["projected"]),
        mask=padded(parts["mask"]),
        words=torch.cat(parts["words"]),
        labels=torch.cat(parts["labels"]),
        next_token=torch.cat(parts["next_token"]),
    )


@torch.no_grad()
def collect(
    model: nn.Module,
    tok: Any,
    transform: Any,
    meta: dict[str, Any],
    records: Sequence[Any],
    *,
    batch_size: int = 64,
    what: str = "images",
) -> Collected:
    """Encoder features, projected tokens, xattn contributions and teacher-forced predictions of captioned
    images (one pass of encoder and model per batch)."""
    from mm.datasets.collate import ImageCaptionCollator

    model.eval()
    collator = ImageCaptionCollator(tok, prompt=meta["prompt"], max_tiles=meta["max_tiles"])
    reader = _CaptionReader(tok, collator, meta["prompt"])
    names = ("features", "projected", "mask", "words", "labels", "next_token")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    t0 = time.perf_counter()
    with _ProjectionTap(model.image_encoder) as proj, XAttnTap(model) as tap:
        for s in range(0, len(records), batch_size):
            recs = records[s : s + batch_size]
            batch = _collate_images(recs, transform, collator)
            f, p, m, delta, top = _forward(model, batch, proj, tap)
            w, y, pr = reader.read([r.text for r in recs], batch["tokens"], delta, top)
            for k, x in zip(names, (f, p, m, w, y, pr)):
                parts[k].append(x)
            done = min(s + batch_size, len(records))
            log.info("%s: %d/%d (%.0fs)", what, done, len(records), time.perf_counter() - t0)
    if reader.skipped:
        log.warning(
            "%s: %d captions whose words the tokenizer merges across spaces were skipped",
            what,
            reader.skipped,
        )
    return _concat(parts)
