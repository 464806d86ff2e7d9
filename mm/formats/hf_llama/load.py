"""Reading a Hugging Face Llama directory: whole, or lazily (`device="meta"`: each tensor says where its values
live, so that a sharded run reads only each process's rows)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mm.formats.hf_llama.config import config_from_hf
from mm.formats.hf_llama.names import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    hf_name_map,
    hf_to_mm_state_dict,
    rope_heads,
    rotate_half_to_interleaved,
)
from mm.lm.config import LMConfig
from mm.lm.io import read_json
from mm.lm.model import Transformer, rope_inv_freq

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names of weights


def _weight_files(path: Path, names: list[str]) -> dict[Path, list[str]]:
    """Which safetensors file holds each expected Hugging Face tensor, grouped by file."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        return {single: names}
    if not index.is_file():
        pickled = [p.name for p in sorted(path.glob("pytorch_model*.bin"))]
        hint = (
            f" (found {pickled[0]}: pickle checkpoints are not loaded, convert to safetensors)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"no weights in {path}: looked for {WEIGHTS_NAME} and {INDEX_NAME}{hint}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' dict")
    files: dict[Path, list[str]] = {}
    for name in names:
        if name not in weight_map:
            raise ValueError(f"tensor {name!r} is not listed in the weight_map of {index}")
        files.setdefault(path / weight_map[name], []).append(name)
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f.name} listed in {index} is missing (expected {f})")
    return files


def _meta_model(cfg: LMConfig) -> Transformer:
    """A `Transformer` of `cfg` on the meta device: shapes only, no memory, no random draws. Any active
    dispatch mode is suspended, so a caller recording its own initialisation (`mm.training.materialize`) does
    not record this model's constructor: its values come from files."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.device("meta"):
        return Transformer(cfg)


@dataclass(frozen=True)
class SafetensorsTensor:
    """Where a lazily loaded parameter's values live: tensor `key` of a safetensors file, read in our layout
    (q/k rows permuted from Hugging Face's rotate-half layout) and cast to `dtype`."""

    file: Path
    key: str
    rows: int  # dim 0 of our tensor
    heads: int | None  # q/k projections: the heads whose rows are permuted
    head_dim: int
    dtype: torch.dtype
    row0: int = 0  # our tensor is the stored one's rows row0 : row0 + rows (e.g. a vocabulary's first rows)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop (dim 0, our layout) on the CPU; only those rows are read (whole heads for q/k)."""
        stop = self.rows if stop is None else stop
        with safe_open(str(self.file), framework="pt", device="cpu") as f:
            part = f.get_slice(self.key)
            if self.heads is None:
                return part[self.row0 + start : self.row0 + stop].to(self.dtype)
            hd = self.head_dim
            h0, h1 = start // hd, -(-stop // hd)
            w = rotate_half_to_interleaved(part[h0 * hd : h1 * hd], h1 - h0, hd)
            return w[start - h0 * hd : stop - h0 * hd].to(self.dtype)


@dataclass(frozen=True)
class ComputedTensor:
    """A lazily built tensor whose value a function computes (e.g. the RoPE frequencies)."""

    fn: Callable[[], torch.Tensor]

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of the computed value."""
        return self.fn()[start:stop]


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The one dtype every weight of a Hugging Face Llama directory is stored in (None when they differ)."""
    path = Path(path)
    cfg = config_from_hf(read_json(path / CONFIG_NAME), source=str(path / CONFIG_NAME))
    found = set()
    for file, keys in _weight_files(path, list(hf_name_map(cfg))).items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            found |= {f.get_slice(k).get_dtype() for k in keys}
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return names.get(found.pop()) if len(found) == 1 else None


@torch.no_grad()
def load_hf(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a Hugging Face `LlamaForCausalLM` directory (config.json + safetensors) as our `Transformer`.

    With `device="meta"` nothing is read: the model is on the meta device and every tensor carries a
    `lazy_source` (`SafetensorsTensor`, `ComputedTensor`) whose `read(start, stop)` reads only the rows asked for,
    so that each process of a sharded run reads only its shard (`mm.training.materialize`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory (expected a Hugging Face model folder with {CONFIG_NAME})"
        )
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (expected {config_path})")
    cfg = config_from_hf(read_json(config_path), source=str(config_path))
    lazy = torch.device(device).type == "meta"

    model = _meta_model(cfg)  # shapes only: no memory, no random init; real tensors are assigned below
    meta_sd = model.state_dict()
    names = hf_name_map(cfg)
    expected = {hf: tuple(meta_sd[mm].shape) for hf, mm in names.items()}

    hf_sd: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for file, keys in _weight_files(path, list(names)).items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise ValueError(f"tensor {key!r} not found in {file}")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise ValueError(f"tensor {key!r} in {file} has shape {shape}, expected {expected[key]}")
                stored = f.get_slice(key).get_dtype()
                if stored not in FLOAT_DTYPES:
                    raise ValueError(
                        f"tensor {key!r} in {file} has dtype {stored}, expected a float dtype "
                        f"({', '.join(FLOAT_DTYPES)})"
                    )
                if lazy:
                    where[key] = file
                else:
                    hf_sd[key] = f.get_tensor(key).to(device=device, dtype=dtype)

    inv_freq = functools.partial(rope_inv_freq, cfg.hd, cfg.rope_theta, cfg.rope_scaling)
    if lazy:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            model = model.to(dtype)
        params = dict(model.named_parameters())
        for key, file in where.items():
            p = params[names[key]]
            p.lazy_source = SafetensorsTensor(
                file, key, expected[key][0], rope_heads(key, cfg), cfg.hd, dtype
            )
        model.inv_freq.lazy_source = ComputedTensor(inv_freq)
        return model.eval()
    model.load_state_dict(hf_to_mm_state_dict(hf_sd, cfg), strict=True, assign=True)
    if cfg.tie_embeddings:  # `assign` made two Parameters; share one, as the constructor does
        model.output.weight = model.tok_embeddings.weight
    with torch.device("cpu"):  # computed on the CPU whatever the ambient default device
        model.inv_freq = inv_freq().to(device)  # non-persistent buffer
    return model.eval()
