"""Stage-by-stage probe of the image path (`mm probe`): where image information is lost on its way from the
image encoder into the frozen LM's captions, in the shapes world.

Targets per image, read from its caption (`caption_targets`): size, colour and shape of object slot 1 and slot
2 (left to right; slot 2 only for two-object images) and `count` (one or two objects); probes train on training
images and are scored on held-out ones. `order` (left-right order) is derived the same way at every point:
over two-object images with two different colours whose two slot colours the point names correctly as a set,
the fraction that names them in the right order, left first (so 0.5 is chance; `n_scored` gives the count).

Probe points, in the order the information flows:

1. `encoder`: the image encoder's pre-projection features (multi-layer, `forward_features`), frozen. An
   attention-pooling probe (`AttentionPoolProbe`: one learned query per target, softmax attention over the
   image's real tokens, a linear classifier on the pooled vector) trained with AdamW for a fixed number of steps.
2. `projected`: the same probe on the projected media tokens (LM width: what the cross-attention reads).
3. `xattn`: captions teacher-forced through the model; at the position whose next-token prediction is a caption
   word, the summed contribution of the image cross-attention blocks to the residual stream (output minus input
   of each block). A linear probe per attribute kind (size, colour, shape: both slots share one; count at the
   position that predicts " and" or the end of text). `next_token` is the model's own teacher-forced accuracy
   on those words (all of a word's tokens right): what the caption loss sees; its order uses the colour words
   the model predicts at the two colour positions.
4. `caption`: the model's greedy captions (as `mm caption`), read into the same targets by slot.
5. `lm_text`: the frozen LM alone, told the caption in text in the corpus's repeat-line format
   (`<bos>{caption}. Repeat after me in English: {caption}.`), greedy: can the LM write every caption of the
   world? `lm_text_no_period` gives the caption without the final full stop (and accepts one in the answer).

`chance` is the held-out accuracy of always answering the training set's most frequent class (order: 0.5).
`slot1_by_count` splits slot 1 into one-object images (is the attribute seen at all?) and two-object images
(is it bound to the left object?).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.datasets.shapes import ASR_PROMPT, COLORS, SHAPES, SIZES, parse_caption

log = logging.getLogger("mm.app.probe")

ATTRS: tuple[str, ...] = ("size", "colour", "shape")
VOCAB: dict[str, tuple[str, ...]] = {"size": SIZES, "colour": tuple(COLORS), "shape": SHAPES}
TARGETS: tuple[str, ...] = (
    "size_1",
    "colour_1",
    "shape_1",
    "size_2",
    "colour_2",
    "shape_2",
    "count",
    "order",
)
# Classes of the probed targets (all but `order`, which is derived from the colour slots).
N_CLASSES: tuple[int, ...] = (*(len(VOCAB[a]) for a in ATTRS), *(len(VOCAB[a]) for a in ATTRS), 2)
POINTS: tuple[str, ...] = ("chance", "encoder", "projected", "xattn", "next_token", "caption", "lm_text")
IGNORE = -1  # label of a target an image does not have


# ---------------------------------------------------------------------------------------------- targets
def targets_of_objects(objects: Sequence[tuple[str, str, str]]) -> list[int]:
    """Labels (one per `TARGETS` entry, `IGNORE` where undefined) of objects given left to right.

    `order` holds 1 where the order is scored (two objects of different colours), else `IGNORE`; its accuracy
    is derived from the two colour slots (`score`)."""
    y = [IGNORE] * len(TARGETS)
    for slot, obj in enumerate(objects[:2]):
        for j, attr in enumerate(ATTRS):
            y[3 * slot + j] = VOCAB[attr].index(obj[j])
    y[6] = len(objects) - 1
    if len(objects) == 2 and objects[0][1] != objects[1][1]:
        y[7] = 1
    return y


def caption_targets(text: str) -> list[int]:
    """Labels of a shapes-world caption (see `targets_of_objects`); ValueError if it is not one."""
    objects = parse_caption(text)
    if not objects or len(objects) > 2:
        raise ValueError(f"{text!r} is not a caption of the shapes world (1-2 objects)")
    return targets_of_objects(objects)


def predicted_targets(text: str) -> list[int]:
    """A generated caption read into targets by slot (`IGNORE`, i.e. wrong, where it names nothing there)."""
    objects = parse_caption(text.strip().removesuffix(".")) or []
    y = targets_of_objects(objects[:2]) if objects else [IGNORE] * len(TARGETS)
    y[6] = len(objects) - 1 if objects else IGNORE
    return y


def score(pred: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, float | None], dict[str, int]]:
    """Accuracy and count per target over the rows where it is defined (accuracy None where none is).

    `pred` (N, K) holds predicted classes (`IGNORE` = none, always wrong); its order column is unused: order
    is scored on rows whose two predicted colours are the true two, as the fraction with colour 1 right."""
    acc: dict[str, float | None] = {}
    n: dict[str, int] = {}
    for k, name in enumerate(TARGETS):
        keep = y[:, k] != IGNORE
        if name == "order":
            p1, p2, y1, y2 = pred[:, 1], pred[:, 4], y[:, 1], y[:, 4]
            keep = keep & (((p1 == y1) & (p2 == y2)) | ((p1 == y2) & (p2 == y1)))
            right = p1 == y1
        else:
            right = pred[:, k] == y[:, k]
        n[name] = int(keep.sum())
        acc[name] = float(right[keep].float().mean()) if keep.any() else None
    return acc, n


def slot1_by_count(pred: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float | None]]:
    """Slot-1 accuracies on one-object and on two-object images apart (detection versus binding)."""
    out = {}
    for name, rows in (("one", y[:, 6] == 0), ("two", y[:, 6] == 1)):
        acc, _ = score(pred[rows], y[rows])
        out[name] = {k: acc[k] for k in TARGETS[:3]}
    return out


def chance_accuracies(y_train: torch.Tensor, y_test: torch.Tensor) -> dict[str, float | None]:
    """Held-out accuracy of always answering each target's most frequent training class (order: 0.5)."""
    pred = torch.zeros_like(y_test)
    for k in range(len(TARGETS)):
        col = y_train[:, k][y_train[:, k] != IGNORE]
        pred[:, k] = int(col.bincount().argmax()) if col.numel() else 0
    acc, _ = score(pred, y_test)
    acc["order"] = 0.5
    return acc


