"""One media-text source: pairs of a media file (an image, an audio clip, a video clip) and its text, from a JSONL
manifest or from WebDataset tar shards, turned into samples by the modality's `MediaDecoder` (`image_decoder` in
`mm.datasets.images`, `audio_decoder` in `mm.datasets.audio`, `video_decoder` in `mm.datasets.video`). Training
reads it by stream position (`mm.datasets.streams.open_stream`); shards are then read at random
(`mm.datasets.shards`), `iter_webdataset` reads them in stored order.

- A JSONL manifest, one record per line: `{"image": "train/000001.png", "text": "a large red circle", ...}`, the
  media under the decoder's key (`image`, `audio`, `video`), relative to the manifest's folder (or absolute),
  with an optional `prompt` (the instruction that goes with the media, e.g. `Translate the following sentence
  into French: `; None: the stage's own). Other fields are kept as `meta`. `MediaTextDataset` is a map-style
  dataset over it, with a seeded, resumable order (`sample_order`).
- WebDataset tar shards (`mm.datasets.tars`): members grouped by key, the media (a member with one of the
  decoder's extensions) plus the text (`.txt`, or `.json` with a string `text`; the prompt only from `.json`,
  whose record becomes the sample's `meta`).

The same bad-input rules hold for every modality and both stores (`mm.datasets.skips`): an unusable sample is
skipped and counted per reason (`unsafe_name`, `too_large`, `no_<key>` (e.g. `no_image`), `no_text`, `bad_text`,
`broken_shard`, and the decoder's own: `missing`, `empty`, `corrupt`, ...), and a skipped fraction above
`max_bad_fraction` stops the run. Manifest problems found at construction are reported once, not counted as
tried samples: records that are not JSON objects with a `<key>` string and a non-empty `text` string (with
`require_text=False`, e.g. unlabeled audio, the text may be missing) are skipped with a warning naming file and
line; entries whose media file does not exist are dropped with one warning giving the count and the first few
paths. A missing manifest raises FileNotFoundError; a manifest left with no usable entry raises ValueError.
Texts are stripped.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .seeding import derive_seed
from .skips import MAX_EXAMPLES, BadSample, SkipStats
from .tars import DEFAULT_MAX_MEMBER_BYTES, expand_shards, read_groups

__all__ = [
    "MediaDecoder",
    "MediaTextDataset",
    "MediaTextRecord",
    "decode_group",
    "iter_webdataset",
    "read_manifest",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaDecoder:
    """How one modality's media become sample fields.

    `decode(media)` takes a file path (manifests) or the member's bytes (shards) and returns the sample's media
    fields, raising BadSample when the media are unusable. `key` names the manifest field and the `no_<key>`
    skip; `extensions` are the shard members that hold the media, in order of preference; `order_tag` seeds the
    manifest order; `unit` names the samples in counts ("samples", "clips"); `transform` is what decoded samples
    are cached under (its repr)."""

    key: str
    extensions: tuple[str, ...]
    decode: Callable[[Path | bytes], dict[str, Any]]
    order_tag: str
    unit: str = "samples"
    transform: Any = None


@dataclass(frozen=True)
class MediaTextRecord:
    """One manifest entry: the media file's resolved path, its text, the optional prompt and other fields."""

    media: Path
    text: str
    prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _record_problem(rec: Any, key: str, require_text: bool) -> str | None:
    """Why a parsed manifest line is unusable, or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec.get(key), str) or not rec[key]:
        return f"no '{key}' string"
    if require_text and (not isinstance(rec.get("text"), str) or not rec["text"].strip()):
        return "no non-empty 'text' string"
    if not isinstance(rec.get("text", ""), str):
        return "'text' is not a string"
    if rec.get("prompt") is not None and not isinstance(rec["prompt"], str):
        return "'prompt' is not a string"
    return None


def read_manifest(path: str | os.PathLike[str], key: str, require_text: bool = True) -> list[MediaTextRecord]:
    """Records of a JSONL manifest whose media are under `key` (`require_text=False`: text may be missing);
    malformed lines are skipped with a warning naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}-text manifest {path} does not exist")
    records, bad = [], 0
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                reason: str | None = f"not JSON ({e.msg})"
            else:
                reason = _record_problem(rec, key, require_text)
            if reason is not None:
                bad += 1
                if bad <= MAX_EXAMPLES:
                    logger.warning("%s:%d: skipped manifest record: %s", path, lineno, reason)
                continue
            media = Path(rec[key])
            meta = {k: v for k, v in rec.items() if k not in (key, "text", "prompt")}
            media = media if media.is_absolute() else path.parent / media
            records.append(MediaTextRecord(media, rec.get("text", "").strip(), rec.get("prompt"), meta))
    if bad:
        logger.warning(
            "%s: skipped %d malformed records (each needs its '%s' path and a non-empty 'text' string)",
            path,
            bad,
            key,
        )
    return records


