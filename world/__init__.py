"""mm.world: the embedded shapes world, the demo's data (see ../shared/design.md), not framework.

The demo, the probe, the bench and the tests use it; no core room (`mm.lm`, `mm.encoders`, `mm.adapters`,
`mm.datasets`, `mm.models`, `mm.stages`, `mm.training`) imports it. Modules: `grammar` (vocabulary, caption
wording, sentences), `corpus` (the LM text corpus), `images` (scenes and `synth_shapes`), `variants` (the
robustness variants of the images), `video` (moving-object clips), `speech` (the spoken world, espeak-ng;
imported on its own: it needs torchaudio), `scoring` (per-attribute caption scores), `questions` (the
question families, phrasings and answers), `chat` and `chat_text` (the instruction data, `synth_chat`),
`spanish` (the fixed Spanish grammar, `to_spanish`, and the corpus's parallel lines) and `files` (how a split's
files, shards and manifest are written).
"""

from .chat import CHAT_FILES, DEFAULT_CHAT_COUNTS, chat_counts, synth_chat
from .corpus import (
    COPY_FRACTION,
    DEFAULT_TEXT_LINES,
    QUESTION_FRACTION,
    SCRAMBLE_FRACTION,
    SPLITS,
    TRANSLATE_FRACTION,
    synth_text,
)
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
from .questions import (
    FAMILIES,
    PHRASINGS,
    TEMPLATES,
    Question,
    clip_questions,
    clip_text,
    pair_questions,
    pair_text,
    scene_questions,
    scene_text,
)
from .scoring import caption_attribute_report
from .spanish import to_spanish, translation_line
from .variants import DEFAULT_VARIANT_COUNT, VARIANT_KINDS, synth_shapes_variants
from .video import DEFAULT_MOTION_COUNTS, MOTION_FPS, MotionClip, encode_mp4, motion_clip, synth_motion

__all__ = [
    "CHAT_FILES",
    "COLORS",
    "COLOR_SHAPE_PAIRS",
    "COPY_FRACTION",
    "DEFAULT_CHAT_COUNTS",
    "DEFAULT_IMAGE_COUNTS",
    "DEFAULT_MOTION_COUNTS",
    "DEFAULT_TEXT_LINES",
    "DEFAULT_VARIANT_COUNT",
    "DIRECTIONS",
    "FAMILIES",
    "HELDOUT_PAIRS",
    "IMAGE_SPLITS",
    "PHRASINGS",
    "MOTION_FPS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEMPLATES",
    "TRAIN_PAIRS",
    "TRANSLATE_FRACTION",
    "QUESTION_FRACTION",
    "SCRAMBLE_FRACTION",
    "VARIANT_KINDS",
    "MotionClip",
    "Question",
    "Scene",
    "SceneObject",
    "caption",
    "caption_attribute_report",
    "chat_counts",
    "clip_questions",
    "clip_text",
    "draw_object",
    "encode_mp4",
    "is_heldout",
    "motion_caption",
    "motion_clip",
    "object_phrase",
    "pair_questions",
    "pair_text",
    "parse_caption",
    "random_scene",
    "random_sentence",
    "render_scene",
    "scene_questions",
    "scene_text",
    "synth_chat",
    "synth_motion",
    "synth_shapes",
    "synth_shapes_variants",
    "synth_text",
    "to_spanish",
    "translation_line",
]
