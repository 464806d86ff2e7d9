"""mm.world: the embedded shapes world, the demo's data (see ../shared/design.md), not framework.

The demo, the probe, the bench and the tests use it; no core room (`mm.lm`, `mm.encoders`, `mm.adapters`,
`mm.datasets`, `mm.models`, `mm.stages`, `mm.training`) imports it. Modules: `grammar` (vocabulary, caption
wording, sentences), `corpus` (the LM text corpus), `images` (scenes and `synth_shapes`), `variants` (the
robustness variants of the images), `video` (moving-object clips), `speech` (the spoken world, espeak-ng;
imported on its own: it needs torchaudio), `scoring` (per-attribute caption scores) and `files` (how a split's
files, shards and manifest are written).
"""

from .corpus import COPY_FRACTION, DEFAULT_TEXT_LINES, SPLITS, synth_text
from .grammar import (
    COLOR_SHAPE_PAIRS,
    COLORS,
    DIRECTIONS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    caption,
    is_heldout,
    motion_caption,
    object_phrase,
    parse_caption,
    random_sentence,
)
from .images import (
    DEFAULT_IMAGE_COUNTS,
    IMAGE_SPLITS,
    Scene,
    SceneObject,
    draw_object,
    random_scene,
    render_scene,
    synth_shapes,
)
from .scoring import caption_attribute_report
from .variants import DEFAULT_VARIANT_COUNT, VARIANT_KINDS, synth_shapes_variants
from .video import DEFAULT_MOTION_COUNTS, MOTION_FPS, MotionClip, encode_mp4, motion_clip, synth_motion

__all__ = [
    "COLORS",
    "COLOR_SHAPE_PAIRS",
    "COPY_FRACTION",
    "DEFAULT_IMAGE_COUNTS",
    "DEFAULT_MOTION_COUNTS",
    "DEFAULT_TEXT_LINES",
    "DEFAULT_VARIANT_COUNT",
    "DIRECTIONS",
    "HELDOUT_PAIRS",
    "IMAGE_SPLITS",
    "MOTION_FPS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TRAIN_PAIRS",
    "VARIANT_KINDS",
    "MotionClip",
    "Scene",
    "SceneObject",
    "caption",
    "caption_attribute_report",
    "draw_object",
    "encode_mp4",
    "is_heldout",
    "motion_caption",
    "motion_clip",
    "object_phrase",
    "parse_caption",
    "random_scene",
    "random_sentence",
    "render_scene",
    "synth_motion",
    "synth_shapes",
    "synth_shapes_variants",
    "synth_text",
]
