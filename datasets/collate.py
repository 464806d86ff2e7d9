"""Batches for the image stages: token rows with one `<|image|>` slot, caption-only labels, tiles, masks.

A training row is `<|begin_of_text|> <|image|> prompt caption <|end_of_text|>`, right-padded with the pad id;
the loss is on the caption and the end token only. The media tensors use transformers' Mllama layout
(`MllamaProcessor` output, so `MultimodalLM.forward_hf` takes a batch as it is):

- `pixel_values` (B, N_img, max_tiles, 3, S, S), zero for padding tiles and padding images;
- `aspect_ratio_ids` (B, N_img), 1-based, 0 for a padding image;
- `aspect_ratio_mask` (B, N_img, max_tiles), 1 for real tiles (the first tile is always 1, as in Mllama);
- `cross_attention_mask` (B, T, N_img, max_tiles) int64: which tiles of which image each token attends to.

Cross-attention mask rule (paper-notes.md section 3; transformers' `get_cross_attention_token_mask` +
`convert_sparse_cross_attention_mask_to_dense`): each `<|image|>` token's range runs from that token up to the
next image token, or to the end of the row; consecutive image tokens form a group whose members all run to the
end of the group's range. Tokens before the first image see nothing (all zeros); within a range only the real
tiles of that image are 1. As in `MllamaProcessor`, the end of the row includes right padding.

Tokenization of prompt and caption: the prompt's trailing whitespace is tokenized with the caption, so
`Caption: ` + `a red circle` gives `Caption`, `:`, ` a`, ` red`, ... -- exactly the tokens of the joined text that
the LM saw in its text corpus -- rather than `Caption`, `:`, ` `, `a`, ... (a sequence the LM never saw).
Caption text never yields special ids (`<|image|>` in a caption stays plain text: one image slot per row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .text import IGNORE_INDEX

__all__ = ["ImageCaptionCollator", "cross_attention_mask_from_tokens"]


def cross_attention_mask_from_tokens(
    tokens: torch.Tensor, image_id: int, n_tiles_per_image: Sequence[Sequence[int]], max_tiles: int
) -> torch.Tensor:
    """(B, T, N_img, max_tiles) int64 mask from image-token positions (see the module docstring for the rule)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    batch, length = tokens.shape
    if len(n_tiles_per_image) != batch:
        raise ValueError(f"n_tiles_per_image has {len(n_tiles_per_image)} rows for a batch of {batch}")
    n_images = max((len(row) for row in n_tiles_per_image), default=0)
    mask = torch.zeros(batch, length, n_images, max_tiles, dtype=torch.long, device=tokens.device)
    for b in range(batch):
        positions = (tokens[b] == image_id).nonzero().flatten().tolist()
        if len(positions) != len(n_tiles_per_image[b]):
            raise ValueError(
                f"row {b} has {len(positions)} image tokens (id {image_id}) but n_tiles_per_image lists "
                f"{len(n_tiles_per_image[b])} images"
            )
        end = length
        for k in range(len(positions) - 1, -1, -1):  # walk back: a group of consecutive images shares its end
            if k + 1 < len(positions) and positions[k + 1] != positions[k] + 1:
                end = positions[k + 1]
            n_tiles = n_tiles_per_image[b][k]
            if not 1 <= n_tiles <= max_tiles:
                raise ValueError(f"row {b} image {k} has {n_tiles} tiles; expected 1..{max_tiles}")
            mask[b, positions[k] : end, k, :n_tiles] = 1
    return mask


