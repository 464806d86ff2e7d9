"""mm.datasets: see ../shared/design.md for what lives here.

Training data is addressed by position and loaded through `loader` (a DataLoader with workers over a
world-size independent cursor): image/audio/video samples from `streams` over the one media-text source
(`media`: JSONL manifests, or WebDataset shards read at random through `shards`; a decoder per modality in
`images`, `audio`, `video`; the skip policy in `skips`), packed text rows from `tokens` (memory-mapped token
shards written by `mm data tokenize`). Text pretraining data (`text`: readers and sources; `packing`: rows and
the held-out pass; `mixture`: the in-memory mix; `token_folders`: the `mm data tokenize` format), safe image
decoding (`images`), aspect-ratio tiling (`tiling`) and the image-stage collator with its cross-attention masks
(`collate`).
"""

from .collate import ImageCaptionCollator, cross_attention_mask_from_tokens
from .media import MediaTextDataset, MediaTextRecord, iter_webdataset, read_manifest
from .mixture import PackedText
from .packing import heldout_batches
from .skips import SkipStats, TooManyBadSamples
from .text import TextSource, read_documents
from .tiling import TiledImage, TileTransform, supported_aspect_ratios

__all__ = [
    "ImageCaptionCollator",
    "MediaTextDataset",
    "MediaTextRecord",
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
