"""Stage outputs of the multimodal stages: a folder holding only what trained plus the frozen LM's identity.

    DIR/adapter.safetensors   every non-LM tensor (encoders, adapters); never an `lm.` tensor
    DIR/mm_config.json        how to rebuild the model: LM location and fingerprint, encoder config,
                              cross-attention placement, tokenizer, image transform, stage and its
                              fingerprints at start and end

`load_bundle` refuses an LM whose fingerprint differs from the recorded one; `verify_frozen` is the check
behind `mm verify-frozen`. The LM is an HF Llama directory, or (`"lm_format": "hf_mllama"`) the language model
inside a Llama 3.2 Vision directory the stage started from. A video-stage bundle holds only the video tensors
and also names the image-stage bundle it builds on (`image_bundle`) with the fingerprint of that frozen image
path; `verify_frozen` checks the LM and the image path.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mm.formats.hf_llama import load_hf
from mm.lm import Tokenizer
from mm.lm.io import atomic_write, read_json, write_json
from mm.training.checkpoint import load_tensors, save_tensors
from mm.training.freeze import FrozenLMChanged, assert_no_lm_tensors, fingerprint, fingerprint_tensors

CONFIG = "mm_config.json"
WEIGHTS = "adapter.safetensors"


def save_bundle(state: dict[str, torch.Tensor], out: str | Path, meta: dict[str, Any]) -> Path:
    """Write the adapter tensors and `mm_config.json` (atomically: temporary names, then rename)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    assert_no_lm_tensors(state, str(out / WEIGHTS))
    atomic_write(out / WEIGHTS, lambda tmp: save_tensors(state, tmp))
    write_json(meta, out / CONFIG)
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The `mm_config.json` of a bundle folder, with a clear error when it is not one."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not an mm stage checkpoint: {CONFIG} is missing")
    return read_json(cfg_file)


def resolve_lm_path(bundle: Path, cfg: dict[str, Any]) -> Path:
    """The LM directory a bundle names (relative paths are relative to the bundle)."""
    p = Path(cfg["lm_path"])
    return p if p.is_absolute() else (bundle / p).resolve()


def load_lm(
    lm_path: Path,
    cfg: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """The LM a bundle names: an HF Llama directory (lazily on the meta device, `load_hf`), or the LM of a
    Mllama directory (`lm_format`; read whole)."""
    if cfg.get("lm_format", "hf_llama") == "hf_mllama":
        from mm.formats.hf_mllama import load_hf_mllama_lm

        return load_hf_mllama_lm(lm_path)
    return load_hf(lm_path, device=device, dtype=dtype)


def load_lm_checked(bundle: Path, cfg: dict[str, Any]) -> torch.nn.Module:
    """Load the bundle's LM and refuse it if its fingerprint differs from the recorded one."""
    lm_path = resolve_lm_path(bundle, cfg)
    lm = load_lm(lm_path, cfg)
    fp = fingerprint(lm)
    if fp != cfg["lm_fingerprint"]:
        raise FrozenLMChanged(
            f"the LM at {lm_path} has fingerprint {fp[:16]}..., but {bundle} was trained against "
            f"{cfg['lm_fingerprint'][:16]}...; refusing to combine them"
        )
    return lm


def load_adapter_weights(model: torch.nn.Module, bundle: Path) -> None:
    """Load a bundle's adapter tensors into a composite model (LM tensors are refused). On a meta-device model
    (a build recorded for `mm.training.materialize`) nothing is read (`lazy_adapter_weights`)."""
    own = model.adapter_state()
    if own and all(t.is_meta for t in own.values()):
        lazy_adapter_weights(model, bundle)
        return
    tensors = load_tensors(Path(bundle) / WEIGHTS)
    assert_no_lm_tensors(tensors, str(Path(bundle) / WEIGHTS))
    _check_adapter_tensors(
        Path(bundle) / WEIGHTS, own, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    )
    model.load_state_dict(tensors, strict=False)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def lazy_adapter_weights(model: torch.nn.Module, bundle: Path) -> None:
    """A bundle's adapter tensors for a meta-device model, read later: each tensor the bundle holds becomes a
    fresh meta tensor (made outside any recording) with a `lazy_source` reading its rows from the file, so each
    process of a sharded run reads only its rows of the sharded parts (e.g. the video stage's frozen image
    cross-attention) and the replicated ones whole. Names, shapes and dtypes are checked from the header."""
    from safetensors import safe_open
    from torch.utils._python_dispatch import _disable_current_modes

    from mm.formats.hf_llama import SafetensorsTensor

    file = Path(bundle) / WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {bundle} (expected {file})")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert_no_lm_tensors(dict.fromkeys(header), str(file))
    unknown_dtype = sorted(k for k, (_, d) in header.items() if d not in _DTYPES)
    if unknown_dtype:
        raise ValueError(
            f"{file}: {unknown_dtype[0]} has dtype {header[unknown_dtype[0]][1]}, expected a float"
        )
    found = {k: (shape, _DTYPES[d]) for k, (shape, d) in header.items()}
    _check_adapter_tensors(file, model.adapter_state(), found)
    with _disable_current_modes(), torch.no_grad():
        for key, (shape, dtype) in found.items():
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner)
            t = torch.empty(shape, dtype=dtype, device="meta")
            if attr in module._parameters:
                t = torch.nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
                module._parameters[attr] = t
            else:
                module._buffers[attr] = t
            t.lazy_source = SafetensorsTensor(file, key, shape[0] if shape else 1, None, 0, dtype)


