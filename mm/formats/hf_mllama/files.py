"""Reading a Mllama directory's safetensors (one file or shards plus an index): where each tensor lives, checks
of names and shapes against the model `config.json` describes (headers only), and the tensors themselves."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from mm.formats.hf_mllama.config import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, MllamaCheckpointError
from mm.formats.hf_mllama.text import mm_to_mllama_state_dict
from mm.lm.io import read_json
from mm.models.multimodal import MultimodalLM

# transformers' in-memory names -> the checkpoint layout (what `save_pretrained` writes; both are read).
_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exports carry; recomputed from the config


def _canonical(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def tensor_locations(path: Path) -> dict[str, tuple[Path, str]]:
    """Canonical tensor name -> (safetensors file, name in the file), over one file or all shards."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index, MllamaCheckpointError).get("weight_map")
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


def read_expected(
    path: Path,
    expected: Mapping[str, tuple[int, ...]],
    *,
    dtype: torch.dtype,
    allow_unexpected: bool = False,
) -> dict[str, torch.Tensor]:
    """The `expected` tensors (checked by name and shape) from the directory's safetensors, on CPU in `dtype`."""
    where = tensor_locations(path)
    check_tensors(path, expected, where, allow_unexpected=allow_unexpected)
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(where[k][0], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for k in names:
                out[k] = f.get_tensor(where[k][1]).to(dtype)
    return out


def check_tensors(
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


def check_mapped_state(path: Path, missing: Sequence[str], unexpected: Sequence[str]) -> None:
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


def expected_shapes(model: MultimodalLM) -> dict[str, tuple[int, ...]]:
    """Mllama checkpoint name -> shape, for every tensor of `model`."""
    return {k: tuple(t.shape) for k, t in mm_to_mllama_state_dict(model).items()}


def directory(path: str | os.PathLike) -> Path:
    """`path` as a Path, refused unless it is a directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face Mllama folder)")
    return path
