"""Mllama's vision model and projector tensors <-> our `ImageEncoder` (timm ViT names, q/k/v fused)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.formats.hf_llama import ComputedTensor, SafetensorsTensor
from mm.formats.hf_mllama.config import MllamaCheckpointError
from mm.lm.io import load_checked


def mllama_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """An `ImageEncoder` shaped as Mllama's vision model: no bias on any attention output projection."""
    encoder = ImageEncoder(cfg)
    for block in [*encoder.vit.blocks, *(g.block for g in encoder.global_layers)]:
        block.attn.proj.register_parameter("bias", None)  # timm ties it to the MLP's biases; Mllama has none
    return encoder


def _vision_names(
    encoder: ImageEncoder,
) -> tuple[list[tuple[str, str]], dict[str, tuple[tuple[int, ...], ...]]]:
    """(Mllama name, our name) of every vision tensor in checkpoint order, and {our name: (Mllama shape, our
    shape)} for the two that differ in shape. A Mllama name with "{}" stands for its q, k and v projections,
    which timm fuses into one `attn.qkv.weight` (q rows, then k, then v)."""
    D = encoder.width
    names = [
        ("patch_embedding.weight", "vit.patch_embed.proj.weight"),
        ("class_embedding", "vit.cls_token"),
        ("gated_positional_embedding.embedding", "vit.pos_embed"),
        ("gated_positional_embedding.gate", "pos_gate"),
        ("gated_positional_embedding.tile_embedding.weight", "tile_pos_embed.weight"),
    ]
    for which in ("pre_tile", "post_tile"):
        names.append((f"{which}_positional_embedding.embedding.weight", f"{which}.embedding.weight"))
        names.append((f"{which}_positional_embedding.gate", f"{which}.gate"))
    for part in ("weight", "bias"):
        names += [
            (f"layernorm_pre.{part}", f"vit.norm_pre.{part}"),
            (f"layernorm_post.{part}", f"vit.norm.{part}"),
        ]
    stacks = [
        ("transformer", "vit.blocks", len(encoder.vit.blocks), ""),
        ("global_transformer", "global_layers", len(encoder.global_layers), "block."),
    ]
    for hf_stack, ours, n, inner in stacks:
        for i in range(n):
            h, o = f"{hf_stack}.layers.{i}.", f"{ours}.{i}.{inner}"
            names.append((f"{h}self_attn.{{}}_proj.weight", f"{o}attn.qkv.weight"))
            names.append((f"{h}self_attn.o_proj.weight", f"{o}attn.proj.weight"))
            for part in ("weight", "bias"):
                names.append((f"{h}mlp.fc1.{part}", f"{o}mlp.fc1.{part}"))
                names.append((f"{h}mlp.fc2.{part}", f"{o}mlp.fc2.{part}"))
                names.append((f"{h}input_layernorm.{part}", f"{o}norm1.{part}"))
                names.append((f"{h}post_attention_layernorm.{part}", f"{o}norm2.{part}"))
            if hf_stack == "global_transformer":
                names.append((f"{h}gate_attn", f"global_layers.{i}.gate_attn"))
                names.append((f"{h}gate_ffn", f"global_layers.{i}.gate_ffn"))
    shapes = {"vit.cls_token": ((D,), (1, 1, D)), "vit.pos_embed": ((-1, D), (1, -1, D))}
    return names, shapes