def _check_adapter_tensors(
    file: Path, own: dict[str, torch.Tensor], found: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> None:
    unknown = sorted(set(found) - set(own))
    if unknown:
        raise ValueError(f"{file}: tensors {unknown[:5]} do not belong to this model")
    for k, (shape, dtype) in found.items():
        if tuple(own[k].shape) != shape:
            raise ValueError(f"{file}: {k} has shape {shape}, expected {tuple(own[k].shape)}")
        if own[k].dtype != dtype:
            raise ValueError(f"{file}: {k} has dtype {dtype}, expected {own[k].dtype}")


def verify_frozen(bundle: str | Path) -> tuple[bool, str]:
    """Is the LM a bundle names bit-identical to the one it was trained against (and unchanged by the stage)?"""
    bundle = Path(bundle)
    cfg = read_config(bundle)
    lm_path = resolve_lm_path(bundle, cfg)
    fp = fingerprint(load_lm(lm_path, cfg))
    start, end = cfg.get("lm_fingerprint_start"), cfg.get("lm_fingerprint_end")
    problems = []
    if fp != cfg["lm_fingerprint"]:
        problems.append(
            f"LM at {lm_path} now has fingerprint {fp[:16]}..., recorded {cfg['lm_fingerprint'][:16]}..."
        )
    if start is not None and end is not None and start != end:
        problems.append(
            f"the stage changed the LM: fingerprint {start[:16]}... at start, {end[:16]}... at end"
        )
    detail = f"LM at {lm_path} is untouched (sha256 {fp})"
    if cfg.get("image_bundle"):
        image_problems, image_detail = _image_path_problems(bundle, cfg)
        problems += image_problems
        detail += f"; {image_detail}"
    if problems:
        return False, "; ".join(problems)
    return True, detail


def resolve_image_bundle(bundle: Path, cfg: dict[str, Any]) -> Path:
    """The image-stage bundle a video bundle builds on (relative paths are relative to the bundle)."""
    p = Path(cfg["image_bundle"])
    return p if p.is_absolute() else (Path(bundle) / p).resolve()


def image_path_fingerprint(image_bundle: str | Path) -> str:
    """Fingerprint of a frozen image path: every tensor of the image-stage bundle (encoder, cross-attention)."""
    return fingerprint_tensors(load_tensors(Path(image_bundle) / WEIGHTS))


def _image_path_problems(bundle: Path, cfg: dict[str, Any]) -> tuple[list[str], str]:
    """What differs between a video bundle's recorded image path and the image bundle it names now."""
    image = resolve_image_bundle(bundle, cfg)
    if not (image / WEIGHTS).is_file():
        return [f"the image-stage bundle {image} it builds on is missing ({WEIGHTS} not found)"], ""
    problems = []
    fp = image_path_fingerprint(image)
    if fp != cfg["image_fingerprint"]:
        problems.append(
            f"image path at {image} now has fingerprint {fp[:16]}..., recorded {cfg['image_fingerprint'][:16]}..."
        )
    start, end = cfg.get("image_fingerprint_start"), cfg.get("image_fingerprint_end")
    if start is not None and end is not None and start != end:
        problems.append(
            f"the stage changed the image path: fingerprint {start[:16]}... at start, {end[:16]}... at end"
        )
    image_lm = read_config(image).get("lm_fingerprint")
    if image_lm != cfg["lm_fingerprint"]:
        problems.append(f"the image-stage bundle {image} belongs to another LM ({str(image_lm)[:16]}...)")
    return problems, f"image path at {image} is untouched (sha256 {fp})"


def load_tokenizer(bundle: Path, cfg: dict[str, Any]) -> Tokenizer:
    """The tokenizer a bundle names (defaults to the LM directory's)."""
    p = Path(cfg.get("tokenizer") or cfg["lm_path"])
    p = p if p.is_absolute() else (bundle / p).resolve()
    return Tokenizer.from_file(p)


def dataclass_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(asdict(obj)))
