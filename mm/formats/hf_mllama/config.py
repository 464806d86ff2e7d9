"""Mllama `config.json` -> mm's terms (`MllamaSpec`): the text model as a Llama `LMConfig` plus the
cross-attention layers' places, the vision model as an `ImageEncoderConfig` (`config_from_mllama`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mm.datasets.tiling import supported_aspect_ratios
from mm.encoders.image import ImageEncoderConfig
from mm.formats.hf_llama import config_from_hf
from mm.lm.config import LMConfig
from mm.lm.io import read_json

MLLAMA_EXTRA_TOKENS = 8  # MllamaTextModel.embed_tokens has vocab_size + 8 rows
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TRAINABLE = ("image_encoder", "image_xattn", "extra_tok_embeddings")  # the LM is always frozen

# transformers' MllamaTextConfig / MllamaVisionConfig defaults, for keys a config.json leaves out.
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5, max_position_embeddings=131072,
    initializer_range=0.02, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
)  # fmt: skip
_TEXT_DEFAULT_THETA = 500000.0
_DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8, attention_heads=16,
    num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=448, patch_size=14, norm_eps=1e-5,
    max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30], supported_aspect_ratios=_DEFAULT_ASPECT_RATIOS,
)  # fmt: skip


class MllamaCheckpointError(ValueError):
    """A Llama 3.2 Vision directory or model mm cannot map; the message names the key, found and expected."""


@dataclass
class MllamaSpec:
    """What a Mllama `config.json` describes, in mm's terms."""

    lm: LMConfig
    encoder: ImageEncoderConfig
    cross_attention_layers: list[int]  # Mllama text-layer indices of the cross-attention layers
    xattn_layers: list[int]  # the LM layer each of them precedes (same order)
    image_token_id: int

    def text_to_lm_layers(self) -> dict[int, int]:
        """Mllama text-layer index -> LM layer index, for the self-attention layers."""
        xs = set(self.cross_attention_layers)
        text = [j for j in range(self.lm.n_layers + len(xs)) if j not in xs]
        return {j: i for i, j in enumerate(text)}


# ---- layer placement ----------------------------------------------------------------------------------
def xattn_layers_from_mllama(
    cross_attention_layers: Sequence[int], num_hidden_layers: int, source: str = CONFIG_NAME
) -> list[int]:
    """Mllama's text-layer indices of cross-attention layers -> the LM layer each one precedes."""
    xs = [int(j) for j in cross_attention_layers]
    ok = (
        xs == sorted(set(xs))
        and all(0 <= j < num_hidden_layers - 1 for j in xs)
        and all(b - a > 1 for a, b in zip(xs, xs[1:]))
    )
    if not ok:
        raise MllamaCheckpointError(
            f"{source}: text_config.cross_attention_layers: found {xs}, expected increasing indices in "
            f"[0, {num_hidden_layers - 1}) (num_hidden_layers={num_hidden_layers}), no two adjacent: each "
            "cross-attention layer must precede a self-attention layer"
        )
    return [j - k for k, j in enumerate(xs)]


def xattn_layers_to_mllama(xattn_layers: Sequence[int]) -> list[int]:
    """Inverse of `xattn_layers_from_mllama`: LM layer ids -> Mllama text-layer indices."""
    return [i + k for k, i in enumerate(sorted(xattn_layers))]


def config_from_mllama(
    vision_config: Any,
    out_dim: int,
    timm_name: str = "vit_huge_patch14_224",
    intermediate_from: str | None = None,
) -> ImageEncoderConfig:
    """ImageEncoderConfig of a Mllama vision config (mask_mode "mllama"), its indices read as Meta reads them.

    `intermediate_from` None: the config's own `intermediate_from` if it has one (mm's export writes it), else
    "block_input", the meaning the released weights were trained with (Meta's reference); "block_output"
    reproduces transformers 5.x's `MllamaVisionModel` exactly.
    """
    c = vision_config
    if intermediate_from is None:
        intermediate_from = getattr(c, "intermediate_from", None) or "block_input"
    if c.hidden_act != "gelu":
        raise ValueError(
            f"MllamaVisionConfig.hidden_act={c.hidden_act!r}; only 'gelu' (erf, timm's nn.GELU) maps"
        )
    if c.norm_eps != 1e-5:
        raise ValueError(
            f"MllamaVisionConfig.norm_eps={c.norm_eps}; its layernorm_pre/post use 1e-5, so must 1e-5"
        )
    if not isinstance(c.image_size, int) or not isinstance(c.patch_size, int):
        raise ValueError(f"square tiles only: image_size={c.image_size}, patch_size={c.patch_size}")
    if c.num_channels != 3:
        raise ValueError(f"MllamaVisionConfig.num_channels={c.num_channels}; only 3 is supported")
    mlp_ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * mlp_ratio) != c.intermediate_size:
        raise ValueError(
            f"intermediate_size={c.intermediate_size} is not reachable as int(hidden_size * ratio)"
        )
    return ImageEncoderConfig(
        timm_name=timm_name,
        tile_size=c.image_size,
        patch_size=c.patch_size,
        embed_dim=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.attention_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=False,
        proj_bias=True,  # the MLP has biases; the attention output bias is loaded as zeros
        pre_norm=True,
        norm_eps=1e-5,
        intermediate_layers=tuple(c.intermediate_layers_indices),
        intermediate_from=intermediate_from,
        n_global_layers=c.num_global_layers,
        max_tiles=c.max_num_tiles,
        max_aspect_ratio_id=len(c.supported_aspect_ratios),
        out_dim=out_dim,
        mask_mode="mllama",
    )