# ---------------------------------------------------------------------------------------------- probes
class AttentionPoolProbe(nn.Module):
    """One learned query per target: softmax attention over real tokens, then a linear classifier each."""

    def __init__(self, dim: int, n_classes: Sequence[int]) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(len(n_classes), dim))  # zero: mean pooling at the start
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in n_classes)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """x (B, M, F), mask (B, M) True for real tokens -> one (B, classes) logit tensor per target."""
        scores = torch.einsum("bmf,kf->bkm", x, self.queries) * self.scale
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        pooled = torch.einsum("bkm,bmf->bkf", scores.softmax(-1), x)
        return [head(pooled[:, k]) for k, head in enumerate(self.heads)]


class LinearProbes(nn.Module):
    """One linear classifier per target on a vector per target: x (B, K, F) -> K logit tensors."""

    def __init__(self, dim: int, n_classes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (B, K, F) -> one (B, classes) logit tensor per target (mask unused)."""
        return [head(x[:, k]) for k, head in enumerate(self.heads)]


def standardize(
    train: torch.Tensor, test: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training set's per-feature mean and std (over real tokens when masked)."""
    flat = train[mask] if mask is not None else train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def fit_probe(
    probe: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    y: torch.Tensor,
    *,
    steps: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Train `probe` (summed cross-entropy over targets, undefined labels ignored) with AdamW; eval mode."""
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    order, pos = torch.randperm(n, generator=gen), 0
    probe.train()
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        logits = probe(x[idx], None if mask is None else mask[idx])
        yb = y[idx]
        loss = x.new_zeros(())
        for k, lg in enumerate(logits):
            keep = yb[:, k] != IGNORE
            if keep.any():
                loss = loss + F.cross_entropy(lg[keep], yb[keep, k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def predict(
    probe: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_size: int = 512
) -> torch.Tensor:
    """Argmax class per probed target (N, K)."""
    out = []
    for s in range(0, x.shape[0], batch_size):
        logits = probe(x[s : s + batch_size], None if mask is None else mask[s : s + batch_size])
        out.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1))
    return torch.cat(out)


def _full(pred: torch.Tensor) -> torch.Tensor:
    """Predictions of the probed targets (N, k <= K) padded with `IGNORE` to every target (N, K)."""
    return F.pad(pred, (0, len(TARGETS) - pred.shape[1]), value=IGNORE)


@dataclass
class ProbeScore:
    """A trained probe's held-out accuracy and count per target, and its accuracy on its training set."""

    accuracy: dict[str, float | None]
    n: dict[str, int]
    train_accuracy: dict[str, float | None]
    pred: torch.Tensor  # (N, K) held-out predictions


def pooled_probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    steps: int = 400,
    seed: int = 0,
) -> ProbeScore:
    """Attention-pooling probe on token sets, (features (N, M, F), mask (N, M), labels (N, K)) train -> test."""
    (xa, ma, ya), (xb, mb, yb) = train, test
    xa, xb = standardize(xa, xb, ma)
    torch.manual_seed(seed)
    probe = fit_probe(AttentionPoolProbe(xa.shape[-1], N_CLASSES), xa, ma, ya, steps=steps, seed=seed)
    pred = _full(predict(probe, xb, mb))
    acc, n = score(pred, yb)
    return ProbeScore(acc, n, score(_full(predict(probe, xa, ma)), ya)[0], pred)


# Which probe (by attribute kind) reads each target at the xattn point: slots 1 and 2 share one per kind.
_XATTN_GROUPS: dict[str, tuple[int, ...]] = {"size": (0, 3), "colour": (1, 4), "shape": (2, 5), "count": (6,)}


def xattn_probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int = 400,
    seed: int = 0,
) -> ProbeScore:
    """Linear probes on per-word vectors (N, K, D) with labels (N, K): one per kind, scored per target."""
    (xa, ya), (xb, yb) = train, test
    pred = torch.full_like(yb, IGNORE)
    pred_train = torch.full_like(ya, IGNORE)
    for g, cols in enumerate(_XATTN_GROUPS.values()):
        c = list(cols)
        va, la = xa[:, c].reshape(-1, xa.shape[-1]), ya[:, c].reshape(-1)
        keep = la != IGNORE
        if not keep.any():
            continue
        vtrain, vb = standardize(va[keep], xb[:, c].reshape(-1, xb.shape[-1]))
        torch.manual_seed(seed + g)
        probe = LinearProbes(va.shape[-1], [N_CLASSES[cols[0]]])
        fit_probe(probe, vtrain[:, None], None, la[keep, None], steps=steps, seed=seed + g)
        pred[:, c] = predict(probe, vb[:, None], None).reshape(-1, len(c))
        va = standardize(va[keep], va)[1]
        pred_train[:, c] = predict(probe, va[:, None], None).reshape(-1, len(c))
    acc, n = score(pred, yb)
    return ProbeScore(acc, n, score(pred_train, ya)[0], pred)


