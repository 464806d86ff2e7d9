"""timm ViT weight files (.safetensors, or a torch file read with `weights_only=True`) -> the image encoder's
`vit`, whose parameter names are timm's own; a classifier head in the file is ignored."""

from __future__ import annotations

import os

from torch import nn

from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.lm.io import load_checked, read_tensors

# timm's training checkpoints wrap the weights in a dict under one of these keys
_WRAPPERS = ("state_dict", "model")


def load_timm_weights(vit: nn.Module, path: str | os.PathLike) -> None:
    """Load a timm ViT weights file into `vit`; a classifier head (`head.*`) in the file is ignored."""
    sd = {k: v for k, v in read_tensors(path, wrappers=_WRAPPERS).items() if not k.startswith("head.")}
    load_checked(vit, sd, str(path))


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """`ImageEncoder(cfg)` with the timm weights file `cfg.weights` (when set) loaded into its ViT."""
    encoder = ImageEncoder(cfg)
    if cfg.weights is not None:
        load_timm_weights(encoder.vit, cfg.weights)
    return encoder


__all__ = ["build_image_encoder", "load_timm_weights"]
