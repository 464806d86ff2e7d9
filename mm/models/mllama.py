"""Llama 3.2 Vision checkpoints: transformers' `MllamaForConditionalGeneration` directories <-> `MultimodalLM`
(`paper-notes.md` section 3; transformers' `models/mllama/modeling_mllama.py` is the reference for the layout).

A Mllama directory holds `config.json` (`text_config`, `vision_config`, `image_token_index`), safetensors weights
(one file or shards + index) in the layout `save_pretrained` writes and Meta's released checkpoints use, and
usually `preprocessor_config.json`:

    language_model.model.embed_tokens.weight  (V + 8, D): the LM's V rows, then 8 extra tokens (<|image|> = V)
    language_model.model.layers.{j}.*         j counts ALL text layers: self-attention layers (Llama names), and
                                              at each j in text_config.cross_attention_layers a gated
                                              cross-attention layer (cross_attn.*, cross_attn_attn_gate, ...)
    language_model.model.norm.weight, language_model.lm_head.weight (V, D)
    vision_model.*                            MllamaVisionModel (see encoders/image.py)
    multi_modal_projector.{weight,bias}       vision features -> LM width

In mm the LM stays a plain Llama `Transformer` (frozen, fingerprinted) and a `CrossAttentionBlock` sits before
the LM layer it precedes: text layer j in `cross_attention_layers` -> before LM layer j - (cross-attention layers
before j); the 11B's [3, 8, ..., 38] are the paper's "before layers 3, 7, ..., 31". The 8 extra embeddings
are `MultimodalLM.extra_tok_embeddings` (Meta's `learnable_embedding`: outside the frozen LM, trained with the
adapter); logits cover the LM's V ids. Self-attention q/k rows are permuted to our interleaved RoPE layout
(`mm.lm.hf`); the vision model maps onto `ImageEncoder` with Mllama's attention mask (`mask_mode="mllama"`)
and, as Mllama, no bias on the attention output projections (`mllama_image_encoder`).

Rows that see no image (tokens before a sequence's first `<|image|>`): by default mm zeroes their whole
cross-attention output, as Meta's reference (`full_text_row_masked_out_mask`); transformers lets them attend to
every media token and zeroes only the FFN part (its issue #39379). `load_hf_mllama(..., hf_row_compat=True)`
reproduces transformers' logits on every row; the default agrees on every row that sees an image, and the
difference enters only through the rows that see none (in a causal LM it then reaches later tokens).

Intermediate vision features: `intermediate_layers_indices` (the released [3, 7, 15, 23, 30]) name block
INPUTS in Meta's reference, which trained the weights (and in transformers 4.45), block OUTPUTS in transformers
5.x. mm reads them as Meta does; `intermediate_from="block_output"` reproduces transformers 5.x. `save_hf_mllama`
writes the indices transformers 5.x needs to compute what mm computes (each block-input index minus one) and
marks them `intermediate_from: "block_output"` in `vision_config`, so mm reads its own exports back unchanged.

Weights are read with safetensors only (never pickle). Every problem with a checkpoint is a
`MllamaCheckpointError` (a ValueError) naming the key, what was found and what was expected.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from mm.datasets.tiling import TileTransform, supported_aspect_ratios
from mm.encoders.image import (
    ImageEncoder,
    ImageEncoderConfig,
    config_from_mllama,
    load_mllama_vision_state_dict,
)
from mm.lm import Transformer
from mm.lm.config import LMConfig
from mm.lm.hf import (
    ComputedTensor,
    SafetensorsTensor,
    _rope_heads,
    config_from_hf,
    config_to_hf,
    hf_name_map,
    hf_to_mm_state_dict,
    mm_to_hf_state_dict,
)
from mm.lm.model import rope_inv_freq
from mm.models.multimodal import MultimodalLM
from mm.training.checkpoint import write_json

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
# transformers' in-memory names -> the checkpoint layout (what `save_pretrained` writes; both are read).
_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exports carry; recomputed from the config
# Cross-attention decoder layer (relative to language_model.model.layers.{j}.) -> CrossAttentionBlock.
_XATTN_NAMES = (
    ("cross_attn.q_proj.weight", "attention.wq.weight"),
    ("cross_attn.k_proj.weight", "attention.wk.weight"),
    ("cross_attn.v_proj.weight", "attention.wv.weight"),
    ("cross_attn.o_proj.weight", "attention.wo.weight"),
    ("cross_attn.q_norm.weight", "attention.q_norm.weight"),
    ("cross_attn.k_norm.weight", "attention.k_norm.weight"),
    ("cross_attn_attn_gate", "gate_attn"),
    ("cross_attn_mlp_gate", "gate_ffn"),
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
)
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_act",
    "rms_norm_eps", "max_position_embeddings", "initializer_range", "rope_parameters", "rope_theta",
    "rope_scaling", "use_cache",
)  # fmt: skip
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


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


# ---- config -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MllamaCheckpointError(f"{path} is not valid JSON: {e}") from e


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
    d = _read_json(file)
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


# ---- model skeleton -----------------------------------------------------------------------------------
def mllama_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """An `ImageEncoder` shaped as Mllama's vision model: no bias on any attention output projection."""
    encoder = ImageEncoder(cfg)
    for block in [*encoder.vit.blocks, *(g.block for g in encoder.global_layers)]:
        block.attn.proj.register_parameter("bias", None)  # timm ties it to the MLP's biases; Mllama has none
    return encoder