# ---------------------------------------------------------------------------------------------- the model
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
    from mm.models.caption import load_rgb

    model.eval()
    collator = ImageCaptionCollator(tok, prompt=meta["prompt"], max_tiles=meta["max_tiles"])
    start = len(collator.prefix)
    tail = meta["prompt"][len(meta["prompt"].rstrip()) :]  # trailing whitespace: tokenized with the caption
    classes = _first_token_classes(tok)
    encoder = model.image_encoder
    captured: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        captured["features"], captured["projected"] = args[0], output

    feats, projs, masks, words, labels, preds = [], [], [], [], [], []
    skipped = 0
    handle = encoder.project.register_forward_hook(grab)
    t0 = time.perf_counter()
    try:
        with XAttnTap(model) as tap:
            for s in range(0, len(records), batch_size):
                recs = records[s : s + batch_size]
                samples = []
                for r in recs:
                    tiled = transform(load_rgb(r.image))
                    samples.append(
                        {"tiles": tiled.tiles, "aspect_ratio_id": tiled.aspect_ratio_id, "text": r.text}
                    )
                batch = collator(samples)
                captured.clear()
                ctx = model.encode_media(
                    batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
                )
                if "features" not in captured:
                    raise RuntimeError("the image encoder did not call its projection (cannot read features)")
                B = len(recs)
                f = captured["features"].reshape(B, -1, captured["features"].shape[-1])
                p = captured["projected"].reshape(B, -1, captured["projected"].shape[-1])
                per_tile = encoder.num_tokens_per_tile
                m = batch["aspect_ratio_mask"].bool().repeat_interleave(per_tile, dim=-1).reshape(B, -1)
                logits = model(batch["tokens"], media=ctx, cross_attention_mask=batch["cross_attention_mask"])
                delta = tap.pop_sum()  # (B, T, D)
                top = logits.argmax(-1)
                w = torch.zeros(B, len(TARGETS), delta.shape[-1])
                y = torch.full((B, len(TARGETS)), IGNORE, dtype=torch.long)
                pr = torch.full((B, len(TARGETS)), IGNORE, dtype=torch.long)
                for b, r in enumerate(recs):
                    spans = word_spans(tok, tail, r.text)
                    if spans is None:
                        skipped += 1
                        continue
                    y[b] = torch.tensor(caption_targets(r.text))
                    row = batch["tokens"][b]
                    # count: the position after the first object predicts " and" (two) or the end (one)
                    after = spans[4][0] if 4 in spans else len(collator.caption_ids(r.text))
                    located = [spans.get(i, (None, None)) for i in _WORD_OF_TARGET] + [(after, after + 1)]
                    for k, (a, e) in enumerate(located):
                        if a is None:
                            continue
                        w[b, k] = delta[b, start + a - 1]
                        guess = classes[k].get(int(top[b, start + a - 1]), IGNORE)
                        whole = bool(
                            (top[b, start + a - 1 : start + e - 1] == row[start + a : start + e]).all()
                        )
                        pr[b, k] = guess if guess != int(y[b, k]) or whole else IGNORE
                feats.append(f)
                projs.append(p)
                masks.append(m)
                words.append(w)
                labels.append(y)
                preds.append(pr)
                done = min(s + batch_size, len(records))
                log.info("%s: %d/%d (%.0fs)", what, done, len(records), time.perf_counter() - t0)
    finally:
        handle.remove()
    if skipped:
        log.warning(
            "%s: %d captions whose words the tokenizer merges across spaces were skipped", what, skipped
        )
    M = max(x.shape[1] for x in feats)
    return Collected(
        features=torch.cat([F.pad(x, (0, 0, 0, M - x.shape[1])) for x in feats]),
        projected=torch.cat([F.pad(x, (0, 0, 0, M - x.shape[1])) for x in projs]),
        mask=torch.cat([F.pad(x, (0, M - x.shape[1])) for x in masks]),
        words=torch.cat(words),
        labels=torch.cat(labels),
        next_token=torch.cat(preds),
    )


