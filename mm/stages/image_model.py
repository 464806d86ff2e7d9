"""The image stages' model sources: the configuration checks (encoder, tiling, cross-attention placement against
the LM's config.json), the start from a Llama 3.2 Vision (HF Mllama) checkpoint (`init_from_hf_mllama`), the
caption head's parts, and the image model rebuilt from a trained bundle (`load_image_bundle`, refusing an LM
whose fingerprint changed or a bundle of another stage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mm.adapters.caption_head import CaptionHeadConfig, CaptionSlotHead
from mm.datasets.tiling import TileTransform, supported_aspect_ratios
from mm.encoders.image import ImageEncoderConfig
from mm.formats.bundle import load_adapter_weights, load_lm, load_lm_checked, load_tokenizer, resolve_lm_path
from mm.formats.hf_llama import config_from_hf
from mm.formats.timm import build_image_encoder
from mm.lm import Tokenizer
from mm.models.loading import read_stage_config
from mm.models.multimodal import MultimodalLM

if TYPE_CHECKING:
    from mm.stages.image import ImageStageConfig

IMAGE_STAGES = ("image-pretrain", "image-anneal")


def start_from_hf_mllama(
    cfg: ImageStageConfig, device: torch.device, lm_dtype: torch.dtype | None = None
) -> tuple[MultimodalLM, Tokenizer]:
    """The model and tokenizer of `init_from_hf_mllama` (read lazily on the meta device, the LM in `lm_dtype`
    when stored in it); `cfg` records the checkpoint's encoder and placement."""
    from mm.formats.hf_mllama import load_hf_mllama

    path = Path(cfg.init_from_hf_mllama).resolve()
    if cfg.lm or cfg.init_from or cfg.encoder_weights:
        raise ValueError(
            f"init_from_hf_mllama={path} brings the LM, image encoder and cross-attention: leave lm, init_from "
            f"and encoder_weights unset (found lm={cfg.lm!r}, init_from={cfg.init_from!r}, "
            f"encoder_weights={cfg.encoder_weights!r})"
        )
    model = load_hf_mllama(path, hf_row_compat=cfg.xattn.hf_row_compat, device=device, lm_dtype=lm_dtype)
    if cfg.xattn.layers is not None and sorted(cfg.xattn.layers) != model.xattn_layers:
        raise ValueError(f"xattn.layers={cfg.xattn.layers}, but {path} has them before {model.xattn_layers}")
    tok = Tokenizer.from_file(cfg.tokenizer or path)
    if tok.image_id != model.image_token_id:
        raise ValueError(
            f"tokenizer {cfg.tokenizer or path}: <|image|> has id {tok.image_id}, expected {model.image_token_id} "
            f"(image_token_index of {path / 'config.json'})"
        )
    enc = model.image_encoder.cfg
    if cfg.data.tile_size != enc.tile_size or not 1 <= cfg.data.max_tiles <= enc.max_tiles:
        raise ValueError(
            f"data.tile_size={cfg.data.tile_size} / data.max_tiles={cfg.data.max_tiles}: expected tile_size "
            f"{enc.tile_size} and max_tiles in 1..{enc.max_tiles} ({path}'s vision model)"
        )
    cfg.image_encoder = enc
    cfg.xattn.layers = list(model.xattn_layers)
    return model, tok


def check_image_stage_config(cfg: ImageStageConfig) -> None:
    """Refuse impossible combinations, naming the key and the allowed values (reads only the LM's config.json)."""
    enc, data = cfg.image_encoder, cfg.data
    if cfg.init_from_hf_mllama:  # the encoder and the tiling come from the checkpoint (checked on loading)
        return
    grids = supported_aspect_ratios(enc.max_tiles)
    if len(grids) > enc.max_aspect_ratio_id:
        raise ValueError(
            f"image_encoder.max_tiles={enc.max_tiles} has {len(grids)} tile grids, beyond the aspect-ratio list "
            f"of image_encoder.max_aspect_ratio_id={enc.max_aspect_ratio_id}; allowed max_tiles: "
            f"{[n for n in range(1, 17) if len(supported_aspect_ratios(n)) <= enc.max_aspect_ratio_id]}"
        )
    if not 1 <= data.max_tiles <= enc.max_tiles:
        raise ValueError(
            f"data.max_tiles={data.max_tiles} is outside the encoder's tile grids; allowed: 1..{enc.max_tiles} "
            f"(image_encoder.max_tiles)"
        )
    if data.tile_size != enc.tile_size:
        raise ValueError(
            f"data.tile_size={data.tile_size} differs from image_encoder.tile_size={enc.tile_size}; they must match"
        )
    if not cfg.lm:
        return
    config_json = Path(cfg.lm) / "config.json"
    if not config_json.is_file():
        return  # load_hf names the missing file
    n_layers = config_from_hf(json.loads(config_json.read_text()), source=str(config_json)).n_layers
    if cfg.xattn.layers:
        bad = [i for i in cfg.xattn.layers if not 0 <= int(i) < n_layers]
        if bad:
            raise ValueError(f"xattn.layers {bad} are not LM layers; allowed: 0..{n_layers - 1} ({cfg.lm})")
    elif not 1 <= cfg.xattn.every <= n_layers:
        raise ValueError(
            f"xattn.every={cfg.xattn.every} does not fit the LM's {n_layers} layers; allowed: 1..{n_layers}"
        )


def caption_head_parts(head: CaptionHeadConfig | dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """MultimodalLM kwargs for the auxiliary caption head (none when its weight is 0)."""
    if isinstance(head, dict):
        head = CaptionHeadConfig(**head)
    if head is None or not head.weight:
        return {}
    return {
        "image_aux": CaptionSlotHead(dim, head.n_slots, head.depth, head.n_heads),
        "trainable": ("image_encoder", "image_xattn", "image_aux"),
    }


def load_image_bundle(
    path: Path, *, lazy_lm_dtype: torch.dtype | None = None, weights: bool = True
) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """Rebuild a trained image model from its bundle (refusing an LM whose fingerprint changed). With
    `lazy_lm_dtype` an HF Llama LM is not read: it stays on the meta device to be read after sharding
    (`load_hf(..., device="meta")`), and the caller checks its fingerprint once it has its values. Without
    `weights` (shapes only, `mm plan`) the trained tensors are not read either."""
    meta = read_stage_config(path, IMAGE_STAGES)
    if lazy_lm_dtype is not None and meta.get("lm_format", "hf_llama") == "hf_llama":
        lm = load_lm(resolve_lm_path(path, meta), meta, device="meta", dtype=lazy_lm_dtype)
    else:
        lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    model = image_model_from_meta(meta, lm, tok)
    if weights:
        load_adapter_weights(model, path)
    return model.eval(), tok, image_transform(path, meta), meta


def image_model_from_meta(meta: dict[str, Any], lm: torch.nn.Module, tok: Tokenizer) -> MultimodalLM:
    """The image model a bundle's config describes, around `lm`, with fresh (untrained) tensors."""
    enc_cfg = ImageEncoderConfig(**meta["image_encoder"])
    mllama = meta.get("lm_format") == "hf_mllama"
    if mllama:
        from mm.formats.hf_mllama import MLLAMA_EXTRA_TOKENS, mllama_image_encoder

        encoder = mllama_image_encoder(enc_cfg)
    else:
        encoder = build_image_encoder(enc_cfg)
    return MultimodalLM(
        lm,
        encoder,
        xattn_every=meta["xattn"]["every"],
        xattn_layers=meta["xattn"].get("layers"),
        hf_row_compat=meta["xattn"]["hf_row_compat"],
        image_token_id=tok.image_id,
        extra_tokens=MLLAMA_EXTRA_TOKENS if mllama else 0,
        **caption_head_parts(meta.get("caption_head"), lm.cfg.dim),
    )


def image_transform(path: Path, meta: dict[str, Any]) -> TileTransform:
    """The tiling a bundle's config names (a Mllama checkpoint's own preprocessor config when it has one)."""
    if meta.get("lm_format") == "hf_mllama":
        from mm.formats.hf_mllama import load_hf_mllama_transform

        return load_hf_mllama_transform(resolve_lm_path(path, meta), max_tiles=meta["max_tiles"])
    enc_cfg = ImageEncoderConfig(**meta["image_encoder"])
    return TileTransform(meta["tile_size"], meta["max_tiles"], id_max_tiles=enc_cfg.max_tiles)
