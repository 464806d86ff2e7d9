"""mm.encoders: see ../shared/design.md for what lives here.

Image: `ImageEncoder` (timm ViT + tile embeddings + multi-layer features + gated global layers, after
transformers' `MllamaVisionModel`) and its CLIP pretraining (`CLIPModel`, `TextTower`, `clip_loss`). Checkpoint
formats (timm weight files, Mllama's vision model) live in `mm.formats`.
"""

from .clip import CLIPModel, TextTower, clip_loss, zero_shot_retrieval_accuracy
from .image import ImageEncoder, ImageEncoderConfig, create_vit
from .image_layers import AspectRatioEmbedding, GatedBlock

__all__ = [
    "AspectRatioEmbedding",
    "CLIPModel",
    "GatedBlock",
    "ImageEncoder",
    "ImageEncoderConfig",
    "TextTower",
    "clip_loss",
    "create_vit",
    "zero_shot_retrieval_accuracy",
]
