"""mm.encoders: see ../shared/design.md for what lives here.

Image: `ImageEncoder` (timm ViT + tile embeddings + multi-layer features + gated global layers, after
transformers' `MllamaVisionModel`) and its CLIP pretraining (`CLIPModel`, `TextTower`, `clip_loss`).
"""

from .clip import CLIPModel, TextTower, clip_loss, zero_shot_retrieval_accuracy
from .image import (
    AspectRatioEmbedding,
    GatedBlock,
    ImageEncoder,
    ImageEncoderConfig,
    config_from_mllama,
    create_vit,
    load_mllama_vision_state_dict,
    load_timm_weights,
)

__all__ = [
    "AspectRatioEmbedding",
    "CLIPModel",
    "GatedBlock",
    "ImageEncoder",
    "ImageEncoderConfig",
    "TextTower",
    "clip_loss",
    "config_from_mllama",
    "create_vit",
    "load_mllama_vision_state_dict",
    "load_timm_weights",
    "zero_shot_retrieval_accuracy",
]
