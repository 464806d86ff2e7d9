"""Batches of chat conversations (`mm.datasets.chat.ChatDataset` samples) with any number of images per row,
placed anywhere, and at most one video per row.

Text: `tokens` (B, T) right-padded with the pad id, `labels` (B, T) (-100 except the assistant's tokens),
`attention_mask` (B, T) bool.

Images, when a row of the batch has one: only the rows holding images are encoded. `image_rows` (Bi,) names them;
`pixel_values` (Bi, N, max_tiles, 3, S, S), `aspect_ratio_ids` (Bi, N) (0 for a padding image) and
`aspect_ratio_mask` (Bi, N, max_tiles) follow the Mllama layout of `mm.datasets.collate` with N the most images
of a row; `cross_attention_mask` (B, T, N, max_tiles) covers every row by the Mllama rule
(`cross_attention_mask_from_tokens`): a token sees the latest image (or run of consecutive images) before it.

Video, when a row has one: `video_rows` (Bv,), `video_frames` (Bv, F, max_tiles, 3, S, S),
`video_aspect_ratio_ids` (Bv, F), `video_aspect_ratio_mask` (Bv, F, max_tiles) and `video_cross_attention_mask`
(B, T, 1, G) over the G = F / merge effective frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .collate import cross_attention_mask_from_tokens
from .text import IGNORE_INDEX

__all__ = ["ChatCollator"]


class ChatCollator:
    """ChatDataset samples -> a batch (module docstring); None samples are dropped."""

    def __init__(self, tokenizer: Any, *, max_tiles: int = 4, merge: int = 1) -> None:
        self.tokenizer = tokenizer
        self.max_tiles = max_tiles
        self.merge = merge

    def text(self, rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None) -> dict[str, Any]:
        """`tokens`, `labels` (when given) and `attention_mask` of right-padded rows."""
        B, T = len(rows), max(len(r) for r in rows)
        tokens = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.bool)
        out: dict[str, Any] = {"tokens": tokens, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = True
            if labels is not None:
                out["labels"][b, : len(row)] = torch.tensor(labels[b], dtype=torch.long)
        return out

    def images(self, tokens: torch.Tensor, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The image tensors of the rows holding images, and the cross-attention mask of every row."""
        rows = [b for b, s in enumerate(samples) if s["images"]]
        if not rows:
            return {}
        N = max(len(samples[b]["images"]) for b in rows)
        size = samples[rows[0]]["images"][0]["tiles"].shape[-1]
        pixel_values = torch.zeros(len(rows), N, self.max_tiles, 3, size, size, dtype=torch.float32)
        ids = torch.zeros(len(rows), N, dtype=torch.long)
        tile_mask = torch.zeros(len(rows), N, self.max_tiles, dtype=torch.long)
        tile_mask[:, :, 0] = 1
        n_tiles: list[list[int]] = [[] for _ in samples]
        for r, b in enumerate(rows):
            for k, im in enumerate(samples[b]["images"]):
                tiles = im["tiles"]
                n = tiles.shape[0]
                if tiles.shape[1:] != (3, size, size) or not 1 <= n <= self.max_tiles:
                    raise ValueError(
                        f"{samples[b].get('source', '?')} image {k}: tiles of shape {tuple(tiles.shape)}; "
                        f"expected (1..{self.max_tiles}, 3, {size}, {size})"
                    )
                pixel_values[r, k, :n] = tiles
                ids[r, k] = int(im["aspect_ratio_id"])
                tile_mask[r, k, :n] = 1
                n_tiles[b].append(n)
        xmask = cross_attention_mask_from_tokens(tokens, self.tokenizer.image_id, n_tiles, self.max_tiles)
        return {
            "image_rows": torch.tensor(rows, dtype=torch.long),
            "pixel_values": pixel_values,
            "aspect_ratio_ids": ids,
            "aspect_ratio_mask": tile_mask,
            "cross_attention_mask": xmask,
        }

    def video(self, tokens: torch.Tensor, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The frames of the rows holding a video, and the video cross-attention mask of every row."""
        rows = [b for b, s in enumerate(samples) if s.get("video") is not None]
        if not rows:
            return {}
        first = samples[rows[0]]["video"]["frames"]
        F, size = first.shape[0], first.shape[-1]
        if F % self.merge:
            raise ValueError(f"{F} frames cannot be merged in groups of {self.merge}")
        frames = torch.zeros(len(rows), F, self.max_tiles, 3, size, size, dtype=torch.float32)
        ids = torch.zeros(len(rows), F, dtype=torch.long)
        mask = torch.zeros(len(rows), F, self.max_tiles, dtype=torch.long)
        for r, b in enumerate(rows):
            x = samples[b]["video"]["frames"]
            n = x.shape[1]
            if x.shape[0] != F or x.shape[2:] != (3, size, size) or not 1 <= n <= self.max_tiles:
                raise ValueError(
                    f"{samples[b].get('source', '?')}: frames of shape {tuple(x.shape)}; expected "
                    f"({F}, 1..{self.max_tiles}, 3, {size}, {size})"
                )
            frames[r, :, :n] = x
            ids[r] = int(samples[b]["video"]["aspect_ratio_id"])
            mask[r, :, :n] = 1
        G = F // self.merge
        per_row = [[G] if s.get("video") is not None else [] for s in samples]
        xmask = cross_attention_mask_from_tokens(tokens, self.tokenizer.video_id, per_row, G)
        return {
            "video_rows": torch.tensor(rows, dtype=torch.long),
            "video_frames": frames,
            "video_aspect_ratio_ids": ids,
            "video_aspect_ratio_mask": mask,
            "video_cross_attention_mask": xmask,
        }

    def __call__(self, samples: Sequence[Mapping[str, Any] | None]) -> dict[str, torch.Tensor]:
        """Collate a training batch."""
        samples = [s for s in samples if s is not None]
        if not samples:
            raise ValueError("cannot collate an empty batch (every sample was None)")
        batch = self.text([s["ids"] for s in samples], [s["labels"] for s in samples])
        batch.update(self.images(batch["tokens"], samples))
        batch.update(self.video(batch["tokens"], samples))
        return batch
