"""Meta-format Llama 3.2 Vision checkpoints (`params.json` + `consolidated.NN.pth`), as users who download from
Meta get them, loaded as a `MultimodalLM` (`load_meta_vision`); the text-only `mm.lm.load_meta` is its sibling.

Meta's reference (`llama_models/llama3/multimodal/model.py`, `CrossAttentionTransformer`) names the tensors:

    text_model.tok_embeddings (V, D), text_model.learnable_embedding (8, D)   -> lm.tok_embeddings, extra_tok_embeddings
    text_model.layers.{i}.*, norm, output                                    -> lm.* (the names are mm's already)
    text_model.cross_attention_layers.{k}.*  (gate_attn, gate_ffwd, ...)     -> image_xattn.{fusion[k]}.*
    vision_model.vision_encoder.*                                            -> image_encoder.* (ImageEncoder)
    vision_model.vision_projection.{weight,bias}                             -> image_encoder.project

Cross-attention layer k runs before LM layer fusion[k], where Meta spreads `vision_num_cross_attention_layers`
layers uniformly, counting from the last LM layer (`fusion_schedule`). Meta's vision encoder keys its tile and
position embeddings by the tile grid (h_tiles, w_tiles); mm keys them by aspect-ratio id (the 1-based index of
the grid in `supported_aspect_ratios`): row id holds the grid's first h*w tiles in row-major order, zeros
after. The intermediate features are Meta's block INPUTS (`intermediate_from="block_input"`).

`params.json` does not describe the vision encoder: Meta's code fixes it (ViT-H/14: 32 blocks, 8 global, 16 heads,
intermediate layers 3, 7, 15, 23, 30). Width, depths, patch size, MLP width and tile count are read from the
tensors; the head count and the intermediate layers, which no tensor shows, are arguments with Meta's values.
Shards are merged as fairscale split them; files are read with `weights_only=True` (see `mm.formats.meta_llama`),
memory-mapped. Only `mm export` reads this format, in one process, to convert it to a Hugging Face Mllama
directory; no training run reads it, so no process of a sharded run reads it whole (a run starts from the
converted directory, whose language and vision tensors each process reads in slices: `load_hf_mllama`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mm.datasets.tiling import supported_aspect_ratios
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.formats.hf_mllama import MLLAMA_EXTRA_TOKENS, TRAINABLE, mllama_image_encoder
from mm.formats.meta_llama import SPLIT_DIM, config_from_meta, merge_shards, meta_files
from mm.lm import Transformer
from mm.lm.io import read_json, read_tensors
from mm.lm.model import rope_inv_freq
from mm.models.multimodal import MultimodalLM

META_VISION_HEADS = 16  # Meta's CrossAttentionTransformerVision: ViT-H/14
META_INTERMEDIATE_LAYERS = (3, 7, 15, 23, 30)
# fairscale's splits of the vision tensors (suffix -> dim), beyond the text model's
VISION_SPLIT_DIM = {
    **SPLIT_DIM,
    "learnable_embedding.weight": 0,  # VocabParallelEmbedding
    "conv1._linear.weight": 0,
    "attn.wq.weight": 0,
    "attn.wk.weight": 0,
    "attn.wv.weight": 0,
    "mlp.c_fc.weight": 0,
    "mlp.c_fc.bias": 0,  # a column-parallel bias is split with its outputs
    "vision_projection.weight": 0,
    "vision_projection.bias": 0,
    "attn.wo.weight": 1,
    "mlp.c_proj.weight": 1,  # a row-parallel bias is added after the reduce: replicated
}
_XATTN = {"gate_ffwd": "gate_ffn"}  # Meta's cross-attention names that differ from mm's


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """The LM layers Meta's cross-attention layers precede: n_cross spread evenly from the last layer down."""
    if not 1 <= n_cross <= n_layers:
        raise ValueError(f"vision_num_cross_attention_layers={n_cross}; expected 1..n_layers={n_layers}")
    step = math.ceil(n_layers / n_cross)
    return list(range(n_layers))[::-1][::step][:n_cross][::-1]


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return len(ids)


