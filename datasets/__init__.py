"""mm.datasets: see ../shared/design.md for what lives here.

Text pretraining data (`text`: readers, weighted mixture, packing, resumable order) and the shapes world
(`shapes`: vocabulary, caption wording, prompt formats, text corpus generator).
"""

from .shapes import (
    ASR_PROMPT,
    COLORS,
    DIRECTIONS,
    HELDOUT_PAIRS,
    IMAGE_PROMPT,
    SHAPES,
    SIZES,
    VIDEO_PROMPT,
    caption,
    is_heldout,
    motion_caption,
    object_phrase,
    synth_text,
)
from .text import PackedText, TextSource, heldout_batches, read_documents

__all__ = [
    "ASR_PROMPT",
    "COLORS",
    "DIRECTIONS",
    "HELDOUT_PAIRS",
    "IMAGE_PROMPT",
    "SHAPES",
    "SIZES",
    "VIDEO_PROMPT",
    "PackedText",
    "TextSource",
    "caption",
    "heldout_batches",
    "is_heldout",
    "motion_caption",
    "object_phrase",
    "read_documents",
    "synth_text",
]