def build_mllama_model(
    spec: MllamaSpec, *, hf_row_compat: bool = False, trainable: tuple[str, ...] = TRAINABLE
) -> MultimodalLM:
    """A randomly initialised `MultimodalLM` of the shape `spec` describes (weights are loaded into it)."""
    return MultimodalLM(
        Transformer(spec.lm),
        mllama_image_encoder(spec.encoder),
        xattn_layers=spec.xattn_layers,
        hf_row_compat=hf_row_compat,
        trainable=trainable,
        image_token_id=spec.image_token_id,
        extra_tokens=MLLAMA_EXTRA_TOKENS,
    )


# ---- weight names -------------------------------------------------------------------------------------
def mllama_vision_state_dict(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    """Inverse of `load_mllama_vision_state_dict`: `vision_model.*` and `multi_modal_projector.*` tensors."""
    sd = dict(encoder.state_dict())
    out: dict[str, torch.Tensor] = {}
    D = encoder.width

    def take(ours: str) -> torch.Tensor:
        if ours not in sd:
            raise MllamaCheckpointError(f"image encoder has no {ours!r}, which Mllama's vision model needs")
        return sd.pop(ours)

    def put(hf: str, ours: str, shape: tuple[int, ...] | None = None) -> None:
        t = take(ours)
        out[f"vision_model.{hf}"] = t.reshape(shape) if shape is not None else t

    put("patch_embedding.weight", "vit.patch_embed.proj.weight")
    put("class_embedding", "vit.cls_token", (D,))
    put("gated_positional_embedding.embedding", "vit.pos_embed", (-1, D))
    put("gated_positional_embedding.gate", "pos_gate")
    put("gated_positional_embedding.tile_embedding.weight", "tile_pos_embed.weight")
    for which in ("pre_tile", "post_tile"):
        put(f"{which}_positional_embedding.embedding.weight", f"{which}.embedding.weight")
        put(f"{which}_positional_embedding.gate", f"{which}.gate")
    for part in ("weight", "bias"):
        put(f"layernorm_pre.{part}", f"vit.norm_pre.{part}")
        put(f"layernorm_post.{part}", f"vit.norm.{part}")
    stacks = [
        ("transformer", "vit.blocks", len(encoder.vit.blocks), ""),
        ("global_transformer", "global_layers", len(encoder.global_layers), "block."),
    ]
    for hf_stack, ours, n, inner in stacks:
        for i in range(n):
            h, o = f"{hf_stack}.layers.{i}.", f"{ours}.{i}.{inner}"
            for p, t in zip("qkv", take(f"{o}attn.qkv.weight").chunk(3, dim=0)):  # timm's fused q, k, v rows
                out[f"vision_model.{h}self_attn.{p}_proj.weight"] = t
            put(f"{h}self_attn.o_proj.weight", f"{o}attn.proj.weight")
            for part in ("weight", "bias"):
                put(f"{h}mlp.fc1.{part}", f"{o}mlp.fc1.{part}")
                put(f"{h}mlp.fc2.{part}", f"{o}mlp.fc2.{part}")
                put(f"{h}input_layernorm.{part}", f"{o}norm1.{part}")
                put(f"{h}post_attention_layernorm.{part}", f"{o}norm2.{part}")
            if hf_stack == "global_transformer":
                put(f"{h}gate_attn", f"global_layers.{i}.gate_attn")
                put(f"{h}gate_ffn", f"global_layers.{i}.gate_ffn")
    out["multi_modal_projector.weight"] = take("project.weight")
    out["multi_modal_projector.bias"] = take("project.bias")
    if sd:
        raise MllamaCheckpointError(
            f"image encoder tensors with no place in Mllama's vision model: {sorted(sd)} (expected none; "
            "build the encoder with `mllama_image_encoder` and `config_from_mllama`)"
        )
    return out


def mm_to_mllama_state_dict(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under its Mllama checkpoint name (the layout `save_pretrained` writes)."""
    c = model.lm.cfg
    sd = model.state_dict()
    llama = mm_to_hf_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("lm.")}, c)
    xs = sorted(model.xattn_layers)
    out: dict[str, torch.Tensor] = {}
    extra = sd.get("extra_tok_embeddings.weight")
    if extra is None:  # a model without Mllama's extra tokens uses none of them: zero rows
        extra = llama["model.embed_tokens.weight"].new_zeros(MLLAMA_EXTRA_TOKENS, c.dim)
    if extra.shape[0] != MLLAMA_EXTRA_TOKENS:
        raise MllamaCheckpointError(
            f"extra_tok_embeddings.weight: found {extra.shape[0]} extra tokens, expected {MLLAMA_EXTRA_TOKENS}"
        )
    out["language_model.model.embed_tokens.weight"] = torch.cat([llama["model.embed_tokens.weight"], extra])
    out["language_model.model.norm.weight"] = llama["model.norm.weight"]
    out["language_model.lm_head.weight"] = llama.get("lm_head.weight", llama["model.embed_tokens.weight"])
    for name, t in llama.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            i = int(m[1])
            j = i + sum(x <= i for x in xs)  # the cross-attention layers before it count as text layers
            out[f"language_model.model.layers.{j}.{m[2]}"] = t
    for j, i in zip(xattn_layers_to_mllama(xs), xs):
        for hf, ours in _XATTN_NAMES:
            out[f"language_model.model.layers.{j}.{hf}"] = sd[f"image_xattn.{i}.{ours}"]
    if not isinstance(model.image_encoder, ImageEncoder):
        raise MllamaCheckpointError(
            f"image_encoder: found {type(model.image_encoder).__name__}, expected an ImageEncoder"
        )
    out.update(mllama_vision_state_dict(model.image_encoder))
    return out


def _lm_state_from_mllama(hf: Mapping[str, torch.Tensor], spec: MllamaSpec) -> dict[str, torch.Tensor]:
    """The LM's state dict (our names, q/k in the interleaved layout) from Mllama tensors."""
    V = spec.lm.vocab_size
    llama = {
        "model.embed_tokens.weight": hf["language_model.model.embed_tokens.weight"][:V],
        "model.norm.weight": hf["language_model.model.norm.weight"],
        "lm_head.weight": hf["language_model.lm_head.weight"],
    }
    for j, i in spec.text_to_lm_layers().items():
        prefix = f"language_model.model.layers.{j}."
        for name, t in hf.items():
            if name.startswith(prefix):
                llama[f"model.layers.{i}.{name[len(prefix) :]}"] = t
    return hf_to_mm_state_dict(llama, spec.lm)


# ---- reading tensors ----------------------------------------------------------------------------------
def _canonical(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _tensor_locations(path: Path) -> dict[str, tuple[Path, str]]:
    """Canonical tensor name -> (safetensors file, name in the file), over one file or all shards."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MllamaCheckpointError(f"{index}: 'weight_map': found none, expected a dict name -> shard")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index} is missing (expected {f})")
    else:
        pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        hint = (
            f" (found {pickled[0]}: pickle checkpoints are not loaded, convert to safetensors)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"no weights in {path}: looked for {WEIGHTS_NAME} and {INDEX_NAME}{hint}")
    out: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name in h.keys():
                out[_canonical(name)] = (f, name)
    return out


def _read_tensors(
    path: Path,
    expected: Mapping[str, tuple[int, ...]],
    *,
    dtype: torch.dtype,
    allow_unexpected: bool = False,
) -> dict[str, torch.Tensor]:
    """The `expected` tensors (checked by name and shape) from the directory's safetensors, on CPU in `dtype`."""
    where = _tensor_locations(path)
    _check_tensors(path, expected, where, allow_unexpected=allow_unexpected)
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(where[k][0], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for k in names:
                out[k] = f.get_tensor(where[k][1]).to(dtype)
    return out


def _check_tensors(
    path: Path,
    expected: Mapping[str, tuple[int, ...]],
    where: Mapping[str, tuple[Path, str]],
    *,
    allow_unexpected: bool,
) -> None:
    """Refuse missing, unexpected (unless allowed) or misshapen tensors (reads only the files' headers)."""
    missing = [k for k in expected if k not in where]
    if missing:
        more = f" ({len(missing) - 1} more missing, e.g. {missing[1:4]})" if len(missing) > 1 else ""
        raise MllamaCheckpointError(
            f"{path}: tensor {missing[0]!r} is missing; expected shape {expected[missing[0]]}{more}"
        )
    unexpected = sorted(k for k in where if k not in expected and not _IGNORED.search(k))
    if unexpected and not allow_unexpected:
        raise MllamaCheckpointError(
            f"{path}: unexpected tensor {unexpected[0]!r}: found in the weights, expected none of that name "
            f"for the model config.json describes ({len(unexpected)} such tensors)"
        )
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(where[k][0], []).append(k)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for k in names:
                shape = tuple(f.get_slice(where[k][1]).get_shape())
                if shape != expected[k]:
                    raise MllamaCheckpointError(
                        f"{file}: tensor {k!r} has shape {shape}, expected {expected[k]}"
                    )


def _check_mapped_state(path: Path, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    """Refuse weights that do not fill the model `config.json` describes (LM, cross-attention, extra tokens)."""
    weights = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else path / INDEX_NAME
    if missing:
        raise MllamaCheckpointError(
            f"{weights}: no tensor maps to model key {missing[0]!r} ({len(missing)} such keys); expected "
            f"the weights to hold every language-model, cross-attention and extra-token tensor of the model "
            f"{path / CONFIG_NAME} describes"
        )
    if unexpected:
        raise MllamaCheckpointError(
            f"{weights}: tensor mapped to {unexpected[0]!r} ({len(unexpected)} such tensors) has no place in "
            f"the model {path / CONFIG_NAME} describes; expected none"
        )


def _expected_shapes(model: MultimodalLM) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in mm_to_mllama_state_dict(model).items()}


def _directory(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face Mllama folder)")
    return path


# ---- loading ------------------------------------------------------------------------------------------
@torch.no_grad()
def load_hf_mllama(
    path: str | os.PathLike,
    *,
    hf_row_compat: bool = False,
    intermediate_from: str | None = None,
    trainable: tuple[str, ...] = TRAINABLE,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    lm_dtype: torch.dtype | None = None,
) -> MultimodalLM:
    """Load a transformers `MllamaForConditionalGeneration` directory as a `MultimodalLM` (LM frozen).

    `device="meta"` reads lazily, for a build recorded by `mm.training.materialize.record_init`: the LM, its
    extra token embeddings and the cross-attention layers stay on the meta device with a `lazy_source` each
    (a sharded run reads only each process's rows; the LM in `lm_dtype` when its tensors are stored in it),
    the vision model's tensors are read whole (its q, k, v are fused) and copied in by recorded operations.

    `hf_row_compat=True` reproduces transformers' logits also on rows that see no image (module docstring);
    `intermediate_from="block_output"` reproduces transformers 5.x's vision features (the default reads the
    indices as Meta's reference does, which trained the released weights; see `config_from_mllama`).
    A `preprocessor_config.json` beside the weights is checked against the vision config.
    """
    path = _directory(path)
    spec = read_mllama_config(path, intermediate_from)
    if (path / PREPROCESSOR_NAME).is_file():
        load_hf_mllama_transform(path)  # tile size and tile count must agree with the vision model
    with _disable_current_modes(), torch.device("meta"):  # shapes only; no random init recorded by anyone
        model = build_mllama_model(spec, hf_row_compat=hf_row_compat, trainable=trainable)
        expected = _expected_shapes(model)
    if torch.device(device).type == "meta":
        return _lazy_mllama(path, spec, model, expected, dtype, lm_dtype or dtype, trainable)
    hf = _read_tensors(path, expected, dtype=dtype)
    model.to(dtype=dtype).to_empty(device=device)

    sd = {f"lm.{k}": v for k, v in _lm_state_from_mllama(hf, spec).items()}
    sd["extra_tok_embeddings.weight"] = hf["language_model.model.embed_tokens.weight"][spec.lm.vocab_size :]
    for j, i in zip(spec.cross_attention_layers, spec.xattn_layers):
        for name, ours in _XATTN_NAMES:
            sd[f"image_xattn.{i}.{ours}"] = hf[f"language_model.model.layers.{j}.{name}"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    _check_mapped_state(path, [k for k in missing if not k.startswith("image_encoder.")], unexpected)
    vision = {k[len("vision_model.") :]: v for k, v in hf.items() if k.startswith("vision_model.")}
    projector = {p: hf[f"multi_modal_projector.{p}"] for p in ("weight", "bias")}
    load_mllama_vision_state_dict(model.image_encoder, vision, projector)
    model.lm.inv_freq = rope_inv_freq(spec.lm.hd, spec.lm.rope_theta, spec.lm.rope_scaling).to(device)
    model.set_trainable(trainable)
    return model.eval()


def _lazy_mllama(
    path: Path,
    spec: MllamaSpec,
    model: MultimodalLM,
    expected: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    lm_dtype: torch.dtype,
    trainable: tuple[str, ...],
) -> MultimodalLM:
    """`load_hf_mllama(..., device="meta")`: sources for the language side, the vision side read whole."""
    where = _tensor_locations(path)
    _check_tensors(path, expected, where, allow_unexpected=False)
    lm_keys = [k for k in expected if k.startswith("language_model.")]
    with safe_open(str(where[lm_keys[0]][0]), framework="pt", device="cpu") as f:
        stored = f.get_slice(where[lm_keys[0]][1]).get_dtype()
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    if names.get(stored) != lm_dtype:
        lm_dtype = dtype  # kept in lm_dtype only when stored in it: nothing is rounded
    with _disable_current_modes():
        model.to(dtype=dtype)
        model.lm.to(dtype=lm_dtype)
    params = dict(model.named_parameters())
    c = spec.lm

    def lazy(ours: str, hf: str, heads: int | None = None, row0: int = 0) -> None:
        p = params[ours]
        file, key = where[hf]
        p.lazy_source = SafetensorsTensor(file, key, p.shape[0], heads, c.hd, p.dtype, row0)

    layer = {i: j for j, i in spec.text_to_lm_layers().items()}  # LM layer -> Mllama text layer
    top = {
        "model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "model.norm.weight": "language_model.model.norm.weight",
        "lm_head.weight": "language_model.lm_head.weight",
    }
    for hf, ours in hf_name_map(c).items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
        src = f"language_model.model.layers.{layer[int(m[1])]}.{m[2]}" if m else top[hf]
        lazy(f"lm.{ours}", src, _rope_heads(hf, c))
    lazy("extra_tok_embeddings.weight", "language_model.model.embed_tokens.weight", row0=c.vocab_size)
    for j, i in zip(spec.cross_attention_layers, spec.xattn_layers, strict=True):
        for name, ours in _XATTN_NAMES:
            lazy(f"image_xattn.{i}.{ours}", f"language_model.model.layers.{j}.{name}")
    model.lm.inv_freq.lazy_source = ComputedTensor(
        functools.partial(rope_inv_freq, c.hd, c.rope_theta, c.rope_scaling)
    )
    vision = {k: v for k, v in expected.items() if not k.startswith("language_model.")}
    hf = _read_tensors(path, vision, dtype=dtype, allow_unexpected=True)
    load_mllama_vision_state_dict(
        model.image_encoder,
        {k[len("vision_model.") :]: v for k, v in hf.items() if k.startswith("vision_model.")},
        {p: hf[f"multi_modal_projector.{p}"] for p in ("weight", "bias")},
    )
    model.set_trainable(trainable)
    return model.eval()


@torch.no_grad()
def load_hf_mllama_lm(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Only the language model of a Mllama directory, as a plain Llama `Transformer` (q/k permuted)."""
    path = _directory(path)
    spec = read_mllama_config(path)
    with torch.device("meta"):
        skeleton = build_mllama_model(spec)
    xs = {f"language_model.model.layers.{j}." for j in spec.cross_attention_layers}
    expected = {
        k: s
        for k, s in _expected_shapes(skeleton).items()
        if k.startswith("language_model.") and not any(k.startswith(x) for x in xs)
    }
    hf = _read_tensors(path, expected, dtype=dtype, allow_unexpected=True)
    lm = skeleton.lm.to(dtype=dtype).to_empty(device=device)
    lm.load_state_dict(_lm_state_from_mllama(hf, spec), strict=True)
    lm.inv_freq = rope_inv_freq(spec.lm.hd, spec.lm.rope_theta, spec.lm.rope_scaling).to(device)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.eval()


def load_hf_mllama_transform(
    path: str | os.PathLike, *, max_tiles: int | None = None, backend: str = "torchvision"
) -> TileTransform:
    """Our tiling transform from the directory's `preprocessor_config.json`, checked against its config.json.

    `max_tiles` below the checkpoint's tiles fewer, keeping the checkpoint's aspect-ratio ids (a stage at
    lower resolution); by default the transform equals `MllamaImageProcessor` of that file.
    """
    path = _directory(path)
    spec = read_mllama_config(path)
    file = path / PREPROCESSOR_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {PREPROCESSOR_NAME} in {path} (expected {file})")
    t = TileTransform.from_hf_preprocessor_config(file, backend=backend)
    enc = spec.encoder
    if t.tile_size != enc.tile_size:
        raise MllamaCheckpointError(
            f"{file}: size.height: found {t.tile_size}, expected {enc.tile_size} (vision_config.image_size)"
        )
    if t.max_tiles != enc.max_tiles:
        raise MllamaCheckpointError(
            f"{file}: max_image_tiles: found {t.max_tiles}, expected {enc.max_tiles} (vision_config.max_num_tiles)"
        )
    if max_tiles is None or max_tiles == t.max_tiles:
        return t
    if not 1 <= max_tiles <= t.max_tiles:
        raise MllamaCheckpointError(
            f"max_tiles: found {max_tiles}, expected 1..{t.max_tiles} (the checkpoint's)"
        )
    return TileTransform(
        t.tile_size, max_tiles, t.mean, t.std, resample=t.resample, backend=backend, id_max_tiles=t.max_tiles
    )


def mllama_image_inputs(transform: TileTransform, images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
    """`MllamaImageProcessor`'s batch from our transform: images per row -> pixel_values, aspect_ratio_ids,
    aspect_ratio_mask (first tile 1 also for padding images, as transformers) and num_tiles."""
    tiled = [[transform(im) for im in row] for row in images]
    B, N, T = len(tiled), max((len(row) for row in tiled), default=0), transform.max_tiles
    if N == 0:
        raise ValueError("mllama_image_inputs needs at least one image")
    S = transform.tile_size
    pixel_values = torch.zeros(B, N, T, 3, S, S)
    aspect_ratio_ids = torch.zeros(B, N, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(B, N, T, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1
    for b, row in enumerate(tiled):
        for n, im in enumerate(row):
            pixel_values[b, n, : im.n_tiles] = im.tiles
            aspect_ratio_ids[b, n] = im.aspect_ratio_id
            aspect_ratio_mask[b, n, : im.n_tiles] = 1
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
        "num_tiles": [[im.n_tiles for im in row] for row in tiled],
    }


# ---- saving -------------------------------------------------------------------------------------------
def mllama_config(
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
    config = mllama_config(model, token_ids=token_ids, dtype=dtype)
    if transform is not None:
        enc = model.image_encoder.cfg
        if (transform.tile_size, transform.max_tiles) != (enc.tile_size, enc.max_tiles):
            raise MllamaCheckpointError(
                f"transform tile_size/max_tiles: found {(transform.tile_size, transform.max_tiles)}, expected "
                f"{(enc.tile_size, enc.max_tiles)} (the image encoder's)"
            )
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in mm_to_mllama_state_dict(model).items()}
    tmp = path / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    try:
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in [path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:  # an earlier sharded save
        stale.unlink(missing_ok=True)
    if transform is not None:
        write_json(preprocessor_config(transform), path / PREPROCESSOR_NAME)
    write_json(config, path / CONFIG_NAME)
    return path


__all__ = [
    "MLLAMA_EXTRA_TOKENS",
    "MllamaCheckpointError",
    "MllamaSpec",
    "build_mllama_model",
    "load_hf_mllama",
    "load_hf_mllama_lm",
    "load_hf_mllama_transform",
    "mllama_config",
    "mllama_image_encoder",
    "mllama_image_inputs",
    "mllama_vision_state_dict",
    "mm_to_mllama_state_dict",
    "preprocessor_config",
    "read_mllama_config",
    "save_hf_mllama",
    "xattn_layers_from_mllama",
    "xattn_layers_to_mllama",
]
