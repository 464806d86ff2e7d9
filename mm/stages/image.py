"""The image stages (`image-pretrain`, `image-anneal`; Llama 3 paper §7.4): the image encoder and the
cross-attention layers train on image-caption pairs while the LM stays frozen, on the one training loop.

Freeze proof: the LM fingerprint is taken at start and checked at the end, the optimizer is checked to hold
no LM parameter, checkpoints and the final bundle hold only non-LM tensors plus the LM's fingerprint and
location. `image-anneal` starts from the `image-pretrain` bundle with more tiles and a re-warmed LR.

`init_from_hf_mllama: DIR` continues training a Llama 3.2 Vision checkpoint (a transformers Mllama directory,
`mm.formats.hf_mllama`): its LM is the frozen LM, its vision model, projection, cross-attention layers and 8 extra token
embeddings train, its `preprocessor_config.json` sets the tiling; `lm`, `init_from` and `encoder_weights` stay
unset, and the `image_encoder` / `xattn.every` sections are replaced by the checkpoint's.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.adapters.caption_head import CaptionHeadConfig, caption_slot_targets
from mm.datasets.collate import ImageCaptionCollator
from mm.datasets.images import image_decoder
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.media import read_manifest
from mm.datasets.streams import SampleStream, open_stream
from mm.datasets.tiling import TileTransform
from mm.encoders.clip import bag_of_words_loss
from mm.encoders.image import ImageEncoderConfig
from mm.formats.bundle import dataclass_dict, load_adapter_weights, read_config, save_bundle
from mm.formats.timm import build_image_encoder
from mm.lm import Tokenizer, Transformer
from mm.models.caption import caption_images, load_rgb
from mm.models.multimodal import MediaInput, MultimodalLM
from mm.prompts import IMAGE_PROMPT
from mm.stages.evaluation import check_scorers, evaluate_captions, score
from mm.stages.image_model import (
    IMAGE_STAGES,
    caption_head_parts,
    check_image_stage_config,
    load_image_bundle,
    start_from_hf_mllama,
)
from mm.training.checkpoint import load_tensors
from mm.training.config import StageConfig
from mm.training.freeze import FrozenLMChanged, fingerprint
from mm.training.parallelize import ParallelPlan
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.image")


@dataclass
class TiledPairsConfig:
    """Image-text pairs: one JSONL manifest or WebDataset shards, and the tiling (CLIP and the image stages)."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    tile_size: int = 32
    max_tiles: int = 2
    max_bad_fraction: float = 0.05
    cache_samples: bool = False  # keep decoded tiles in memory (small data, e.g. the demo)
    num_workers: int = 0  # DataLoader workers decoding this process's samples (0 = in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for faster copies to the GPU (CUDA only)
    shuffle_window: int = 1024  # WebDataset shards: shuffled within windows of this many (1 = stored order)


@dataclass
class ImageDataConfig(TiledPairsConfig):
    """The image stages' pairs and tiling, and the prompt before each caption."""

    prompt: str = IMAGE_PROMPT


@dataclass
class XAttnConfig:
    """Placement and numerics of the gated cross-attention blocks."""

    every: int = 4
    hf_row_compat: bool = False  # true: transformers' treatment of text rows that see no image (issue #39379)
    layers: list[int] | None = None  # explicit LM layer ids (overrides `every`; set from a Mllama checkpoint)


@dataclass
class ImageStageConfig(StageConfig):
    """`mm train` for an image stage."""

    stage: str = "image-pretrain"
    lm: str = ""  # HF Llama directory of the frozen LM (e.g. runs/demo/lm-pretrain/final)
    tokenizer: str | None = None  # default: the LM directory's tokenizer
    init_from: str | None = None  # a previous stage's bundle (image-anneal starts from image-pretrain)
    init_from_hf_mllama: str | None = None  # a Llama 3.2 Vision (HF Mllama) directory to keep training
    encoder_weights: str | None = None  # image encoder weights (e.g. from `mm pretrain-encoder`)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    caption_head: CaptionHeadConfig = field(default_factory=CaptionHeadConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    eval_samples: int = 256  # captions scored at the end (0 = none)
    scorers: list[str] = field(default_factory=lambda: ["exact_match"])  # `mm.stages.evaluation.score`
    curve_samples: int = 64  # images of the first held-out manifest captioned every train.eval_every steps
    out: str = "runs/image"