def caption_accuracies(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Accuracy and count per target of generated captions against references, and exact match."""
    y = torch.tensor([caption_targets(r) for r in refs], dtype=torch.long).reshape(-1, len(TARGETS))
    pred = torch.tensor([predicted_targets(p) for p in preds], dtype=torch.long).reshape(-1, len(TARGETS))
    acc, n = score(pred, y)
    exact = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)) / max(1, len(refs))
    return {"accuracy": acc, "n": n, "exact_match": exact, "pred": pred}


@torch.no_grad()
def lm_text_repeat(
    lm: nn.Module, tok: Any, captions: Sequence[str], *, period: bool = True
) -> dict[str, Any]:
    """The frozen LM repeating each caption told in text, in the corpus's repeat-line format (greedy)."""
    from mm.lm import generate

    lm.eval()
    sentences = [c.strip() + ("." if period else "") for c in captions]
    # The corpus line is `{sentence} {ASR_PROMPT}{sentence}` as bos + ids + eos; the prompt's trailing space
    # is tokenized with the answer (" a ..."), so the prompt ends at "English:".
    prompts = [[tok.bos_id, *tok.encode(f"{s} {ASR_PROMPT.rstrip()}")] for s in sentences]
    outs: list[str] = []
    for s in range(0, len(prompts), 64):
        new = generate(lm, prompts[s : s + 64], 32, stop_tokens=[tok.eos_id, tok.eot_id], pad_id=tok.pad_id)
        outs.extend(" ".join(tok.decode(t).split()) for t in new)
    res = caption_accuracies(outs, captions)
    # Without the full stop in the prompt the LM still ends its sentence with one: not counted as an error.
    same = [o == s or (not period and o.removesuffix(".") == s) for o, s in zip(outs, sentences)]
    res["exact_match"] = sum(same) / max(1, len(sentences))
    res["examples"] = [{"caption": c, "output": o} for c, o, ok in zip(captions, outs, same) if not ok][:10]
    return res


# ---------------------------------------------------------------------------------------------- the run
def run_probe(
    checkpoint: str | Path,
    train_manifest: str | Path,
    heldout_manifest: str | Path,
    *,
    n_train: int = 1500,
    n_heldout: int = 300,
    steps: int = 400,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Every probe point on a trained image-stage bundle (the module docstring); a JSON-ready dict.

    Keys: `accuracy[point][target]` (None: not defined there), `n` (held-out images per target),
    `n_scored[point][target]` (order: the rows scored), `train_accuracy` (probes on their own training set),
    `slot1_by_count`, `exact_match` (caption, lm_text, lm_text_no_period), `dims`, `xattn_mean_norm`, examples,
    `wall_seconds` per phase, and the run's settings."""
    from mm.datasets.images import read_manifest
    from mm.models.caption import caption_images, load_rgb
    from mm.models.loading import load_image_bundle

    t_start = time.perf_counter()
    wall: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        wall[name] = round(now - t, 2)
        return now

    torch.manual_seed(seed)
    model, tok, transform, meta = load_image_bundle(Path(checkpoint))
    train_recs = [r for r in read_manifest(train_manifest) if parse_caption(r.text)][:n_train]
    test_recs = [r for r in read_manifest(heldout_manifest) if parse_caption(r.text)][:n_heldout]
    if not train_recs or not test_recs:
        raise ValueError("the manifests hold no caption of the shapes world")
    log.info("probe: %s, %d training and %d held-out images", checkpoint, len(train_recs), len(test_recs))
    t = lap("load", t_start)
    tr = collect(model, tok, transform, meta, train_recs, batch_size=batch_size, what="train images")
    te = collect(model, tok, transform, meta, test_recs, batch_size=batch_size, what="held-out images")
    t = lap("collect", t)

    acc: dict[str, dict[str, float | None]] = {"chance": chance_accuracies(tr.labels, te.labels)}
    n_scored: dict[str, dict[str, int]] = {}
    train_acc: dict[str, dict[str, float | None]] = {}
    by_count: dict[str, dict[str, dict[str, float | None]]] = {}
    probes = {
        "encoder": lambda: pooled_probe_accuracy(
            (tr.features, tr.mask, tr.labels), (te.features, te.mask, te.labels), steps=steps, seed=seed
        ),
        "projected": lambda: pooled_probe_accuracy(
            (tr.projected, tr.mask, tr.labels), (te.projected, te.mask, te.labels), steps=steps, seed=seed
        ),
        "xattn": lambda: xattn_probe_accuracy(
            (tr.words, tr.labels), (te.words, te.labels), steps=steps, seed=seed
        ),
    }
    for name, run in probes.items():
        log.info("probe: %s", name)
        res = run()
        acc[name], n_scored[name], train_acc[name] = res.accuracy, res.n, res.train_accuracy
        by_count[name] = slot1_by_count(res.pred, te.labels)
        t = lap(name, t)
    acc["next_token"], n_scored["next_token"] = score(te.next_token, te.labels)
    by_count["next_token"] = slot1_by_count(te.next_token, te.labels)

    refs = [r.text for r in test_recs]
    images = [load_rgb(r.image) for r in test_recs]
    preds = caption_images(model, tok, transform, images, prompt=meta["prompt"], max_tiles=meta["max_tiles"])
    cap = caption_accuracies(preds, refs)
    acc["caption"], n_scored["caption"] = cap["accuracy"], cap["n"]
    by_count["caption"] = slot1_by_count(cap["pred"], te.labels)
    t = lap("caption", t)
    lm_dot = lm_text_repeat(model.lm, tok, refs, period=True)
    lm_bare = lm_text_repeat(model.lm, tok, refs, period=False)
    acc["lm_text"], n_scored["lm_text"] = lm_dot["accuracy"], lm_dot["n"]
    by_count["lm_text"] = slot1_by_count(lm_dot["pred"], te.labels)
    t = lap("lm_text", t)
    wall["total"] = round(time.perf_counter() - t_start, 2)
    defined = te.labels[:, :7] != IGNORE
    xnorm = te.words[:, :7].norm(dim=-1)[defined]
    return {
        "checkpoint": str(checkpoint),
        "train": str(train_manifest),
        "heldout": str(heldout_manifest),
        "n_train": len(train_recs),
        "n_heldout": len(test_recs),
        "steps": steps,
        "seed": seed,
        "targets": list(TARGETS),
        "points": list(POINTS),
        "accuracy": acc,
        "n": {name: int((te.labels[:, k] != IGNORE).sum()) for k, name in enumerate(TARGETS)},
        "n_scored": n_scored,
        "train_accuracy": train_acc,
        "slot1_by_count": by_count,
        "exact_match": {
            "caption": cap["exact_match"],
            "lm_text": lm_dot["exact_match"],
            "lm_text_no_period": lm_bare["exact_match"],
        },
        "dims": {
            "encoder": int(tr.features.shape[-1]),
            "projected": int(tr.projected.shape[-1]),
            "tokens": int(tr.features.shape[1]),
            "xattn_layers": [int(i) for i in model.image_xattn],
        },
        "xattn_mean_norm": float(xnorm.mean()) if xnorm.numel() else 0.0,
        "caption_examples": [{"caption": r, "pred": p} for r, p in zip(refs, preds) if r != p][:10],
        "lm_text_examples": lm_dot["examples"],
        "wall_seconds": wall,
    }


def format_table(result: dict[str, Any]) -> str:
    """The probe points (rows) by target (columns) as a fixed-width text table, with exact-match figures."""
    names = list(result["targets"])
    head = f"{'point':<11}" + "".join(f"{n:>9}" for n in names) + f"{'exact':>8}"
    lines = [head, "-" * len(head)]
    for point in result["points"]:
        row = result["accuracy"].get(point)
        if row is None:
            continue
        cells = "".join(f"{row[n]:>9.3f}" if row.get(n) is not None else f"{'-':>9}" for n in names)
        em = result["exact_match"].get(point)
        lines.append(f"{point:<11}{cells}" + (f"{em:>8.3f}" if em is not None else f"{'-':>8}"))
    lines.append(f"{'n':<11}" + "".join(f"{result['n'][n]:>9d}" for n in names))
    lines.append(
        "slot 1 on one-object | on two-object images (detecting an attribute | binding it to the left object):"
    )
    attrs = " ".join(f"{k:>7}" for k in ("size", "colour", "shape"))
    lines.append(f"  {'point':<11}{attrs} |{attrs}")
    for point, split in result["slot1_by_count"].items():
        cells = [
            f"{split[c][k]:.3f}" if split[c][k] is not None else "-"
            for c in ("one", "two")
            for k in TARGETS[:3]
        ]
        lines.append(
            f"  {point:<11}"
            + " ".join(f"{x:>7}" for x in cells[:3])
            + " |"
            + " ".join(f"{x:>7}" for x in cells[3:])
        )
    order_n = ", ".join(f"{p} {c['order']}" for p, c in result["n_scored"].items())
    em = result["exact_match"]
    lines.append(f"order scored on (colour pair named right): {order_n}")
    lines.append(
        f"lm_text without the final full stop: exact {em['lm_text_no_period']:.3f}; "
        f"wall {result['wall_seconds']['total']:.1f}s"
    )
    return "\n".join(lines)