class MediaTextDataset(Dataset):
    """Map-style dataset over a JSONL manifest: `ds[i]` -> dict(media fields, text, prompt, source, index, meta).

    The media fields are the decoder's (e.g. `tiles`, `aspect_ratio_id`, `aspect_ratio` for tiled images,
    `features` for audio, `frames` for video); `source` is the media path and `index` the manifest entry used.
    `load(i)` returns None for an unusable entry (counted in `stats` the first time); `ds[i]` instead moves on to
    the next usable entry (i+1, i+2, ... wrapping around), so batches keep their size. Entries found bad are
    remembered and not decoded or counted again. `sample_order(seed, epoch)` is the training order; the stream
    keeps its position in it to resume.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        decoder: MediaDecoder,
        *,
        max_bad_fraction: float = 0.05,
        min_tried: int = 20,
        require_text: bool = True,
    ) -> None:
        self.manifest, self.decoder, self.kind = Path(manifest), decoder, f"{decoder.key}-text"
        records = read_manifest(self.manifest, decoder.key, require_text)
        missing = [r.media for r in records if not r.media.is_file()]
        if missing:
            logger.warning(
                "%s: dropped %d of %d entries whose %s file is missing (first: %s)",
                self.manifest,
                len(missing),
                len(records),
                decoder.key,
                ", ".join(str(p) for p in missing[:MAX_EXAMPLES]),
            )
            gone = set(missing)
            records = [r for r in records if r.media not in gone]
        if not records:
            raise ValueError(f"{self.kind} manifest {self.manifest} has no usable entries")
        self.records = records
        self.missing = [str(p) for p in missing]
        self.transform = decoder.transform  # what streams key their in-memory cache on
        self.stats = SkipStats(
            max_bad_fraction, min_tried, what=f"{decoder.unit} of manifest {self.manifest}"
        )
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> dict[str, Any] | None:
        """Sample of entry i, or None if it is unusable (counted in `stats` the first time)."""
        if i in self._bad:
            return None
        record = self.records[i]
        try:
            sample = self.decoder.decode(record.media)
        except BadSample as e:
            self._bad.add(i)
            self.stats.skip(e.reason, str(record.media), e.detail)
            return None
        self.stats.ok()
        sample.update(
            text=record.text, prompt=record.prompt, source=str(record.media), index=i, meta=record.meta
        )
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} entries")
        for k in range(n):
            sample = self.load((i + k) % n)
            if sample is not None:
                return sample
        raise ValueError(
            f"{self.kind} manifest {self.manifest}: every entry was skipped ({self.stats.as_dict()})"
        )

    def sample_order(self, seed: int, epoch: int) -> list[int]:
        """A permutation of the entries, fixed by (seed, epoch)."""
        order = list(range(len(self.records)))
        random.Random(derive_seed(self.decoder.order_tag, seed, epoch)).shuffle(order)
        return order


def _group_text(group: dict[str, Any], require_text: bool) -> dict[str, Any]:
    """`text` and `prompt` of a shard group (`.txt`, else `.json` `text`; the prompt only from `.json`), and the
    `.json` record as `meta` when it parses; raise BadSample if the text is required and there is none."""
    fields: dict[str, Any] = {}
    error = None
    if "json" in group:
        try:
            fields["meta"] = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            error = f".json is not JSON ({e})"
    rec = fields.get("meta")
    fields["prompt"] = rec["prompt"] if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) else None
    if "txt" in group:
        fields["text"] = group["txt"].decode("utf-8", errors="replace").strip()
        if fields["text"]:
            return fields
    if error is not None:
        raise BadSample("bad_text", error)
    if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
        return {**fields, "text": rec["text"].strip()}
    if not require_text:
        return {**fields, "text": ""}
    if "json" in group:
        raise BadSample("bad_text", ".json has no non-empty 'text' string")
    raise BadSample("no_text", "no .txt or .json member" if "txt" not in group else "empty .txt")


def decode_group(group: dict[str, Any], decoder: MediaDecoder, require_text: bool = True) -> dict[str, Any]:
    """The sample of one shard group ({extension: bytes}): media fields, `text`, `prompt` and `meta` (from
    `.json`); raise BadSample if it is unusable (`_unsafe` / `_too_large` markers, no media, no text, bad
    media)."""
    if "_unsafe" in group:
        raise BadSample("unsafe_name", group["_unsafe"])
    if "_too_large" in group:
        raise BadSample("too_large", group["_too_large"])
    ext = next((e for e in decoder.extensions if e in group), None)
    if ext is None:
        raise BadSample(
            f"no_{decoder.key}", f"members {sorted(group)} hold no {'/'.join(decoder.extensions)}"
        )
    fields = _group_text(group, require_text)
    return {**decoder.decode(group[ext]), **fields}


def iter_webdataset(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    decoder: MediaDecoder,
    *,
    stats: SkipStats | None = None,
    max_bad_fraction: float = 0.05,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    require_text: bool = True,
) -> Iterator[dict[str, Any]]:
    """Samples of WebDataset tar shards in stored order: dict(media fields, text, prompt, source="shard:key",
    key[, meta])."""
    paths = expand_shards(shards)
    if stats is None:
        stats = SkipStats(max_bad_fraction, what=f"{decoder.unit} of shards")
    for shard in paths:
        for key, group in read_groups(shard, stats, max_member_bytes):
            source = f"{shard}:{key}"
            try:
                sample = decode_group(group, decoder, require_text)
            except BadSample as e:
                stats.skip(e.reason, source, e.detail)
                continue
            stats.ok()
            yield {**sample, "source": source, "key": key}