def build_model(cfg: ImageStageConfig, lm: torch.nn.Module, image_token_id: int) -> MultimodalLM:
    """Frozen LM + image encoder (+ weights) + cross-attention blocks."""
    enc_cfg = cfg.image_encoder
    enc_cfg.out_dim = lm.cfg.dim
    if cfg.data.max_tiles > enc_cfg.max_tiles or cfg.data.tile_size != enc_cfg.tile_size:
        raise ValueError(
            f"data.max_tiles={cfg.data.max_tiles} / data.tile_size={cfg.data.tile_size} do not fit the image "
            f"encoder (max_tiles={enc_cfg.max_tiles}, tile_size={enc_cfg.tile_size})"
        )
    encoder = build_image_encoder(enc_cfg)
    if cfg.encoder_weights:
        # The projection to the LM width is trained here (CLIP pretraining never trains it): not loaded.
        sd = {
            k: v for k, v in load_tensors(Path(cfg.encoder_weights)).items() if not k.startswith("project.")
        }
        missing, unexpected = encoder.load_state_dict(sd, strict=False)
        if unexpected:
            raise ValueError(
                f"{cfg.encoder_weights}: tensors {unexpected[:5]} are not image-encoder parameters"
            )
        log.info(
            "image encoder weights from %s (%d tensors; %d left at init)",
            cfg.encoder_weights,
            len(sd),
            len(missing),
        )
    return MultimodalLM(
        lm,
        encoder,
        xattn_every=cfg.xattn.every,
        xattn_layers=cfg.xattn.layers,
        hf_row_compat=cfg.xattn.hf_row_compat,
        image_token_id=image_token_id,
        **caption_head_parts(cfg.caption_head, lm.cfg.dim),
    )


def shapes_model(cfg: ImageStageConfig) -> MultimodalLM:
    """The model's shapes on the meta device (`mm plan`): the LM from `lm` (an HF directory's config.json or an
    LM preset name) or the Mllama checkpoint's config.json; no weight file or tokenizer is read."""
    from mm.training.stage import lm_shape

    with torch.device("meta"):
        if cfg.init_from_hf_mllama:
            from mm.formats.hf_mllama import build_mllama_model, read_mllama_config

            spec = read_mllama_config(cfg.init_from_hf_mllama)
            return build_mllama_model(spec, hf_row_compat=cfg.xattn.hf_row_compat)
        check_image_stage_config(cfg)
        shapes = copy.deepcopy(cfg)
        shapes.encoder_weights, shapes.image_encoder.weights = None, None
        lm_cfg = lm_shape(cfg.lm)
        return build_model(shapes, Transformer(lm_cfg), image_token_id=lm_cfg.vocab_size)


