"""Captioning with a trained image stage: images -> tiles -> one batched, KV-cached greedy generation whose
media K/V are computed once per batch (`mm caption`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm.datasets.collate import ImageCaptionCollator
from mm.lm import Tokenizer, generate
from mm.models.media import MediaInput


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB (greyscale, palette, RGBA and CMYK converted)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


@torch.no_grad()
def caption_images(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    transform: Any,
    images: list[Image.Image],
    *,
    prompt: str,
    max_tiles: int,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy captions, one per image, in input order (the prompt is tokenized exactly as in training)."""
    model.eval()
    device = next(model.parameters()).device
    collator = ImageCaptionCollator(tokenizer, prompt, max_tiles=max_tiles)
    out: list[str] = []
    for s in range(0, len(images), batch_size):
        chunk = [transform(im) for im in images[s : s + batch_size]]
        media = collator.media([{"tiles": t.tiles, "aspect_ratio_id": t.aspect_ratio_id} for t in chunk])
        ctx = model.encode_media(
            media["pixel_values"].to(device),
            media["aspect_ratio_ids"].to(device),
            media["aspect_ratio_mask"].to(device),
        )
        new = generate(
            model,
            [collator.prefix] * len(chunk),
            max_new_tokens,
            stop_tokens=[tokenizer.eos_id, tokenizer.eot_id],
            model_kwargs={"media": {"image": MediaInput(ctx)}},
        )
        out.extend(tokenizer.decode(t).strip() for t in new)
    return out
