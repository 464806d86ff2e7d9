"""mm.datasets: see ../shared/design.md for what lives here.

Training data is addressed by position and loaded through `loader` (a DataLoader with workers over a
world-size independent cursor): image/audio/video samples from `streams` over the one media-text source
(`media`: JSONL manifests, or WebDataset shards read at random through `shards`; a decoder per modality in
`images`, `audio`, `video`; the skip policy in `skips`), packed text rows from `tokens` (memory-mapped token
shards written by `mm data tokenize`). Text pretraining data (`text`: readers, weighted mixture, packing), the
shapes world (`shapes`: vocabulary, caption wording, prompt formats, text corpus and image generators), safe
image decoding (`images`), aspect-ratio tiling (`tiling`) and the image-stage collator with its
cross-attention masks (`collate`).
"""

from .collate import ImageCaptionCollator, cross_attention_mask_from_tokens
from .media import MediaTextDataset, MediaTextRecord, iter_webdataset, read_manifest
from .shapes import (
    ASR_PROMPT,
    COLORS,
    DIRECTIONS,
    HELDOUT_PAIRS,
    IMAGE_PROMPT,
    IMAGE_SPLITS,
    SHAPES,
    SIZES,
    VIDEO_PROMPT,
    caption,
    is_heldout,
    motion_caption,
    object_phrase,
    synth_shapes,
    synth_text,
)
from .skips import SkipStats, TooManyBadSamples
from .text import PackedText, TextSource, heldout_batches, read_documents
from .tiling import TiledImage, TileTransform, supported_aspect_ratios

__all__ = [
    "ASR_PROMPT",
    "COLORS",
    "DIRECTIONS",
    "HELDOUT_PAIRS",
    "IMAGE_PROMPT",
    "IMAGE_SPLITS",
    "SHAPES",
    "SIZES",
    "VIDEO_PROMPT",
    "ImageCaptionCollator",
    "MediaTextDataset",
    "MediaTextRecord",
    "PackedText",
    "SkipStats",
    "TextSource",
    "TileTransform",
    "TiledImage",
    "TooManyBadSamples",
    "caption",
    "cross_attention_mask_from_tokens",
    "heldout_batches",
    "is_heldout",
    "iter_webdataset",
    "motion_caption",
    "object_phrase",
    "read_documents",
    "read_manifest",
    "supported_aspect_ratios",
    "synth_shapes",
    "synth_text",
]
