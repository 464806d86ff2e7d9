"""Answering chat conversations with a multimodal model: the conversation so far (text, any number of images,
at most one video) -> the assistant's next message, by batched greedy decoding whose media K/V are computed once
per batch (`answer_conversations`), and a multi-turn session around it (`Chat`, behind `mm chat`).

Prompts are the chat format of `mm.datasets.chat.encode_chat` with the assistant's header appended, exactly as
the instruction data was tokenized in training; the cross-attention masks follow from the media tokens (the
Mllama rule). Conversations are batched by their media signature (number of images, whether a video), so every
row of a batch holds the same kinds of media.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm.datasets.chat import encode_chat
from mm.datasets.chat_collate import ChatCollator
from mm.datasets.images import image_decoder
from mm.datasets.media import MediaDecoder
from mm.datasets.skips import BadSample
from mm.datasets.video import video_decoder
from mm.lm import Tokenizer, generate
from mm.models.media import MediaInput
from mm.models.multimodal import MultimodalLM

# The collated tensors each modality's encoder takes, in order.
IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
VIDEO_INPUTS = ("video_frames", "video_aspect_ratio_ids", "video_aspect_ratio_mask")

__all__ = ["Chat", "answer_conversations", "chat_decoders", "normalize_answer", "prompt_sample"]


def normalize_answer(text: str) -> str:
    """An answer as scored: lower case, surrounding space and a final full stop removed."""
    return text.strip().lower().rstrip(".").strip()


def chat_decoders(transform: Any, n_frames: int | None) -> dict[str, MediaDecoder]:
    """The media decoders of a chat model: tiled images, and clips of `n_frames` frames (when it has video)."""
    decoders = {"image": image_decoder(transform)}
    if n_frames:
        decoders["video"] = video_decoder(transform, n_frames=n_frames)
    return decoders


def prompt_sample(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]], decoders: Mapping[str, MediaDecoder]
) -> dict[str, Any]:
    """A normalized conversation (ending with a user turn) -> its prompt ids (assistant header appended) and
    decoded media; an image item's `path` may also be an in-memory PIL image."""
    images, video = [], None
    for m in messages:
        for x in m["content"]:
            if x["type"] == "text":
                continue
            if x["type"] not in decoders:
                raise ValueError(f"this model reads no {x['type']} (it reads {', '.join(decoders)})")
            src = x["path"]
            if isinstance(src, Image.Image):  # in memory: the decoder's transform directly
                t = decoders["image"].transform(src.convert("RGB"))
                sample = {"tiles": t.tiles, "aspect_ratio_id": t.aspect_ratio_id}
            else:
                try:
                    sample = decoders[x["type"]].decode(Path(src))
                except BadSample as e:
                    raise ValueError(f"{src}: not a readable {x['type']} ({e.reason}: {e.detail})") from None
            if x["type"] == "image":
                images.append(sample)
            else:
                video = sample
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
    return {"ids": ids, "labels": [-100] * len(ids), "images": images, "video": video}


@torch.no_grad()
def answer_conversations(
    model: MultimodalLM,
    tok: Tokenizer,
    samples: Sequence[Mapping[str, Any]],
    *,
    merge: int = 1,
    max_tiles: int = 4,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> list[str]:
    """Greedy answers to `prompt_sample` outputs, one per sample, in input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collator = ChatCollator(tok, max_tiles=max_tiles, merge=merge)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((len(s["images"]), s.get("video") is not None), []).append(i)
    out: list[str] = [""] * len(samples)
    for (n_images, has_video), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            chunk = [samples[i] for i in rows]
            tokens = collator.text([s["ids"] for s in chunk], None)["tokens"]
            media = {}
            for kind, wanted, make, keys in (
                ("image", n_images, collator.images, IMAGE_INPUTS),
                ("video", has_video, collator.video, VIDEO_INPUTS),
            ):
                if wanted:
                    b = make(tokens, chunk)
                    media[kind] = MediaInput(model.encode(kind, *(b[k].to(device) for k in keys)))
            new = generate(
                model,
                [s["ids"] for s in chunk],
                max_new_tokens,
                stop_tokens=[tok.eot_id, tok.eos_id],
                model_kwargs={"media": media} if media else None,
            )
            for i, t in zip(rows, new):
                out[i] = tok.decode(t).strip()
    model.train(was_training)
    return out


class Chat:
    """A multi-turn conversation with a chat-capable checkpoint (`mm chat`): each `ask` adds the user's turn
    (text, images, a video) and the model's answer to `history`."""

    def __init__(self, model: MultimodalLM, tok: Tokenizer, transform: Any, meta: Mapping[str, Any]) -> None:
        self.model, self.tok, self.transform, self.meta = model.eval(), tok, transform, dict(meta)
        video = self.meta.get("video") or {}
        self.merge = int(video.get("aggregator", {}).get("merge", 1))
        self.decoders = chat_decoders(
            transform, video.get("n_frames") if model.video_xattn is not None else None
        )
        self.history: list[dict[str, Any]] = []

    @classmethod
    def load(cls, path: str | Path) -> Chat:
        """A chat session on a `vision-sft` final folder."""
        from mm.stages.vision_sft_model import load_vision_sft_bundle

        return cls(*load_vision_sft_bundle(Path(path)))

    def reset(self) -> None:
        """Forget the conversation."""
        self.history = []

    def ask(
        self,
        message: str,
        images: Sequence[str | Path | Image.Image] = (),
        video: str | Path | None = None,
        *,
        max_new_tokens: int = 32,
    ) -> str:
        """The answer to `message` about `images` (in order, before the text) and `video`, given the history."""
        items: list[dict[str, Any]] = []
        if video is not None:
            items.append({"type": "video", "path": Path(video)})
        for im in images:
            items.append({"type": "image", "path": im if isinstance(im, Image.Image) else Path(im)})
        items.append({"type": "text", "text": message})
        turn = {"role": "user", "content": items}
        sample = prompt_sample(self.tok, [*self.history, turn], self.decoders)
        max_tiles = self.meta.get("max_tiles", 4)
        answer = answer_conversations(
            self.model,
            self.tok,
            [sample],
            merge=self.merge,
            max_tiles=max_tiles,
            max_new_tokens=max_new_tokens,
        )[0]
        self.history += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer
