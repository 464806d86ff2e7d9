"""Hugging Face interop: load and save our `Transformer` as a `transformers` `LlamaForCausalLM` directory.

Follows the Hugging Face Llama checkpoint format (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`) as read by `transformers.LlamaForCausalLM.from_pretrained`, and Meta's
llama-models / transformers' `convert_llama_weights_to_hf.py` for the q/k permutation: Hugging Face stores
q/k rows in the rotate-half RoPE layout, we use Meta's interleaved layout (dims 2i and 2i+1 rotate together).

Everything that knows Hugging Face names lives here, in one small adapter: `config_from_hf` / `config_to_hf`
map the config, `hf_to_mm_state_dict` / `mm_to_hf_state_dict` map the weights. Weights are only ever read
with `safetensors` (never pickle). Both RoPE config formats are read: transformers 5's `rope_parameters`
and the legacy `rope_theta` + `rope_scaling` keys; both are written. `load_hf(..., device="meta")` reads
nothing: each tensor says where its values live, so that a sharded run reads only each process's rows.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LMConfig, RopeScaling
from .model import Transformer, rope_inv_freq

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# ---- the name mapping (the only place that knows Hugging Face parameter names) --------------------------
# (Hugging Face name, our name); per-layer entries are relative to `model.layers.N.` / `layers.N.`.
_GLOBAL_NAMES = (
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
)
_LAYER_NAMES = (
    ("self_attn.q_proj.weight", "attention.wq.weight"),
    ("self_attn.k_proj.weight", "attention.wk.weight"),
    ("self_attn.v_proj.weight", "attention.wv.weight"),
    ("self_attn.o_proj.weight", "attention.wo.weight"),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
)
# Buffers some older Hugging Face checkpoints carry; recomputed from the config, so skipped on load.
_IGNORED_HF_KEY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_name_map(cfg: LMConfig) -> dict[str, str]:
    """Hugging Face parameter name -> our name, for every tensor a checkpoint of `cfg` holds."""
    names = {}
    for hf, mm in _GLOBAL_NAMES:
        if not (hf == "lm_head.weight" and cfg.tie_embeddings):
            names[hf] = mm
    for i in range(cfg.n_layers):
        for hf, mm in _LAYER_NAMES:
            names[f"model.layers.{i}.{hf}"] = f"layers.{i}.{mm}"
    return names


def _rope_heads(hf_name: str, cfg: LMConfig) -> int | None:
    """Number of heads whose rows must be permuted for this tensor (q and k projections), else None."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return cfg.n_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return cfg.n_kv_heads
    return None


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute q/k rows per head from Meta's interleaved RoPE layout to Hugging Face's rotate-half layout."""
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_rotate_half`: Hugging Face q/k rows -> Meta's interleaved layout."""
    return w.reshape(n_heads, 2, head_dim // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def hf_to_mm_state_dict(sd: Mapping[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face Llama state dict to ours (q/k permuted to interleaved; tied output = embedding)."""
    names = hf_name_map(cfg)
    missing = [k for k in names if k not in sd]
    if missing:
        raise KeyError(f"Hugging Face state dict lacks {len(missing)} tensors, first {missing[:5]}")
    unexpected = [
        k for k in sd if k not in names and not _IGNORED_HF_KEY.match(k) and k != "lm_head.weight"
    ]  # a tied checkpoint may still carry lm_head: our output shares the embedding instead
    if unexpected:
        raise KeyError(
            f"Hugging Face state dict has {len(unexpected)} unexpected tensors, first {unexpected[:5]}"
        )
    out = {}
    for hf, mm in names.items():
        t = sd[hf]
        heads = _rope_heads(hf, cfg)
        out[mm] = rotate_half_to_interleaved(t, heads, cfg.hd) if heads is not None else t
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def mm_to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Map our state dict to Hugging Face Llama names (q/k permuted to rotate-half; no lm_head when tied)."""
    out = {}
    for hf, mm in hf_name_map(cfg).items():
        if mm not in sd:
            raise KeyError(f"state dict lacks {mm!r} (Hugging Face {hf!r})")
        t = sd[mm]
        heads = _rope_heads(hf, cfg)
        out[hf] = interleaved_to_rotate_half(t, heads, cfg.hd) if heads is not None else t
    return out


# ---- config -------------------------------------------------------------------------------------------
def _rope_from_hf(d: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    new = d.get("rope_parameters") or {}
    if not isinstance(new, Mapping) or any(isinstance(v, Mapping) for v in new.values()):
        raise ValueError(f"{source}: rope_parameters must be one flat dict of RoPE settings, got {new!r}")
    new = dict(new)
    legacy = dict(d.get("rope_scaling") or {})
    if d.get("rope_theta") is not None:
        legacy.setdefault("rope_theta", d["rope_theta"])
    for params in (new, legacy):  # older configs say "type" where newer ones say "rope_type"
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
    for key in sorted(set(new) & set(legacy)):
        if new[key] != legacy[key]:
            raise ValueError(
                f"{source}: rope_parameters[{key!r}]={new[key]!r} disagrees with the legacy "
                f"rope_theta/rope_scaling value {legacy[key]!r}"
            )
    rope = {**legacy, **new}
    theta = float(rope.get("rope_theta", 10000.0))  # transformers' default theta when none is given
    rope_type = rope.get("rope_type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported rope_type {rope_type!r}; supported values: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            f"{source}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, None
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in rope:
            raise ValueError(f"{source}: rope_type 'llama3' needs {key!r} in rope_parameters/rope_scaling")
    # As transformers: without original_max_position_embeddings, the model's max_position_embeddings is used.
    original = rope.get("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    scaling = RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_seq_len=int(original),
    )
    return theta, scaling


def config_from_hf(d: Mapping[str, Any], source: str = CONFIG_NAME) -> LMConfig:
    """Our `LMConfig` from a Hugging Face Llama `config.json` dict (`source` names the file in errors)."""
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {d['model_type']!r} is not supported (only 'llama')")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"{source}: {key}=true is not supported (our decoder has no biases)")

    def need(key: str) -> Any:
        if d.get(key) is None:
            raise ValueError(f"{source}: missing required key {key!r}")
        return d[key]

    dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = d.get("head_dim")
    if head_dim is not None and (dim % n_heads != 0 or int(head_dim) != dim // n_heads):
        head_dim = int(head_dim)
    else:
        head_dim = None
    theta, scaling = _rope_from_hf(d, source)
    try:
        return LMConfig(
            dim=dim,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            vocab_size=int(need("vocab_size")),
            ffn_dim=int(need("intermediate_size")),
            head_dim=head_dim,
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),  # transformers' LlamaConfig default
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def config_to_hf(cfg: LMConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Hugging Face `LlamaForCausalLM` `config.json` dict for `cfg` (both RoPE formats, weights in `dtype`)."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
        rope_parameters = {**rope_scaling, "rope_theta": cfg.rope_theta}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "rope_parameters": rope_parameters,  # transformers >= 5
        "rope_theta": cfg.rope_theta,  # legacy keys (transformers 4.x), accepted by 5.x too
        "rope_scaling": rope_scaling,
        # Our config knows no token ids; null rather than LlamaConfig's Llama 2 defaults (1, 2).
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names of weights


# ---- loading ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


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
    weight_map = _read_json(index).get("weight_map")
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
    cfg = config_from_hf(_read_json(path / CONFIG_NAME), source=str(path / CONFIG_NAME))
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
    cfg = config_from_hf(_read_json(config_path), source=str(config_path))
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
                file, key, expected[key][0], _rope_heads(key, cfg), cfg.hd, dtype
            )
        model.inv_freq.lazy_source = ComputedTensor(inv_freq)
        return model.eval()
    model.load_state_dict(hf_to_mm_state_dict(hf_sd, cfg), strict=True, assign=True)
    if cfg.tie_embeddings:  # `assign` made two Parameters; share one, as the constructor does
        model.output.weight = model.tok_embeddings.weight
    with torch.device("cpu"):  # computed on the CPU whatever the ambient default device
        model.inv_freq = inv_freq().to(device)  # non-persistent buffer
    return model.eval()


# ---- saving -------------------------------------------------------------------------------------------
def _atomic_write(final: Path, write: Callable[[Path], None]) -> None:
    """Write `final` through a temporary file in the same folder, then `os.replace` it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(final: Path, obj: Any) -> None:
    _atomic_write(final, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _shards(sd: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Split tensor names into consecutive groups of at most `max_shard_bytes` (a bigger tensor goes alone)."""
    if max_shard_bytes is None:
        return [list(sd)]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


@torch.no_grad()
def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Save `model` as a Hugging Face `LlamaForCausalLM` directory; returns the directory.

    Weights go to `model.safetensors`, or to `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when `max_shard_bytes` splits them. `extra_config` adds or overrides
    config.json keys (e.g. `bos_token_id` / `eos_token_id`). Every file is written atomically; weight files
    of an earlier save in the other layout are removed, and config.json is written last.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    sd = {
        k: v.detach().to("cpu").contiguous() for k, v in mm_to_hf_state_dict(model.state_dict(), cfg).items()
    }
    groups = _shards(sd, max_shard_bytes)
    metadata = {"format": "pt"}

    if len(groups) == 1:
        written = {WEIGHTS_NAME}
        _atomic_write(path / WEIGHTS_NAME, lambda p: save_file(sd, str(p), metadata=metadata))
    else:
        weight_map, written = {}, {INDEX_NAME}
        for i, names in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            part = {n: sd[n] for n in names}
            _atomic_write(path / shard, lambda p, part=part: save_file(part, str(p), metadata=metadata))
            weight_map.update(dict.fromkeys(names, shard))
            written.add(shard)
        total = sum(t.numel() * t.element_size() for t in sd.values())
        _write_json(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in path.iterdir():  # leftovers of an earlier save would confuse loaders
        if stale.name not in written and (
            stale.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(stale.name)
        ):
            stale.unlink()

    config = config_to_hf(cfg, dtype)
    config.update(extra_config or {})
    _write_json(path / CONFIG_NAME, config)
    return path


__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "ComputedTensor",
    "SafetensorsTensor",
    "config_from_hf",
    "config_to_hf",
    "hf_name_map",
    "hf_to_mm_state_dict",
    "interleaved_to_rotate_half",
    "load_hf",
    "mm_to_hf_state_dict",
    "rotate_half_to_interleaved",
    "save_hf",
    "stored_dtype",
]