def vision_config_from_meta(
    sd: Mapping[str, torch.Tensor],
    params: Mapping[str, object],
    *,
    out_dim: int,
    heads: int = META_VISION_HEADS,
    intermediate_layers: Sequence[int] = META_INTERMEDIATE_LAYERS,
    intermediate_from: str = "block_input",
) -> ImageEncoderConfig:
    """The `ImageEncoderConfig` of Meta's vision encoder tensors (`vision_model.vision_encoder.*`)."""
    p = "vision_model.vision_encoder."
    width = sd[p + "class_embedding"].shape[0]
    patch = math.isqrt(sd[p + "conv1._linear.weight"].shape[1] // 3)
    tile = int(params.get("vision_chunk_size", 560))
    max_tiles = sd[p + "gated_positional_embedding"].shape[0]
    hidden = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if width % heads:
        raise ValueError(f"vision width {width} is not divisible by heads={heads}")
    return ImageEncoderConfig(
        timm_name="vit_huge_patch14_224",
        tile_size=tile,
        patch_size=patch,
        embed_dim=width,
        depth=_count(sd, p + "transformer.resblocks."),
        num_heads=heads,
        mlp_ratio=hidden / width,
        qkv_bias=False,
        proj_bias=True,
        pre_norm=True,
        norm_eps=1e-5,
        intermediate_layers=tuple(intermediate_layers),
        intermediate_from=intermediate_from,
        n_global_layers=_count(sd, p + "global_transformer.resblocks."),
        max_tiles=max_tiles,
        max_aspect_ratio_id=len(supported_aspect_ratios(max_tiles)),
        out_dim=out_dim,
        mask_mode="mllama",
    )


def _by_aspect_ratio(grid_embedding: torch.Tensor) -> torch.Tensor:
    """Meta's (T, T, n, D) embedding keyed by tile grid -> mm's (ids + 1, T * n * D) keyed by aspect-ratio id."""
    T, _, n, D = grid_embedding.shape
    grids = supported_aspect_ratios(T)
    out = grid_embedding.new_zeros(len(grids) + 1, T, n, D)
    for i, (h, w) in enumerate(grids, start=1):
        out[i, : h * w] = grid_embedding[:h, :w].reshape(h * w, n, D)
    return out.reshape(len(grids) + 1, T * n * D)


def _block(sd: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One of Meta's ImageTransformerBlocks -> timm Block names (q, k, v fused; no attention output bias)."""
    qkv = torch.cat([sd[f"{src}attn.w{x}.weight"] for x in "qkv"], dim=0)
    out = {f"{dst}attn.qkv.weight": qkv, f"{dst}attn.proj.weight": sd[f"{src}attn.wo.weight"]}
    for meta, ours in (
        ("ln_1", "norm1"),
        ("ln_2", "norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    ):
        for part in ("weight", "bias"):
            out[f"{dst}{ours}.{part}"] = sd[f"{src}{meta}.{part}"]
    return out


def vision_state_from_meta(sd: Mapping[str, torch.Tensor], encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    """mm's `ImageEncoder` state dict (projection included) from Meta's `vision_model.*` tensors."""
    p = "vision_model.vision_encoder."
    D = encoder.width
    w = sd[p + "conv1._linear.weight"]
    patch = encoder.cfg.patch_size
    out = {
        "vit.patch_embed.proj.weight": w.reshape(D, 3, patch, patch),  # Unfold's (C, kh, kw) order
        "vit.cls_token": sd[p + "class_embedding"].reshape(1, 1, D),
        "vit.pos_embed": sd[p + "positional_embedding"].reshape(1, -1, D),
        "pos_gate": sd[p + "gated_positional_embedding_gate"],
        "tile_pos_embed.weight": _by_aspect_ratio(sd[p + "gated_positional_embedding"]),
        "project.weight": sd["vision_model.vision_projection.weight"],
        "project.bias": sd["vision_model.vision_projection.bias"],
    }
    for meta, ours in (("pre_tile_pos_embed", "pre_tile"), ("post_tile_pos_embed", "post_tile")):
        out[f"{ours}.embedding.weight"] = _by_aspect_ratio(sd[f"{p}{meta}.embedding"])
        out[f"{ours}.gate"] = sd[f"{p}{meta}.gate"]
    for meta, ours in (("ln_pre", "vit.norm_pre"), ("ln_post", "vit.norm")):
        for part in ("weight", "bias"):
            out[f"{ours}.{part}"] = sd[f"{p}{meta}.{part}"]
    for i in range(len(encoder.vit.blocks)):
        out.update(_block(sd, f"{p}transformer.resblocks.{i}.", f"vit.blocks.{i}."))
    for i in range(len(encoder.global_layers)):
        src = f"{p}global_transformer.resblocks.{i}."
        out.update(_block(sd, src, f"global_layers.{i}.block."))
        out[f"global_layers.{i}.gate_attn"] = sd[src + "gate_attn"]
        out[f"global_layers.{i}.gate_ffn"] = sd[src + "gate_ffn"]
    for k, v in encoder.state_dict().items():  # biases Meta's layers do not have
        if k not in out and k.endswith(("patch_embed.proj.bias", ".attn.qkv.bias")):
            out[k] = torch.zeros_like(v)
    return out


def multimodal_state_from_meta(
    sd: Mapping[str, torch.Tensor], fusion: Sequence[int]
) -> dict[str, torch.Tensor]:
    """mm's LM, extra-token and cross-attention tensors from Meta's `text_model.*` tensors."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("text_model."):
            continue
        name = k[len("text_model.") :]
        if name == "learnable_embedding.weight":
            out["extra_tok_embeddings.weight"] = v
        elif m := re.fullmatch(r"cross_attention_layers\.(\d+)\.(.+)", name):
            rest = _XATTN.get(m[2], m[2])
            out[f"image_xattn.{fusion[int(m[1])]}.{rest}"] = v
        else:
            out[f"lm.{name}"] = v
    return out


@torch.no_grad()
def load_meta_vision(
    path: str | Path,
    *,
    heads: int = META_VISION_HEADS,
    intermediate_layers: Sequence[int] = META_INTERMEDIATE_LAYERS,
    intermediate_from: str = "block_input",
    hf_row_compat: bool = False,
    trainable: tuple[str, ...] = TRAINABLE,
    device: str | torch.device = "cpu",
) -> MultimodalLM:
    """A `MultimodalLM` (LM frozen) from a Meta-format Llama 3.2 Vision directory (module docstring)."""
    path = Path(path)
    params_file, files = meta_files(path)
    params = read_json(params_file)
    if "vision_num_cross_attention_layers" not in params:
        raise ValueError(
            f"{params_file}: no vision_num_cross_attention_layers: a text-only checkpoint (read it with "
            "mm.lm.load_meta)"
        )
    sd = merge_shards([read_tensors(f, mmap=True) for f in files], str(path), VISION_SPLIT_DIM)
    lm_cfg = config_from_meta(params, str(params_file))
    enc_cfg = vision_config_from_meta(
        sd,
        params,
        out_dim=lm_cfg.dim,
        heads=heads,
        intermediate_layers=intermediate_layers,
        intermediate_from=intermediate_from,
    )
    fusion = fusion_schedule(lm_cfg.n_layers, int(params["vision_num_cross_attention_layers"]))
    with torch.device("meta"):
        model = MultimodalLM(
            Transformer(lm_cfg),
            mllama_image_encoder(enc_cfg),
            xattn_layers=fusion,
            hf_row_compat=hf_row_compat,
            trainable=trainable,
            image_token_id=lm_cfg.vocab_size,  # Meta's model input: <|image|> is the first learnable embedding
            extra_tokens=MLLAMA_EXTRA_TOKENS,
        )
    model.to_empty(device=device)
    ours = multimodal_state_from_meta(sd, fusion)
    ours.update({f"image_encoder.{k}": v for k, v in vision_state_from_meta(sd, model.image_encoder).items()})
    used = {k for k in sd if k.startswith(("text_model.", "vision_model."))}
    unknown = sorted(set(sd) - used - {"text_model.rope.freqs"})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    if unknown or missing or extra:
        raise ValueError(
            f"{path}: not a Llama 3.2 Vision checkpoint of the shape {params_file} and the tensors describe: "
            f"tensors without a place {(unknown + extra)[:5]}, model tensors not filled {missing[:5]}"
        )
    for k, shape in expected.items():
        if tuple(ours[k].shape) != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(ours[k].shape)}, expected {shape}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in ours.items()})
    model.lm.inv_freq = rope_inv_freq(lm_cfg.hd, lm_cfg.rope_theta, lm_cfg.rope_scaling).to(device)
    model.set_trainable(trainable)
    return model.eval()


__all__ = [
    "META_INTERMEDIATE_LAYERS",
    "META_VISION_HEADS",
    "fusion_schedule",
    "load_meta_vision",
    "multimodal_state_from_meta",
    "vision_config_from_meta",
    "vision_state_from_meta",
]
