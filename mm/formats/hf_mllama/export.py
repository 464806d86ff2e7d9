"""Writing a `MultimodalLM` as a transformers `MllamaForConditionalGeneration` directory: `config.json`
(`mllama_config_json`), the weights, and `preprocessor_config.json` for `MllamaImageProcessor`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mm.datasets.tiling import TileTransform, supported_aspect_ratios
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.formats.hf_llama import config_to_hf
from mm.formats.hf_mllama.config import (
    CONFIG_NAME,
    INDEX_NAME,
    PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    MllamaCheckpointError,
    xattn_layers_to_mllama,
)
from mm.formats.hf_mllama.text import mm_to_mllama_state_dict
from mm.lm.io import atomic_write, write_json
from mm.models.multimodal import MultimodalLM

_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_act",
    "rms_norm_eps", "max_position_embeddings", "initializer_range", "rope_parameters", "rope_theta",
    "rope_scaling", "use_cache",
)  # fmt: skip
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


# ---- saving -------------------------------------------------------------------------------------------
def mllama_config_json(
    model: MultimodalLM, *, token_ids: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """The `config.json` dict of `model` as a `MllamaForConditionalGeneration` (checks it is one)."""
    c = model.lm.cfg
    if c.hd != c.dim // c.n_heads:
        raise MllamaCheckpointError(
            f"lm head_dim: found {c.hd}, expected hidden_size / num_attention_heads = {c.dim // c.n_heads}"
        )
    enc = model.image_encoder
    if not isinstance(enc, ImageEncoder):
        raise MllamaCheckpointError(f"image_encoder: found {type(enc).__name__}, expected an ImageEncoder")
    ec, vit, blk = enc.cfg, enc.vit, enc.vit.blocks[0]
    grids = [list(g) for g in supported_aspect_ratios(ec.max_tiles)]
    eps = sorted({m.eps for m in enc.modules() if isinstance(m, nn.LayerNorm)})
    act = blk.mlp.act
    checks = [
        ("image_encoder mask_mode", ec.mask_mode, "mllama"),
        ("image_encoder max_aspect_ratio_id", ec.max_aspect_ratio_id, len(grids)),
        ("image_encoder prefix tokens", (vit.cls_token is not None, vit.num_prefix_tokens), (True, 1)),
        ("image_encoder no_embed_class", vit.no_embed_class, False),
        ("image_encoder LayerNorm eps", eps, [1e-5]),
        ("image_encoder MLP activation", repr(act), "GELU(approximate='none')"),
    ]
    for what, found, want in checks:
        if found != want:
            raise MllamaCheckpointError(
                f"{what}: found {found!r}, expected {want!r} (as Mllama's vision model)"
            )
    dtype_name = str(dtype).removeprefix("torch.")
    llama = config_to_hf(c, dtype)
    xs = sorted(model.xattn_layers)
    text = {k: llama[k] for k in _TEXT_KEYS}
    text.update(
        model_type="mllama_text_model",
        num_hidden_layers=c.n_layers + len(xs),
        cross_attention_layers=xattn_layers_to_mllama(xs),
        tie_word_embeddings=False,
        dropout=0.0,
        bos_token_id=128000,  # MllamaTextConfig's defaults (it requires an int bos); pass `token_ids`
        eos_token_id=None,
        pad_token_id=None,
    )
    unknown = sorted(set(token_ids or {}) - set(_TOKEN_ID_KEYS))
    if unknown:
        raise ValueError(f"token_ids: unknown keys {unknown}; allowed: {list(_TOKEN_ID_KEYS)}")
    text.update(token_ids or {})
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": enc.width,
        "hidden_act": "gelu",
        "num_hidden_layers": len(vit.blocks),
        "num_global_layers": len(enc.global_layers),
        "attention_heads": blk.attn.num_heads,
        "num_channels": 3,
        "intermediate_size": blk.mlp.fc1.out_features,
        "vision_output_dim": enc.features_dim,
        "image_size": ec.tile_size,
        "patch_size": ec.patch_size,
        "norm_eps": 1e-5,
        "max_num_tiles": ec.max_tiles,
        # transformers 5.x reads each index as a block's output: an index of Meta's kind (a block's input) is
        # written as the block before it, and marked, so mm reads the directory back the same way
        "intermediate_layers_indices": _block_output_indices(ec),
        "intermediate_from": "block_output",
        "supported_aspect_ratios": grids,
        "initializer_range": c.init_std,
    }
    image_id = model.image_token_id if model.image_token_id is not None else c.vocab_size
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": image_id,
        "text_config": text,
        "vision_config": vision,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _block_output_indices(ec: ImageEncoderConfig) -> list[int]:
    """The encoder's intermediate layers as transformers 5.x indexes them (each a block's output)."""
    if ec.intermediate_from == "block_output":
        return list(ec.intermediate_layers)
    if 0 in ec.intermediate_layers:
        raise MllamaCheckpointError(
            f"image_encoder intermediate_layers {list(ec.intermediate_layers)} with intermediate_from "
            "'block_input': index 0 (the embedded tiles, before any block) has no transformers 5.x index, "
            "which names block outputs; expected indices >= 1, or intermediate_from 'block_output'"
        )
    return [i - 1 for i in ec.intermediate_layers]


def preprocessor_config(transform: TileTransform) -> dict[str, Any]:
    """A `preprocessor_config.json` dict for `MllamaImageProcessor` equal to `transform`."""
    if transform.id_grids != transform.grids:
        raise MllamaCheckpointError(
            f"transform tiles at most {transform.max_tiles} tiles but numbers its aspect-ratio ids for "
            f"{len(transform.id_grids)} grids; MllamaImageProcessor cannot (expected id_max_tiles == max_tiles)"
        )
    s = transform.tile_size
    return {
        "image_processor_type": "MllamaImageProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(transform.mean),
        "image_std": list(transform.std),
        "max_image_tiles": transform.max_tiles,
        "resample": _PIL_RESAMPLE[transform.resample],
        "rescale_factor": 1 / 255,
        "size": {"height": s, "width": s},
    }


@torch.no_grad()
def save_hf_mllama(
    model: MultimodalLM,
    path: str | os.PathLike,
    *,
    token_ids: Mapping[str, Any] | None = None,
    transform: TileTransform | None = None,
) -> Path:
    """Save `model` as a transformers `MllamaForConditionalGeneration` directory; returns the directory.

    Writes `model.safetensors` and `config.json` (last), and `preprocessor_config.json` when `transform` is
    given. `token_ids` sets text_config's bos/eos/pad ids (our model knows none; transformers needs an int bos).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.lm.tok_embeddings.weight.dtype
    config = mllama_config_json(model, token_ids=token_ids, dtype=dtype)
    if transform is not None:
        enc = model.image_encoder.cfg
        if (transform.tile_size, transform.max_tiles) != (enc.tile_size, enc.max_tiles):
            raise MllamaCheckpointError(
                f"transform tile_size/max_tiles: found {(transform.tile_size, transform.max_tiles)}, expected "
                f"{(enc.tile_size, enc.max_tiles)} (the image encoder's)"
            )
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in mm_to_mllama_state_dict(model).items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    for stale in [path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:  # an earlier sharded save
        stale.unlink(missing_ok=True)
    if transform is not None:
        write_json(preprocessor_config(transform), path / PREPROCESSOR_NAME)
    write_json(config, path / CONFIG_NAME)
    return path
