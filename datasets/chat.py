"""Chat-formatted instruction data: conversations whose user turns hold text and media, in the Llama 3 chat
format, with the loss on the assistant's tokens only.

A JSONL manifest holds one conversation per line (`../shared/design.md`, "Questions about the world"):

    {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, "what colour is the circle?"]},
                  {"role": "assistant", "content": "red"}], "family": "colour"}

`content` is a string or a list of items: a string, `{"type": "text", "text": S}`, or a media item
`{"type": "image" | "video" | "audio", "path": P}` (relative to the manifest's folder, or absolute), anywhere in
a user or system turn and in any number (at most one video). Other top-level fields are kept as `meta`.

Tokens (`encode_chat`): `<|begin_of_text|>`, then per message `<|start_header_id|>role<|end_header_id|>` "\n\n",
its items in order (text tokenized item by item; an image becomes `<|image|>`, a video `<|video|>`) and
`<|eot_id|>` -- the layout of `Tokenizer.encode_dialog`, which the tests check. Labels are next-token targets on
the assistant's content tokens and its `<|eot_id|>`; everything else is -100. User text never becomes a special
token.

Bad input follows the media readers' rules (`mm.datasets.media`, `mm.datasets.skips`): malformed lines are
skipped with a warning naming file and line, conversations whose media file is missing are dropped with one
warning, and a conversation whose media cannot be decoded is skipped and counted under the decoder's reason.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .media import MediaDecoder
from .seeding import derive_seed
from .skips import MAX_EXAMPLES, BadSample, SkipStats
from .text import IGNORE_INDEX

__all__ = [
    "MEDIA_KINDS",
    "ROLES",
    "ChatDataset",
    "ChatRecord",
    "encode_chat",
    "media_items",
    "normalize_messages",
    "read_chat_manifest",
]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("image", "video", "audio")


@dataclass(frozen=True)
class ChatRecord:
    """One conversation: its messages (contents as item lists, media paths resolved), meta fields, and where
    it came from (`file:line`)."""

    messages: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _item(item: Any, base: Path | None) -> dict[str, Any]:
    """One content item in its normal form (ValueError naming what is wrong)."""
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, Mapping):
        raise ValueError(f"content item {item!r} is neither a string nor an object")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise ValueError(f"text item {item!r} has no 'text' string")
        return {"type": "text", "text": item["text"]}
    if kind in MEDIA_KINDS:
        p = item.get("path")
        if not isinstance(p, (str, os.PathLike)) or not str(p):
            raise ValueError(f"{kind} item {item!r} has no 'path' string")
        path = Path(p)
        if base is not None and not path.is_absolute():
            path = base / path
        return {"type": kind, "path": path}
    raise ValueError(f"content item type {kind!r}; allowed: text, {', '.join(MEDIA_KINDS)}")


def normalize_messages(messages: Any, base: Path | None = None) -> list[dict[str, Any]]:
    """Messages with every content as a list of items (media paths resolved against `base`); ValueError
    naming the message and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out, videos = [], 0
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, Mapping) else m
            raise ValueError(f"message {k}: role {role!r}; allowed: {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError(f"message {k}: 'content' must be a string or a list of items")
        try:
            items = [_item(x, base) for x in (content if isinstance(content, list) else [content])]
        except ValueError as e:
            raise ValueError(f"message {k}: {e}") from None
        if m["role"] == "assistant" and any(x["type"] != "text" for x in items):
            raise ValueError(f"message {k}: an assistant turn holds text only")
        videos += sum(x["type"] == "video" for x in items)
        out.append({"role": m["role"], "content": items})
    if videos > 1:
        raise ValueError(f"{videos} videos in one conversation; at most one")
    return out


def media_items(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The media items of normalized messages, in order."""
    return [x for m in messages for x in m["content"] if x["type"] in MEDIA_KINDS]


def read_chat_manifest(path: str | os.PathLike[str]) -> list[ChatRecord]:
    """The conversations of a chat JSONL manifest; malformed lines are skipped with a warning naming file and
    line, conversations with a missing media file dropped with one warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat manifest {path} does not exist")
    records, bad, missing = [], 0, []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, not an object")
                messages = normalize_messages(rec.get("messages"), path.parent)
                if not any(m["role"] == "assistant" for m in messages):
                    raise ValueError("no assistant turn (nothing to learn or score)")
            except (json.JSONDecodeError, ValueError) as e:
                bad += 1
                if bad <= MAX_EXAMPLES:
                    logger.warning("%s:%d: skipped chat record: %s", path, lineno, e)
                continue
            gone = [str(x["path"]) for x in media_items(messages) if not x["path"].is_file()]
            if gone:
                missing.extend(gone)
                continue
            meta = {k: v for k, v in rec.items() if k != "messages"}
            records.append(ChatRecord(messages, meta, f"{path}:{lineno}"))
    if bad:
        logger.warning("%s: skipped %d malformed chat records", path, bad)
    if missing:
        logger.warning(
            "%s: dropped conversations whose media file is missing (%d files; first: %s)",
            path,
            len(missing),
            ", ".join(missing[:MAX_EXAMPLES]),
        )
    return records


def encode_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, labels) of normalized messages: labels[t] = ids[t + 1] where token t + 1 is an assistant content
    token or its `<|eot_id|>`, else -100 (module docstring)."""
    tok = tokenizer
    media_ids = {"image": tok.image_id, "video": tok.video_id}
    ids, trained = [tok.bos_id], [False]
    for m in messages:
        head = tok.header_ids(m["role"])
        ids += head
        trained += [False] * len(head)
        learn = m["role"] == "assistant"
        for x in m["content"]:
            if x["type"] == "text":
                piece = tok.encode(x["text"])
            elif x["type"] in media_ids:
                piece = [media_ids[x["type"]]]
            else:
                raise ValueError(f"{x['type']} items have no placeholder token in the chat format")
            ids += piece
            trained += [learn] * len(piece)
        ids.append(tok.eot_id)
        trained.append(learn)
    if add_generation_prompt:
        head = tok.header_ids("assistant")
        ids += head
        trained += [False] * len(head)
    labels = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


class ChatDataset(Dataset):
    """Map-style dataset over a chat manifest: `load(i)` -> dict(`ids`, `labels`, `images` (decoded samples of
    the image decoder, in order), `video` (the video decoder's sample or None), `meta`, `source`, `index`), or
    None for a conversation whose media cannot be used (counted in `stats`). `decoders` maps a media kind to its
    `MediaDecoder`; a conversation with a kind that has none is skipped (`no_<kind>_decoder`)."""

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        tokenizer: Any,
        decoders: Mapping[str, MediaDecoder],
        *,
        max_bad_fraction: float = 0.05,
        min_tried: int = 20,
        max_len: int | None = None,
    ) -> None:
        self.manifest, self.tokenizer, self.decoders = Path(manifest), tokenizer, dict(decoders)
        self.records = read_chat_manifest(self.manifest)
        if not self.records:
            raise ValueError(f"chat manifest {self.manifest} has no usable conversations")
        self.max_len = max_len
        self.transform = tuple(repr(d.transform) for d in self.decoders.values())
        self.stats = SkipStats(max_bad_fraction, min_tried, what=f"conversations of {self.manifest}")
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, record: ChatRecord) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        images, video = [], None
        for x in media_items(record.messages):
            decoder = self.decoders.get(x["type"])
            if decoder is None:
                raise BadSample(f"no_{x['type']}_decoder", f"this stage reads no {x['type']} ({x['path']})")
            try:
                sample = decoder.decode(x["path"])
            except BadSample as e:
                raise BadSample(e.reason, f"{x['path']}: {e.detail}") from None
            if x["type"] == "image":
                images.append(sample)
            else:
                video = sample
        return images, video

    def load(self, i: int) -> dict[str, Any] | None:
        """Sample of conversation i, or None if it is unusable (counted in `stats` the first time)."""
        if i in self._bad:
            return None
        record = self.records[i]
        try:
            images, video = self._decode(record)
            ids, labels = encode_chat(self.tokenizer, record.messages)
            if self.max_len is not None and len(ids) > self.max_len:
                raise BadSample("too_long", f"{len(ids)} tokens > max_len={self.max_len}")
        except BadSample as e:
            self._bad.add(i)
            self.stats.skip(e.reason, record.source, e.detail)
            return None
        self.stats.ok()
        return {
            "ids": ids,
            "labels": labels,
            "images": images,
            "video": video,
            "meta": record.meta,
            "source": record.source,
            "index": i,
        }

    def sample_order(self, seed: int, epoch: int) -> list[int]:
        """A permutation of the conversations, fixed by (seed, epoch)."""
        order = list(range(len(self.records)))
        random.Random(derive_seed("mm.chat.order", seed, epoch)).shuffle(order)
        return order
