"""Describing videos with a trained video model: the frozen image encoder's per-frame features (optionally
cached by clip), then one batched, KV-cached greedy generation per batch whose video K/V are computed once
(`mm describe`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from mm.datasets.tiling import TileTransform
from mm.datasets.video import VideoCaptionCollator
from mm.lm import Tokenizer, generate
from mm.models.multimodal import MediaInput, MultimodalLM


class ClipFeatures:
    """Per-frame features of the frozen image encoder for clips, optionally cached by clip source, computed
    under `context` (the stage's autocast: bf16 on CUDA, as the training forwards)."""

    def __init__(
        self,
        model: MultimodalLM,
        collator: VideoCaptionCollator,
        cache: bool,
        context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.model, self.collator, self.context = model, collator, context
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    @torch.no_grad()
    def __call__(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, F, max_tiles * P, D) and tile mask (B, max_tiles) of the samples' clips."""
        cached = self.cache or {}
        todo = [s for s in samples if s["source"] not in cached]
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if todo:
            media = self.collator.media(todo)
            device = next(self.model.parameters()).device
            with self.context():
                feats = self.model.video_frame_features(*(media[k].to(device) for k in _MEDIA_KEYS)).cpu()
            for s, f, m in zip(todo, feats, media["video_aspect_ratio_mask"][:, 0]):
                fresh[s["source"]] = (f, m)
            if self.cache is not None:
                self.cache.update(fresh)
        rows = [fresh.get(s["source"]) or cached[s["source"]] for s in samples]
        return torch.stack([f for f, _ in rows]), torch.stack([m for _, m in rows])


_MEDIA_KEYS = ("video_frames", "video_aspect_ratio_ids", "video_aspect_ratio_mask")


@torch.no_grad()
def describe_clips(
    model: MultimodalLM,
    collator: VideoCaptionCollator,
    samples: list[dict[str, Any]],
    *,
    features: ClipFeatures | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy captions of tiled clips, in input order; the video K/V are computed once per batch."""
    was_training = model.training
    model.eval()
    tok = collator.tokenizer
    features = features or ClipFeatures(model, collator, cache=False)
    device = next(model.parameters()).device
    out: list[str] = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        feats, tile_mask = features(chunk)
        video = model.encode_video(frame_features=feats.to(device), tile_mask=tile_mask.to(device))
        new = generate(
            model,
            [collator.prefix] * len(chunk),
            max_new_tokens,
            stop_tokens=[tok.eos_id, tok.eot_id],
            model_kwargs={"media": {"video": MediaInput(video)}},
        )
        out.extend(tok.decode(t).strip() for t in new)
    model.train(was_training)
    return out


def describe_videos(
    model: MultimodalLM,
    tok: Tokenizer,
    transform: TileTransform,
    meta: dict[str, Any],
    sources: list[str | Path | bytes],
    *,
    batch_size: int = 32,
) -> list[str]:
    """Captions of video files (or their bytes) with a loaded video bundle, one per input, in input order."""
    from mm.datasets.video import decode_clip, tile_clip

    v = meta["video"]
    collator = VideoCaptionCollator(
        tok, v["prompt"], max_tiles=v["max_tiles"], merge=v["aggregator"]["merge"]
    )
    samples = []
    for k, src in enumerate(sources):
        frames, _ = decode_clip(src if isinstance(src, bytes) else str(src), v["n_frames"])
        samples.append({**tile_clip(frames, transform), "source": f"#{k}", "text": ""})
    return describe_clips(model, collator, samples, batch_size=batch_size)