# ---- config.json -------------------------------------------------------------------------------------
def _config_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path} (expected a Hugging Face Mllama directory)")
    return file


def _given(d: Any) -> dict[str, Any]:
    """The keys of a sub-config dict that are set (None means "use the default", as transformers)."""
    return {k: v for k, v in (d or {}).items() if v is not None}


def read_mllama_config(path: str | os.PathLike, intermediate_from: str | None = None) -> MllamaSpec:
    """Parse and check a Mllama `config.json` (the file or its directory).

    `intermediate_from` says what `intermediate_layers_indices` name (see `config_from_mllama`): by default
    the config's own `intermediate_from` (mm's export writes "block_output"), else Meta's "block_input".
    """
    file = _config_file(path)
    src = str(file)
    d = read_json(file, MllamaCheckpointError)
    if d.get("model_type") != "mllama":
        raise MllamaCheckpointError(f"{src}: model_type: found {d.get('model_type')!r}, expected 'mllama'")
    text = {**_TEXT_DEFAULTS, **_given(d.get("text_config"))}
    vision = {**_VISION_DEFAULTS, **_given(d.get("vision_config"))}

    # Text: a Llama LM whose layer count excludes the cross-attention layers.
    xs = [int(j) for j in text["cross_attention_layers"]]
    xattn = xattn_layers_from_mllama(xs, int(text["num_hidden_layers"]), src)
    rope = text.get("rope_parameters") or {}
    if text.get("rope_theta") is None and not (isinstance(rope, dict) and "rope_theta" in rope):
        text["rope_theta"] = _TEXT_DEFAULT_THETA  # MllamaTextConfig.default_theta
    llama = {k: v for k, v in text.items() if k != "head_dim"}  # Mllama: head_dim = hidden / heads
    llama.update(model_type="llama", num_hidden_layers=int(text["num_hidden_layers"]) - len(xs))
    llama["tie_word_embeddings"] = False  # Mllama's lm_head is never tied (V rows vs V + 8)
    try:
        lm_cfg = config_from_hf(llama, source=f"{src} text_config")
    except ValueError as e:
        raise MllamaCheckpointError(str(e)) from e

    # Vision: the tile grids must be the ones MllamaImageProcessor numbers its aspect-ratio ids by.
    mt = vision["max_num_tiles"]
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise MllamaCheckpointError(f"{src}: vision_config.max_num_tiles: found {mt!r}, expected an int >= 1")
    grids = [list(g) for g in supported_aspect_ratios(mt)]
    found = [list(g) for g in vision["supported_aspect_ratios"]]
    if found != grids:
        raise MllamaCheckpointError(
            f"{src}: vision_config.supported_aspect_ratios: found {found}, expected {grids} (every tile grid of "
            f"max_num_tiles={mt} in MllamaImageProcessor's order, which numbers the aspect-ratio ids)"
        )
    k = len(vision["intermediate_layers_indices"])
    want = vision["hidden_size"] * (1 + k)
    if vision["vision_output_dim"] != want:
        raise MllamaCheckpointError(
            f"{src}: vision_config.vision_output_dim: found {vision['vision_output_dim']}, expected {want} "
            f"(hidden_size {vision['hidden_size']} x (1 final + {k} intermediate layers)), the projector's input"
        )
    if vision["image_size"] % vision["patch_size"] != 0:
        raise MllamaCheckpointError(
            f"{src}: vision_config.image_size: found {vision['image_size']}, expected a multiple of "
            f"patch_size={vision['patch_size']}"
        )
    try:
        enc_cfg = config_from_mllama(
            SimpleNamespace(**vision), out_dim=lm_cfg.dim, intermediate_from=intermediate_from
        )
    except ValueError as e:
        raise MllamaCheckpointError(f"{src} vision_config: {e}") from e

    n_ids = lm_cfg.vocab_size + MLLAMA_EXTRA_TOKENS
    image_id = d.get("image_token_index", 128256)
    if not isinstance(image_id, int) or not 0 <= image_id < n_ids:
        raise MllamaCheckpointError(
            f"{src}: image_token_index: found {image_id!r}, expected an id in [0, {n_ids}) "
            f"(text_config.vocab_size {lm_cfg.vocab_size} + {MLLAMA_EXTRA_TOKENS} extra tokens)"
        )
    return MllamaSpec(lm_cfg, enc_cfg, xs, xattn, image_id)