@register(IMAGE_STAGES, ImageStageConfig)
class ImageStage(Stage[ImageStageConfig]):
    """Caption loss (caption tokens only) on tiled images, the LM frozen; FSDP2 under torchrun."""

    reader = "caption"

    @classmethod
    def load_final(cls, path: Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
        """The image model of a final folder (its LM fingerprint checked)."""
        return load_image_bundle(path)

    def check(self) -> None:
        """The stage name, the LM or Mllama source, the data, the encoder and tiling, the placement."""
        cfg = self.cfg
        if not cfg.lm and not cfg.init_from_hf_mllama:
            raise ValueError("`lm` must name the frozen LM directory (e.g. runs/demo/lm-pretrain/final)")
        check_image_stage_config(cfg)
        check_scorers(cfg.scorers)

    def build(self, device: torch.device) -> nn.Module:
        """Frozen LM (an HF Llama directory or a Mllama checkpoint's) + image encoder + cross-attention."""
        cfg = self.cfg
        self.transform: TileTransform | None = None
        if self.ctx.shapes_only:  # `mm plan`: no weights, tokenizer or data
            self.model = shapes_model(cfg)
            return self.model
        if cfg.init_from_hf_mllama:
            from mm.formats.hf_mllama import load_hf_mllama_transform

            model, self.tok = start_from_hf_mllama(cfg, device, self.ctx.frozen_dtype)
            self.lm_path = Path(cfg.init_from_hf_mllama).resolve()
            self.transform = load_hf_mllama_transform(self.lm_path, max_tiles=cfg.data.max_tiles)
        else:
            self.lm_path = Path(cfg.lm).resolve()
            lm = self.frozen_lm(cfg.lm, device)
            self.tok = Tokenizer.from_file(cfg.tokenizer or self.lm_path)
            model = build_model(cfg, lm, self.tok.image_id).to(device)
        if cfg.init_from:
            if device.type != "meta":  # else checked once the LM has its values (check_frozen)
                self.check_frozen({"lm": fingerprint(model.lm)})
            load_adapter_weights(model, Path(cfg.init_from))
        self.model = model
        return model

    def check_frozen(self, fingerprints: dict[str, str]) -> None:
        """`init_from` must have been trained against this LM."""
        cfg = self.cfg
        if cfg.init_from and read_config(cfg.init_from)["lm_fingerprint"] != fingerprints["lm"]:
            raise FrozenLMChanged(f"{cfg.init_from} was trained against another LM than {self.lm_path}")

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The image encoder, the cross-attention (and the caption head): never the LM."""
        return self.model.trainable_named_parameters()

    def frozen(self) -> dict[str, Any]:
        """The LM."""
        return {"lm": self.model.lm}

    def parallel_plan(self) -> ParallelPlan:
        """Activation checkpointing and compile of the LM layers and cross-attention blocks, then FSDP2 per
        encoder, caption head, cross-attention block and LM layer (forward order), then the root. The blocks are
        the LM's layers and the cross-attention blocks (the backward passes through both)."""
        model = self.model
        blocks = [*model.lm.layers, *model.image_xattn.values()]
        units = [model.image_encoder]
        extra = {"media_kv": list(model.image_xattn.values()), "encode_media": [model]}
        if model.image_aux is not None:
            units.append(model.image_aux)
            extra["bag_of_words_logits"] = [model.image_aux]
        units += [*model.image_xattn.values(), *model.lm.layers]
        # the loss encodes the media first (the caption head reads them), then runs the forward
        return ParallelPlan(model, blocks=blocks, fsdp_units=units, extra_forward_methods=extra)

    def record(self) -> dict[str, Any]:
        """Where the frozen LM lives."""
        return {"lm_path": str(self.lm_path)}

    def open_data(self, rank: int, world: int) -> None:
        """This process's share of the pairs, the collator and the learning-curve images."""
        cfg = self.cfg
        if self.transform is None:  # aspect-ratio ids are numbered by the encoder's grid list
            enc = cfg.image_encoder
            self.transform = TileTransform(cfg.data.tile_size, cfg.data.max_tiles, id_max_tiles=enc.max_tiles)
        d = cfg.data
        self.collator = ImageCaptionCollator(self.tok, prompt=d.prompt, max_tiles=d.max_tiles)
        pairs = open_pairs(d, self.transform, cfg.train.seed, rank, world)
        self.stream = ResumableLoader(
            SampleReader(pairs, rank, world, self.collator), LoaderOptions.from_config(d)
        )
        self.curve = curve_images(cfg)

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's `rows` samples of the next global batch, decoded, tiled and collated by the DataLoader
        workers (`data.num_workers`; bad files are skipped and counted by the readers)."""
        return self.stream.next(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over caption tokens (+ the weighted caption-head losses, per caption token)."""
        model = self.model
        media = model.encode_media(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        # rows are right-padded: causal attention keeps pads out of real tokens, no key mask needed
        labels = batch["labels"]
        image = {"image": MediaInput(media, batch["cross_attention_mask"])}
        loss = model(batch["tokens"], image, labels=labels, loss_chunk=self.cfg.train.loss_chunk)
        head = model.image_aux
        w = self.cfg.caption_head
        if head is not None and w.weight and "media" in media.extra:
            real = (
                batch["aspect_ratio_mask"].bool().repeat_interleave(media.tokens_per_tile, dim=-1).flatten(1)
            )
            table = model.lm.tok_embeddings.weight
            slot_logits = head(media.extra["media"], real, table)
            loss = loss + w.weight * head.loss(slot_logits, caption_slot_targets(labels, head.n_slots))
            if w.bag_of_words:
                bow = head.bag_of_words_logits(media.extra["media"], real, table)
                keep = (labels != -100) & (labels != self.tok.eos_id)
                per_row = bag_of_words_loss(bow.float(), labels, keep, reduction="none")  # (B,)
                # weighted by each row's caption tokens: a sum over rows, as the caption loss (splits add up)
                loss = loss + w.bag_of_words * (per_row * (labels != -100).sum(1)).sum()
        return loss, (labels != -100).sum()

    def evaluate(self) -> dict[str, float]:
        """Exact match and per-attribute accuracy on the learning-curve images (`curve_samples`)."""
        if not self.curve:
            return {}
        images, refs = self.curve
        d = self.cfg.data
        with autocast_context(self.cfg.train.autocast, self.device):
            preds = caption_images(
                self.model, self.tok, self.transform, images, prompt=d.prompt, max_tiles=d.max_tiles
            )
        self.model.train()
        r = score(preds, refs, self.cfg.scorers)
        return {f"heldout_{k}": float(v) for k, v in r.items() if k not in ("n", "order_n")}

    def final_evaluation(self) -> dict[str, Any]:
        """Captions of the first `eval_samples` images of each held-out manifest (every process runs it)."""
        cfg, d = self.cfg, self.cfg.data
        if not self.heldout():
            return {}
        return {
            "eval": evaluate_captions(
                self.model,
                self.tok,
                self.transform,
                self.heldout(),
                limit=cfg.eval_samples,
                prompt=d.prompt,
                max_tiles=d.max_tiles,
                scorers=cfg.scorers,
            )
        }

    def bundle_meta(self) -> dict[str, Any]:
        """LM location, tokenizer, encoder, placement, caption head and tiling."""
        cfg = self.cfg
        meta = {
            "lm_path": str(self.lm_path),
            "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
            "image_encoder": {**dataclass_dict(cfg.image_encoder), "weights": None},
            "xattn": dataclass_dict(cfg.xattn),
            "caption_head": dataclass_dict(cfg.caption_head),
            "tile_size": cfg.data.tile_size,
            "max_tiles": cfg.data.max_tiles,
            "prompt": cfg.data.prompt,
        }
        if (
            cfg.init_from_hf_mllama
        ):  # the LM lives in the Mllama directory; the bundle holds the 8 extra tokens
            meta["lm_format"] = "hf_mllama"
        return meta

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """The adapter bundle: every non-LM tensor and how to rebuild the model."""
        adapter = self.gathered(self.model.adapter_state())
        if self.rank == 0:
            save_bundle(adapter, final, meta)


def open_pairs(
    d: TiledPairsConfig, transform: TileTransform, seed: int, rank: int, world: int
) -> SampleStream:
    """The training pairs, tiled, by stream position (bad files skipped and counted)."""
    return open_stream(
        d.train,
        image_decoder(transform),
        seed=seed,
        max_bad_fraction=d.max_bad_fraction,
        cache=d.cache_samples,
        rank=rank,
        world=world,
        shuffle_window=d.shuffle_window,
    )


def curve_images(cfg: ImageStageConfig) -> tuple[list[Any], list[str]] | None:
    """The learning-curve images: the first `curve_samples` of the first held-out manifest."""
    if not (cfg.train.eval_every and cfg.curve_samples and cfg.data.heldout):
        return None
    recs = read_manifest(cfg.data.heldout[0], "image")[: cfg.curve_samples]
    return [load_rgb(r.media) for r in recs], [r.text for r in recs]
