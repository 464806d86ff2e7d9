"""Writing our `Transformer` as a Hugging Face Llama directory (one weights file or shards plus an index)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mm.formats.hf_llama.config import config_to_hf
from mm.formats.hf_llama.names import CONFIG_NAME, INDEX_NAME, SHARD_RE, WEIGHTS_NAME, mm_to_hf_state_dict
from mm.lm.io import atomic_write, write_json
from mm.lm.model import Transformer


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
        atomic_write(path / WEIGHTS_NAME, lambda p: save_file(sd, str(p), metadata=metadata))
    else:
        weight_map, written = {}, {INDEX_NAME}
        for i, names in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            part = {n: sd[n] for n in names}
            atomic_write(path / shard, lambda p, part=part: save_file(part, str(p), metadata=metadata))
            weight_map.update(dict.fromkeys(names, shard))
            written.add(shard)
        total = sum(t.numel() * t.element_size() for t in sd.values())
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, path / INDEX_NAME)
    for stale in path.iterdir():  # leftovers of an earlier save would confuse loaders
        if stale.name not in written and (
            stale.name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_RE.match(stale.name)
        ):
            stale.unlink()

    config = config_to_hf(cfg, dtype)
    config.update(extra_config or {})
    write_json(config, path / CONFIG_NAME)
    return path
