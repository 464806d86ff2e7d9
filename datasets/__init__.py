"""mm.datasets: see ../shared/design.md for what lives here.

Training data is addressed by position and loaded through `loader` (a DataLoader with workers over a
world-size independent cursor): image/audio/video samples from `streams` (JSONL manifests, or WebDataset shards
read at random through `shards`), packed text rows from `tokens` (memory-mapped token shards written by
`mm data tokenize`). Text pretraining data (`text`: readers, weighted mixture, packing), image-text pairs
(`images`: JSONL manifests, WebDataset shards, safe decoding, skip policy), aspect-ratio tiling (`tiling`)
and the image-stage collator with its cross-attention masks (`collate`).
"""

from .collate import ImageCaptionCollator, cross_attention_mask_from_tokens
from .images import (
    ImageTextDataset,
    ImageTextRecord,
    ImageTextShards,
    SkipStats,
    TooManyBadSamples,
    iter_webdataset,
    read_manifest,
)
from .mixture import PackedText
from .packing import heldout_batches
from .text import TextSource, read_documents
from .tiling import TiledImage, TileTransform, supported_aspect_ratios

__all__ = [
    "ImageCaptionCollator",
    "ImageTextDataset",
    "ImageTextRecord",
    "ImageTextShards",
    "PackedText",
    "SkipStats",
    "TextSource",
    "TileTransform",
    "TiledImage",
    "TooManyBadSamples",
    "cross_attention_mask_from_tokens",
    "heldout_batches",
    "iter_webdataset",
    "read_documents",
    "read_manifest",
    "supported_aspect_ratios",
]