def load_mllama_vision_state_dict(
    encoder: ImageEncoder,
    vision_state_dict: Mapping[str, torch.Tensor],
    projector_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Copy transformers' `MllamaVisionModel` weights (its own key names, no prefix) into `encoder`.

    `projector_state_dict` ({"weight", "bias"} of MllamaModel's `multi_modal_projector`) goes to
    `encoder.project`; without it `project` is left as it is. Our biases that Mllama lacks (attention output
    projection, and qkv/patch-embedding if the encoder has them) are set to zero. Any Mllama key left unused,
    or any other of our keys left unfilled, is an error naming it.
    """
    hf = dict(vision_state_dict)
    out: dict[str, torch.Tensor] = {}
    names, shapes = _vision_names(encoder)
    for hf_key, ours in names:
        if "{}" in hf_key:
            qkv = [hf.pop(hf_key.format(p), None) for p in "qkv"]
            if any(t is None for t in qkv):
                raise KeyError(f"Mllama vision state dict lacks {hf_key.format('{q,k,v}')}")
            out[ours] = torch.cat(qkv, dim=0)  # timm's fused (3 * D, D), q then k then v
            continue
        if hf_key not in hf:
            raise KeyError(f"Mllama vision state dict has no {hf_key!r}")
        t = hf.pop(hf_key)
        out[ours] = t.reshape(shapes[ours][1]) if ours in shapes else t
    current = encoder.state_dict()
    proj = {"weight": current["project.weight"], "bias": current["project.bias"]}
    if projector_state_dict is not None:
        if set(projector_state_dict) != {"weight", "bias"}:
            raise ValueError(
                f"projector state dict must hold 'weight' and 'bias', got {sorted(projector_state_dict)}"
            )
        proj = dict(projector_state_dict)
    out["project.weight"], out["project.bias"] = proj["weight"], proj["bias"]
    if hf:
        raise ValueError(f"Mllama vision keys with no place in ImageEncoder: {sorted(hf)}")
    zero_ok = (".attn.proj.bias", ".attn.qkv.bias", "patch_embed.proj.bias")
    for k, v in current.items():
        if k not in out and k.endswith(zero_ok):
            out[k] = torch.zeros_like(v)
    load_checked(encoder, out, "Mllama vision state dict")


@dataclass(frozen=True)
class ConcatRows:
    """A lazily read tensor that is several stored tensors concatenated along dim 0 (timm's fused q, k, v rows);
    `read(start, stop)` reads only the stored rows that fall in start:stop."""

    parts: tuple[SafetensorsTensor, ...]

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of the concatenation, on the CPU."""
        stop = sum(p.rows for p in self.parts) if stop is None else stop
        out, offset = [], 0
        for p in self.parts:
            lo, hi = max(start, offset), min(stop, offset + p.rows)
            if lo < hi:
                out.append(p.read(lo - offset, hi - offset))
            offset += p.rows
        return torch.cat(out, dim=0)


@dataclass(frozen=True)
class Reshaped:
    """A small stored tensor read whole and reshaped to ours (the class token (D,) -> (1, 1, D), the position
    embedding (N, D) -> (1, N, D): dim 0 of ours is 1, so rows of ours are not rows of the stored one)."""

    source: SafetensorsTensor
    shape: tuple[int, ...]

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of the reshaped tensor."""
        return self.source.read().reshape(self.shape)[start:stop]


def lazy_mllama_vision(encoder: ImageEncoder, where: Mapping[str, tuple[Path, str]]) -> None:
    """Give every parameter of a meta-device `encoder` a `lazy_source` reading its values from the Mllama
    checkpoint's `vision_model.*` and `multi_modal_projector.*` tensors (`where`: canonical name -> (file, name
    in it); names and shapes already checked), in the parameter's dtype. A sharded run then reads only each
    process's rows of each tensor (`mm.training.materialize`), as for the LM; the biases Mllama lacks are zeros.
    Mapping as `load_mllama_vision_state_dict`."""
    params = dict(encoder.named_parameters())
    names, shapes = _vision_names(encoder)

    def stored(hf: str, dtype: torch.dtype) -> SafetensorsTensor:
        file, key = where[hf]
        return SafetensorsTensor(file, key, _rows(file, key), None, 0, dtype)

    sources = {}
    for hf_key, ours in names:
        p = params[ours]
        if "{}" in hf_key:
            sources[ours] = ConcatRows(
                tuple(stored(f"vision_model.{hf_key.format(x)}", p.dtype) for x in "qkv")
            )
        elif ours in shapes:
            sources[ours] = Reshaped(stored(f"vision_model.{hf_key}", p.dtype), tuple(p.shape))
        else:
            sources[ours] = stored(f"vision_model.{hf_key}", p.dtype)
    for part in ("weight", "bias"):
        sources[f"project.{part}"] = stored(f"multi_modal_projector.{part}", params[f"project.{part}"].dtype)
    zero_ok = (".attn.proj.bias", ".attn.qkv.bias", "patch_embed.proj.bias")
    for name, p in params.items():
        if name not in sources and name.endswith(zero_ok):
            sources[name] = ComputedTensor(functools.partial(torch.zeros, tuple(p.shape), dtype=p.dtype))
    unfilled = sorted(set(params) - set(sources))
    if unfilled:
        raise ValueError(
            f"Mllama vision checkpoint has no tensor for image encoder parameters {unfilled[:5]}"
        )
    for name, src in sources.items():
        params[name].lazy_source = src


def _rows(file: Path, key: str) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        shape = f.get_slice(key).get_shape()
    return int(shape[0]) if shape else 1


def mllama_vision_state_dict(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    """Inverse of `load_mllama_vision_state_dict`: `vision_model.*` and `multi_modal_projector.*` tensors."""
    sd = dict(encoder.state_dict())
    out: dict[str, torch.Tensor] = {}

    def take(ours: str) -> torch.Tensor:
        if ours not in sd:
            raise MllamaCheckpointError(f"image encoder has no {ours!r}, which Mllama's vision model needs")
        return sd.pop(ours)

    names, shapes = _vision_names(encoder)
    for hf_key, ours in names:
        t = take(ours)
        if "{}" in hf_key:
            for p, part in zip("qkv", t.chunk(3, dim=0)):  # timm's fused q, k, v rows
                out[f"vision_model.{hf_key.format(p)}"] = part
        else:
            out[f"vision_model.{hf_key}"] = t.reshape(shapes[ours][0]) if ours in shapes else t
    out["multi_modal_projector.weight"] = take("project.weight")
    out["multi_modal_projector.bias"] = take("project.bias")
    if sd:
        raise MllamaCheckpointError(
            f"image encoder tensors with no place in Mllama's vision model: {sorted(sd)} (expected none; "
            "build the encoder with `mllama_image_encoder` and `config_from_mllama`)"
        )
    return out
