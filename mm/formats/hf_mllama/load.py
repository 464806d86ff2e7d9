"""Loading a transformers `MllamaForConditionalGeneration` directory as a `MultimodalLM` (whole, or lazily on the
meta device), only its language model, or its image transform (see the package docstring)."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch.utils._python_dispatch import _disable_current_modes

from mm.datasets.tiling import TileTransform
from mm.formats.hf_llama import (
    ComputedTensor,
    SafetensorsTensor,
    hf_name_map,
    hf_to_mm_state_dict,
    rope_heads,
)
from mm.formats.hf_mllama.config import (
    MLLAMA_EXTRA_TOKENS,
    PREPROCESSOR_NAME,
    TRAINABLE,
    MllamaCheckpointError,
    MllamaSpec,
    read_mllama_config,
)
from mm.formats.hf_mllama.files import (
    check_mapped_state,
    check_tensors,
    directory,
    expected_shapes,
    read_expected,
    tensor_locations,
)
from mm.formats.hf_mllama.text import XATTN_NAMES
from mm.formats.hf_mllama.vision import (
    lazy_mllama_vision,
    load_mllama_vision_state_dict,
    mllama_image_encoder,
)
from mm.lm import Transformer
from mm.lm.model import rope_inv_freq
from mm.models.multimodal import MultimodalLM


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
    and so do the vision model's parameters (`lazy_mllama_vision`: timm's fused q, k, v rows read from the three
    stored projections).

    `hf_row_compat=True` reproduces transformers' logits also on rows that see no image (module docstring);
    `intermediate_from="block_output"` reproduces transformers 5.x's vision features (the default reads the
    indices as Meta's reference does, which trained the released weights; see `config_from_mllama`).
    A `preprocessor_config.json` beside the weights is checked against the vision config.
    """
    path = directory(path)
    spec = read_mllama_config(path, intermediate_from)
    if (path / PREPROCESSOR_NAME).is_file():
        load_hf_mllama_transform(path)  # tile size and tile count must agree with the vision model
    with _disable_current_modes(), torch.device("meta"):  # shapes only; no random init recorded by anyone
        model = build_mllama_model(spec, hf_row_compat=hf_row_compat, trainable=trainable)
        expected = expected_shapes(model)
    if torch.device(device).type == "meta":
        return _lazy_mllama(path, spec, model, expected, dtype, lm_dtype or dtype, trainable)
    hf = read_expected(path, expected, dtype=dtype)
    model.to(dtype=dtype).to_empty(device=device)

    sd = {f"lm.{k}": v for k, v in _lm_state_from_mllama(hf, spec).items()}
    sd["extra_tok_embeddings.weight"] = hf["language_model.model.embed_tokens.weight"][spec.lm.vocab_size :]
    for j, i in zip(spec.cross_attention_layers, spec.xattn_layers):
        for name, ours in XATTN_NAMES:
            sd[f"image_xattn.{i}.{ours}"] = hf[f"language_model.model.layers.{j}.{name}"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    check_mapped_state(path, [k for k in missing if not k.startswith("image_encoder.")], unexpected)
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
    """`load_hf_mllama(..., device="meta")`: a lazy source for every parameter, language and vision side."""
    where = tensor_locations(path)
    check_tensors(path, expected, where, allow_unexpected=False)
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
        lazy(f"lm.{ours}", src, rope_heads(hf, c))
    lazy("extra_tok_embeddings.weight", "language_model.model.embed_tokens.weight", row0=c.vocab_size)
    for j, i in zip(spec.cross_attention_layers, spec.xattn_layers, strict=True):
        for name, ours in XATTN_NAMES:
            lazy(f"image_xattn.{i}.{ours}", f"language_model.model.layers.{j}.{name}")
    model.lm.inv_freq.lazy_source = ComputedTensor(
        functools.partial(rope_inv_freq, c.hd, c.rope_theta, c.rope_scaling)
    )
    lazy_mllama_vision(model.image_encoder, where)  # each process reads its rows of the vision tensors too
    model.set_trainable(trainable)
    return model.eval()


@torch.no_grad()
def load_hf_mllama_lm(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Only the language model of a Mllama directory, as a plain Llama `Transformer` (q/k permuted)."""
    path = directory(path)
    spec = read_mllama_config(path)
    with torch.device("meta"):
        skeleton = build_mllama_model(spec)
    xs = {f"language_model.model.layers.{j}." for j in spec.cross_attention_layers}
    expected = {
        k: s
        for k, s in expected_shapes(skeleton).items()
        if k.startswith("language_model.") and not any(k.startswith(x) for x in xs)
    }
    hf = read_expected(path, expected, dtype=dtype, allow_unexpected=True)
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
    path = directory(path)
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
