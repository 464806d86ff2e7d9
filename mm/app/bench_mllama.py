"""The Mllama side of `mm bench`: a random transformers Mllama of the run's shape saved to a directory, ours
and transformers' loaded from it with their language model frozen, and the image-adapter batch and training step
both the timing (`bench_image`) and the fresh-process memory probe (`bench_memory`) run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm.app.bench_config import BOS, IMAGE_TOKEN_OFFSET, BenchConfig


def transformers_mllama_config(bc: BenchConfig) -> Any:
    """A transformers `MllamaConfig` whose text model is the item-1 LM plus cross-attention layers."""
    from transformers import MllamaConfig

    lm = bc.lm
    v = dict(bc.vision)
    v["vision_output_dim"] = v["hidden_size"] * (1 + len(v["intermediate_layers_indices"]))
    text = dict(
        vocab_size=lm["vocab_size"], hidden_size=lm["dim"], num_hidden_layers=lm["n_layers"] + len(
            bc.cross_attention_layers), num_attention_heads=lm["n_heads"], num_key_value_heads=lm["n_kv_heads"],
        intermediate_size=lm["ffn_dim"], cross_attention_layers=list(bc.cross_attention_layers),
        max_position_embeddings=lm["max_seq_len"], rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=lm["rope_theta"]),
        bos_token_id=BOS, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return MllamaConfig(vision_config=v, text_config=text, image_token_index=lm["vocab_size"])


@torch.no_grad()
def save_mllama(bc: BenchConfig, path: Path, seed: int = 0) -> Path:
    """A random Mllama of `bc`'s shape (gates opened, so images matter), saved by transformers."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    hf = MllamaForConditionalGeneration(transformers_mllama_config(bc))
    for name, p in hf.named_parameters():
        if "gate" in name:  # transformers starts cross-attention gates at 0: open them
            p.uniform_(-1.0, 1.0)
    hf.save_pretrained(path)
    return path


def load_mllama_pair(path: Path, lm_trainable: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours (`load_hf_mllama`) and transformers' Mllama from one directory, both with their LM frozen."""
    return load_hf_mllama_for_bench(path, lm_trainable), load_hf_mllama_frozen(path)


def load_hf_mllama_frozen(path: Path | str) -> torch.nn.Module:
    """Transformers' Mllama (SDPA) from a directory, its language model frozen but for cross-attention."""
    from transformers import MllamaForConditionalGeneration

    hf = MllamaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    freeze_mllama_lm(hf, mllama_xattn_text_layers(hf))
    return hf


def load_hf_mllama_for_bench(path: Path, lm_trainable: bool = False) -> torch.nn.Module:
    """Our MultimodalLM from a Mllama directory; encoder + cross-attention train (+ the LM if asked)."""
    from mm import load_hf_mllama

    ours = load_hf_mllama(path, trainable=("image_encoder", "image_xattn"))
    trainable = {id(p) for _, p in ours.trainable_named_parameters()}
    for p in ours.parameters():  # as the trainer does: only the named parts train
        p.requires_grad_(id(p) in trainable)
    if lm_trainable:  # full fine-tuning, for the memory comparison only (a stage never does this)
        for p in ours.lm.parameters():
            p.requires_grad_(True)
    return ours


def mllama_xattn_text_layers(hf: torch.nn.Module) -> list[int]:
    """Indices of the cross-attention text layers of a transformers Mllama."""
    return list(hf.config.text_config.cross_attention_layers)


def freeze_mllama_lm(hf: torch.nn.Module, xattn: list[int]) -> None:
    """Freeze transformers Mllama's language model except its cross-attention layers."""
    keep = tuple(f"language_model.layers.{j}." for j in xattn)
    for name, p in hf.named_parameters():
        in_lm = "language_model." in name or name.startswith("lm_head.")
        p.requires_grad_(not in_lm or any(k in name for k in keep))


def adapter_batch(bc: BenchConfig, batch: int, seq: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """One image (max tiles, all real) per row and text that all sees it: <|image|> <bos> tokens..."""
    v, V = bc.vision, bc.lm["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    T, S = v["max_num_tiles"], v["image_size"]
    ids = torch.randint(3, V, (batch, seq), generator=g)
    ids[:, 0], ids[:, 1] = V + IMAGE_TOKEN_OFFSET, BOS
    aspect_ratio_id = _grid_id(T)
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(batch, 1, T, 3, S, S, generator=g),
        "aspect_ratio_ids": torch.full((batch, 1), aspect_ratio_id, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(batch, 1, T, dtype=torch.long),
        "cross_attention_mask": torch.ones(batch, seq, 1, T, dtype=torch.long),
    }


def _grid_id(max_tiles: int) -> int:
    """1-based id of the (2, 2) grid (or the largest square) in Mllama's supported aspect ratios."""
    from mm.datasets.tiling import supported_aspect_ratios

    grids = [tuple(g) for g in supported_aspect_ratios(max_tiles)]
    side = int(max_tiles**0.5)
    return grids.index((side, side)) + 1


def adapter_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], hf: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of an image-adapter batch (none on <|image|> <bos>), ours or transformers'."""
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[:, :2] = -100  # no loss on <|image|> <bos>
    if hf:
        logits = model(**batch).logits
    else:
        logits = model.forward_hf(**batch)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def adapter_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], hf: bool) -> Callable[[], float]:
    """A training step (forward, backward, AdamW over the trainable parameters) of an image-adapter model."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)

    def step() -> float:
        loss = adapter_loss(model, batch, hf)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step