class ImageCaptionCollator:
    """List of samples (tiles, aspect_ratio_id, text) -> training batch (see the module docstring).

    Returns `tokens` (B, T) long, `labels` (B, T) long (-100 except where the next token is a caption token or
    the end token), `attention_mask` (B, T) bool, and the four Mllama media tensors with N_img = 1. Rows longer
    than `max_len` lose caption tokens from the end (and then their end token). Samples that are None are
    dropped.
    """

    def __init__(self, tokenizer: Any, prompt: str, *, max_tiles: int = 4, max_len: int | None = None):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_tiles = max_tiles
        head = prompt.rstrip()
        self._tail = prompt[len(head) :]  # trailing whitespace, tokenized with the caption
        self.prefix: list[int] = [tokenizer.bos_id, tokenizer.image_id, *tokenizer.encode(head)]
        if max_len is not None and max_len < len(self.prefix) + 1:
            raise ValueError(
                f"max_len={max_len} leaves no room for a caption after {len(self.prefix)} prompt tokens"
            )
        self.max_len = max_len

    def caption_ids(self, text: str) -> list[int]:
        """Token ids of a caption as it follows the prompt (without the end token)."""
        return self.tokenizer.encode(self._tail + text)

    def media(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """`pixel_values`, `aspect_ratio_ids`, `aspect_ratio_mask` (one image per sample) and `n_tiles`."""
        batch = len(samples)
        first = samples[0]["tiles"]
        size = first.shape[-1]
        pixel_values = torch.zeros(batch, 1, self.max_tiles, 3, size, size, dtype=torch.float32)
        aspect_ratio_ids = torch.zeros(batch, 1, dtype=torch.long)
        aspect_ratio_mask = torch.zeros(batch, 1, self.max_tiles, dtype=torch.long)
        aspect_ratio_mask[:, :, 0] = 1
        n_tiles = []
        for b, sample in enumerate(samples):
            tiles = sample["tiles"]
            n = tiles.shape[0]
            if tiles.shape[1:] != (3, size, size) or not 1 <= n <= self.max_tiles:
                raise ValueError(
                    f"sample {b} ({sample.get('source', '?')}): tiles of shape {tuple(tiles.shape)}; expected "
                    f"(1..{self.max_tiles}, 3, {size}, {size})"
                )
            pixel_values[b, 0, :n] = tiles
            aspect_ratio_ids[b, 0] = int(sample["aspect_ratio_id"])
            aspect_ratio_mask[b, 0, :n] = 1
            n_tiles.append([n])
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "n_tiles": n_tiles,
        }

    def __call__(self, samples: Sequence[Mapping[str, Any] | None]) -> dict[str, torch.Tensor]:
        """Collate a training batch."""
        samples = [s for s in samples if s is not None]
        if not samples:
            raise ValueError("cannot collate an empty batch (every sample was None)")
        tok = self.tokenizer
        rows, starts = [], []
        for sample in samples:
            row = self.prefix + self.caption_ids(sample["text"]) + [tok.eos_id]
            if self.max_len is not None:
                row = row[: self.max_len]
            rows.append(row)
            starts.append(len(self.prefix))  # index of the first caption token
        length = max(len(r) for r in rows)
        batch = len(rows)
        tokens = torch.full((batch, length), tok.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.bool)
        for b, (row, start) in enumerate(zip(rows, starts)):
            t = torch.tensor(row, dtype=torch.long)
            tokens[b, : len(row)] = t
            attention_mask[b, : len(row)] = True
            labels[b, start - 1 : len(row) - 1] = t[start:]  # position t predicts token t+1
        media = self.media(samples)
        n_tiles = media.pop("n_tiles")
        media["cross_attention_mask"] = cross_attention_mask_from_tokens(
            tokens, tok.image_id, n_tiles, self.max_tiles
        )
        return {"tokens": tokens, "labels": labels, "attention_mask": attention_mask, **media}

    def prompt_only(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """For generation: `prompt_tokens` (one list per sample, bos..prompt, no caption) plus the media tensors.

        The caller pads the rows and builds `cross_attention_mask` with `cross_attention_mask_from_tokens`
        (`n_tiles` gives the per-image tile counts it needs).
        """
        if not samples:
            raise ValueError("prompt_only needs at least one sample")
        return {"prompt_tokens": [list(self.prefix) for _ in samples], **self.media(samples)}
