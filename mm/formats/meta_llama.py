"""Meta-format Llama 3 checkpoints, as users who download from Meta get them: `params.json` plus
`consolidated.NN.pth`, one file per model-parallel rank (`load_meta`).

The tensor names are ours already (mm follows Meta's reference: `tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, ..., and Meta's interleaved RoPE layout, so q/k need no permutation). Model-parallel shards
are merged along the dimension fairscale split them on: column-parallel weights (wq, wk, wv, w1, w3, output)
and the vocabulary-parallel embedding along dim 0, row-parallel weights (wo, w2) along dim 1; norms are
replicated (every shard must hold the same values). Files are read with `mm.lm.io.read_tensors`
(`torch.load(weights_only=True)`): a file that needs code to unpickle is refused, never executed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mm.lm.config import LMConfig, RopeScaling
from mm.lm.io import read_json, read_tensors
from mm.lm.model import Transformer

# Where fairscale's layers split a weight over model-parallel ranks (suffix of the tensor name -> dim).
SPLIT_DIM = {
    "tok_embeddings.weight": 0,  # VocabParallelEmbedding: vocabulary rows
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,  # ColumnParallelLinear: output features
    "attention.wo.weight": 1,
    "feed_forward.w2.weight": 1,  # RowParallelLinear: input features
}
_IGNORED = ("rope.freqs",)  # older checkpoints store the RoPE table; ours is computed


def config_from_meta(params: Mapping[str, Any], source: str = "params.json") -> LMConfig:
    """Our `LMConfig` from Meta's `params.json` (`use_scaled_rope` = the Llama 3.1 scaling Meta hard-codes)."""
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in params]
    if missing:
        raise ValueError(
            f"{source}: missing keys {missing} (a Meta Llama params.json has dim, n_layers, ...)"
        )
    return LMConfig(
        dim=int(params["dim"]),
        n_layers=int(params["n_layers"]),
        n_heads=int(params["n_heads"]),
        n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
        vocab_size=int(params["vocab_size"]),
        multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0)),
        rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
        max_seq_len=int(params.get("max_seq_len", 8192)),
    )


def _split_dim(name: str, split: Mapping[str, int]) -> int | None:
    for suffix, dim in split.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def merge_shards(
    shards: list[Mapping[str, torch.Tensor]],
    source: str = "checkpoint",
    split: Mapping[str, int] = SPLIT_DIM,
) -> dict[str, torch.Tensor]:
    """One state dict from the model-parallel shards of a Meta checkpoint (in rank order).

    `split` maps a tensor-name suffix to the dimension fairscale split it on; other tensors are replicated.
    """
    names = [k for k in shards[0] if k not in _IGNORED]
    for i, sd in enumerate(shards[1:], start=1):
        if sorted(k for k in sd if k not in _IGNORED) != sorted(names):
            raise ValueError(f"{source}: shard {i} holds other tensors than shard 0")
    out = {}
    for name in names:
        parts = [sd[name] for sd in shards]
        dim = _split_dim(name, split)
        if dim is None or len(parts) == 1:
            for i, p in enumerate(parts[1:], start=1):
                if not torch.equal(p, parts[0]):
                    raise ValueError(f"{source}: {name} is replicated but shard {i} differs from shard 0")
            out[name] = parts[0]
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def meta_files(path: Path) -> tuple[Path, list[Path]]:
    """params.json and the consolidated.NN.pth files (in rank order) of a Meta-format directory."""
    params_file = path / "params.json"
    if not params_file.is_file():
        raise FileNotFoundError(f"{path} is not a Meta checkpoint directory: params.json is missing")
    files = sorted(path.glob("consolidated.*.pth"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    if not files:
        raise FileNotFoundError(f"{path}: no consolidated.NN.pth weight files")
    ranks = [int(re.findall(r"\d+", p.name)[0]) for p in files]
    if ranks != list(range(len(files))):
        raise ValueError(
            f"{path}: model-parallel files {[p.name for p in files]} are not numbered 00, 01, ..."
        )
    return params_file, files


def load_meta(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Our `Transformer` from a Meta-format directory (params.json + consolidated.00.pth, .01.pth, ...)."""
    path = Path(path)
    params_file, files = meta_files(path)
    cfg = config_from_meta(read_json(params_file), str(params_file))
    sd = merge_shards([read_tensors(p, mmap=True) for p in files], str(path))
    if any(k.startswith("vision_model.") for k in sd):
        raise ValueError(
            f"{path} is a Llama 3.2 Vision checkpoint (it holds vision_model.* tensors): "
            "mm.formats.meta_vision.load_meta_vision reads it"
        )
    model = Transformer(cfg).to(device)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]} for {params_file}"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, {params_file} implies {tuple(shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return model.eval()


__all__ = ["SPLIT_DIM", "config_from_meta", "load_meta", "merge_shards", "meta_files"]
