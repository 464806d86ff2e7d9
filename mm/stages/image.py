"""The image stages (`image-pretrain`, `image-anneal`; Llama 3 paper §7.4): the image encoder and the
cross-attention layers train on image-caption pairs while the LM stays frozen, on the one training loop.

Freeze proof: the LM fingerprint is taken at start and checked at the end, the optimizer is checked to hold
no LM parameter, checkpoints and the final bundle hold only non-LM tensors plus the LM's fingerprint and
location. `image-anneal` starts from the `image-pretrain` bundle with more tiles and a re-warmed LR.

`init_from_hf_mllama: DIR` continues training a Llama 3.2 Vision checkpoint (a transformers Mllama directory,
`mm.models.mllama`): its LM is the frozen LM, its vision model, projection, cross-attention layers and 8 extra token
embeddings train, its `preprocessor_config.json` sets the tiling; `lm`, `init_from` and `encoder_weights` stay
unset, and the `image_encoder` / `xattn.every` sections are replaced by the checkpoint's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm.adapters.caption_head import CaptionSlotHead, caption_slot_targets
from mm.datasets.collate import ImageCaptionCollator
from mm.datasets.shapes import IMAGE_PROMPT, caption_attribute_report, parse_caption
from mm.datasets.streams import ManifestStream, ShardStream, open_stream
from mm.datasets.tiling import TileTransform, supported_aspect_ratios
from mm.encoders.clip import bag_of_words_loss
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.lm import Tokenizer, load_hf
from mm.lm.hf import config_from_hf
from mm.models.caption import caption_images
from mm.models.multimodal import MultimodalLM
from mm.training import distributed as dist_utils
from mm.training.bundle import dataclass_dict, load_adapter_weights, read_config, save_bundle
from mm.training.checkpoint import latest_checkpoint, load_tensors, write_json
from mm.training.config import OptimConfig, TrainConfig, config_to_yaml
from mm.training.freeze import FrozenLMChanged, assert_not_in_optimizer, fingerprint, freeze
from mm.training.trainer import Task, Trainer, setup_run

log = logging.getLogger("mm.stages.image")

IMAGE_STAGES = ("image-pretrain", "image-anneal")


@dataclass
class ImageDataConfig:
    """Image-caption pairs: JSONL manifests or WebDataset shards, and the tiling."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    tile_size: int = 32
    max_tiles: int = 2
    max_bad_fraction: float = 0.05
    prompt: str = IMAGE_PROMPT
    cache_samples: bool = False  # keep decoded tiles in memory (small data, e.g. the demo)


@dataclass
class XAttnConfig:
    """Placement and numerics of the gated cross-attention blocks."""

    every: int = 4
    hf_row_compat: bool = False  # true: transformers' treatment of text rows that see no image (issue #39379)
    layers: list[int] | None = None  # explicit LM layer ids (overrides `every`; set from a Mllama checkpoint)


@dataclass
class CaptionHeadConfig:
    """The auxiliary caption head on the media tokens (`adapters.CaptionSlotHead`; training only)."""

    weight: float = 0.0  # its loss is added to the caption loss with this weight (0 = no head)
    n_slots: int = 16  # caption tokens it names (the shapes world's longest caption has 11 + the end token)
    depth: int = 2
    n_heads: int = 4
    # weight of a caption bag-of-words loss on the max-pooled media tokens (which words the caption holds),
    # per caption token; needs the head (weight > 0)
    bag_of_words: float = 0.0

    def __post_init__(self) -> None:
        if self.bag_of_words < 0:
            raise ValueError(f"caption_head.bag_of_words must be >= 0 (0 = off), got {self.bag_of_words}")
        if self.weight < 0:
            raise ValueError(f"caption_head.weight must be >= 0 (0 = off), got {self.weight}")


@dataclass
class ImageStageConfig:
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
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_samples: int = 256  # captions scored at the end (0 = none)
    curve_samples: int = 64  # images of the first held-out manifest captioned every train.eval_every steps
    out: str = "runs/image"


class ImageCaptionTask(Task):
    """Caption loss (caption tokens only) on tiled images; a seeded epoch order, resumable."""

    def __init__(
        self,
        model: MultimodalLM,
        stream: ManifestStream | ShardStream,
        collator: ImageCaptionCollator,
        *,
        batch_size: int,
        name: str,
        head_weight: float = 0.0,
        bow_weight: float = 0.0,
        curve: tuple[TileTransform, list[Any], list[str]] | None = None,
    ) -> None:
        self.model, self.stream, self.collator, self.name = model, stream, collator, name
        self.curve = curve  # (transform, images, captions) of the learning curve
        self.batch_size = batch_size
        self.head_weight = head_weight if model.image_aux is not None else 0.0
        self.bow_weight = bow_weight if model.image_aux is not None else 0.0

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Only the trainable parts (never the LM)."""
        return self.model.trainable_named_parameters()

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """(images per step, 0): the text length follows the captions."""
        return self.batch_size, 0

    def next_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The next `batch_size` usable samples (bad files are skipped and counted by the readers)."""
        return self.collator([self.stream.next() for _ in range(batch_size)])

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over caption tokens (+ the weighted caption-head loss, per caption token)."""
        media = self.model.encode_media(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        logits = self.model(
            batch["tokens"], media=media, cross_attention_mask=batch["cross_attention_mask"]
        )  # rows are right-padded: causal attention keeps pads out of real tokens, no key mask needed
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        if self.head_weight and "media" in media.extra:
            head = self.model.image_aux
            per_tile = media.tokens_per_tile
            real = batch["aspect_ratio_mask"].bool().repeat_interleave(per_tile, dim=-1).flatten(1)  # (B, M)
            slot_logits = head(media.extra["media"], real, self.model.lm.tok_embeddings.weight)
            targets = caption_slot_targets(labels, head.n_slots)
            loss = loss + self.head_weight * head.loss(slot_logits, targets)
            if self.bow_weight:
                table = self.model.lm.tok_embeddings.weight
                bow = head.bag_of_words_logits(media.extra["media"], real, table)
                keep = (labels != -100) & (labels != self.collator.tokenizer.eos_id)
                per_row = bag_of_words_loss(bow.float(), labels, keep, reduction="none")  # (B,)
                # weighted by each row's caption tokens: a sum over rows, as the caption loss (splits add up)
                loss = loss + self.bow_weight * (per_row * (labels != -100).sum(1)).sum()
        return loss, (labels != -100).sum()

    def evaluate(self) -> dict[str, float]:
        """Exact match and per-attribute accuracy on the learning-curve images (`curve_samples`)."""
        if not self.curve:
            return {}
        transform, images, refs = self.curve
        preds = caption_images(
            self.model,
            self.collator.tokenizer,
            transform,
            images,
            prompt=self.collator.prompt,
            max_tiles=self.collator.max_tiles,
        )
        self.model.train()
        r = caption_attribute_report(preds, refs)
        return {f"heldout_{k}": float(v) for k, v in r.items() if k not in ("n", "order_n")}

    def data_state(self) -> dict[str, Any]:
        """Position in the sample stream."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the sample stream."""
        if state:
            self.stream.load_state_dict(state)


def curve_images(
    cfg: ImageStageConfig, transform: TileTransform
) -> tuple[TileTransform, list[Any], list[str]] | None:
    """The learning-curve images: the first `curve_samples` of the first held-out manifest (world captions)."""
    if not (cfg.train.eval_every and cfg.curve_samples and cfg.data.heldout):
        return None
    from mm.datasets.images import read_manifest
    from mm.models.caption import load_rgb

    recs = read_manifest(cfg.data.heldout[0])[: cfg.curve_samples]
    if not all(parse_caption(r.text) is not None for r in recs):
        return None
    return transform, [load_rgb(r.image) for r in recs], [r.text for r in recs]


def open_image_stream(
    data: ImageDataConfig, encoder: ImageEncoderConfig, seed: int, transform: TileTransform | None = None
) -> tuple[TileTransform, ManifestStream | ShardStream]:
    """The tiling (default: CLIP normalisation, bilinear) and the resumable training stream of an image stage."""
    # Aspect-ratio ids are numbered by the encoder's grid list, whatever this stage's tile budget.
    if transform is None:
        transform = TileTransform(data.tile_size, data.max_tiles, id_max_tiles=encoder.max_tiles)
    stream = open_stream(
        data.train, transform, seed=seed, max_bad_fraction=data.max_bad_fraction, cache=data.cache_samples
    )
    return transform, stream


def exact_match_report(preds: list[str], refs: list[str]) -> dict[str, Any]:
    """Exact match and attribute accuracy (size, colour, shape per object slot) of captions."""
    em = sum(p == r for p, r in zip(preds, refs, strict=True)) / max(1, len(refs))
    correct = total = 0
    for p, r in zip(preds, refs, strict=True):
        pw, rw = p.split(), r.split()
        for i, w in enumerate(rw):
            if w in ("a", "and", "an"):
                continue
            total += 1
            correct += int(i < len(pw) and pw[i] == w)
    return {"exact_match": em, "attribute_accuracy": correct / max(1, total), "n": len(refs)}


def build_model(cfg: ImageStageConfig, lm: torch.nn.Module, tok: Tokenizer) -> MultimodalLM:
    """Frozen LM + image encoder (+ weights) + cross-attention blocks."""
    enc_cfg = cfg.image_encoder
    enc_cfg.out_dim = lm.cfg.dim
    if cfg.data.max_tiles > enc_cfg.max_tiles or cfg.data.tile_size != enc_cfg.tile_size:
        raise ValueError(
            f"data.max_tiles={cfg.data.max_tiles} / data.tile_size={cfg.data.tile_size} do not fit the image "
            f"encoder (max_tiles={enc_cfg.max_tiles}, tile_size={enc_cfg.tile_size})"
        )
    encoder = ImageEncoder(enc_cfg)
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
        image_token_id=tok.image_id,
        **caption_head_parts(cfg.caption_head, lm.cfg.dim),
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


def start_from_hf_mllama(cfg: ImageStageConfig, device: torch.device) -> tuple[MultimodalLM, Tokenizer]:
    """The model and tokenizer of `init_from_hf_mllama`; `cfg` records the checkpoint's encoder and placement."""
    from mm.models.mllama import load_hf_mllama

    path = Path(cfg.init_from_hf_mllama).resolve()
    if cfg.lm or cfg.init_from or cfg.encoder_weights:
        raise ValueError(
            f"init_from_hf_mllama={path} brings the LM, image encoder and cross-attention: leave lm, init_from "
            f"and encoder_weights unset (found lm={cfg.lm!r}, init_from={cfg.init_from!r}, "
            f"encoder_weights={cfg.encoder_weights!r})"
        )
    model = load_hf_mllama(path, hf_row_compat=cfg.xattn.hf_row_compat, device=device)
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


def run_image_stage(cfg: ImageStageConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train one image stage and write OUT/final (adapter bundle) and OUT/summary.json."""
    if cfg.stage not in IMAGE_STAGES:
        raise ValueError(f"stage={cfg.stage!r}; image stages: {list(IMAGE_STAGES)}")
    if not cfg.lm and not cfg.init_from_hf_mllama:
        raise ValueError("`lm` must name the frozen LM directory (e.g. runs/demo/lm-pretrain/final)")
    if not cfg.data.train:
        raise ValueError("no training data: pass --data MANIFEST.jsonl|SHARD.tar ... or set data.train")
    check_image_stage_config(cfg)  # before any weights or data are read
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)
    transform = None
    if cfg.init_from_hf_mllama:
        from mm.models.mllama import load_hf_mllama_transform

        model, tok = start_from_hf_mllama(cfg, device)
        lm, lm_path = model.lm, Path(cfg.init_from_hf_mllama).resolve()
        transform = load_hf_mllama_transform(lm_path, max_tiles=cfg.data.max_tiles)
        fp_start = fingerprint(lm)
    else:
        lm_path = Path(cfg.lm).resolve()
        lm = load_hf(lm_path, device=device)
        tok = Tokenizer.from_file(cfg.tokenizer or lm_path)
        freeze(lm)
        fp_start = fingerprint(lm)
        model = build_model(cfg, lm, tok).to(device)
    if cfg.init_from:
        prev = read_config(cfg.init_from)
        if prev["lm_fingerprint"] != fp_start:
            raise FrozenLMChanged(f"{cfg.init_from} was trained against another LM than {lm_path}")
        load_adapter_weights(model, Path(cfg.init_from))
    if resume:
        ck = latest_checkpoint(out / "checkpoints")
        if ck is not None:
            rec = json.loads((ck / "trainer.json").read_text())["config"]
            if rec.get("lm_fingerprint") != fp_start:
                raise FrozenLMChanged(f"{ck} belongs to an LM with another fingerprint than {lm_path}")
    if dist_utils.world_size() > 1:  # FSDP2 from outside the model code: LM layers, adapters, encoder, root
        blocks = [*lm.layers, *model.image_xattn.values(), model.image_encoder]
        extra = {"media_kv": list(model.image_xattn.values()), "encode_media": [model]}
        if model.image_aux is not None:
            blocks.append(model.image_aux)
            extra["bag_of_words_logits"] = [model.image_aux]
        # the loss encodes the media first (the caption head reads them), then runs the forward
        dist_utils.apply_fsdp(model, blocks, extra_forward_methods=extra)
    transform, stream = open_image_stream(cfg.data, cfg.image_encoder, tr.seed, transform)
    collator = ImageCaptionCollator(tok, prompt=cfg.data.prompt, max_tiles=cfg.data.max_tiles)
    task = ImageCaptionTask(
        model,
        stream,
        collator,
        batch_size=tr.batch_size,
        name=cfg.stage,
        head_weight=cfg.caption_head.weight,
        bow_weight=cfg.caption_head.bag_of_words,
        curve=curve_images(cfg, transform),
    )
    meta_record = {"yaml": config_to_yaml(cfg), "lm_fingerprint": fp_start, "lm_path": str(lm_path)}
    trainer = Trainer(task, tr, cfg.optim, out, config_record=meta_record)
    assert_not_in_optimizer(lm, trainer.optimizer)
    if dist_utils.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    summary = trainer.fit(resume=resume)
    fp_end = fingerprint(lm)
    if fp_end != fp_start:
        raise FrozenLMChanged(f"the LM changed during {cfg.stage}: {fp_start[:16]}... -> {fp_end[:16]}...")
    summary.update(lm_fingerprint_start=fp_start, lm_fingerprint_end=fp_end, data_skips=stream.stats())
    if summary["stopped"] != "max_steps":
        return summary
    meta = {
        "stage": cfg.stage,
        "lm_path": str(lm_path),
        "lm_fingerprint": fp_start,
        "lm_fingerprint_start": fp_start,
        "lm_fingerprint_end": fp_end,
        "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
        "image_encoder": {**dataclass_dict(cfg.image_encoder), "weights": None},
        "xattn": dataclass_dict(cfg.xattn),
        "caption_head": dataclass_dict(cfg.caption_head),
        "tile_size": cfg.data.tile_size,
        "max_tiles": cfg.data.max_tiles,
        "prompt": cfg.data.prompt,
    }
    if cfg.init_from_hf_mllama:  # the LM lives in the Mllama directory; the bundle holds the 8 extra tokens
        meta["lm_format"] = "hf_mllama"
    adapter = dist_utils.full_tensors(model.adapter_state())
    if cfg.eval_samples and cfg.data.heldout:  # every process runs it (FSDP forwards are collective)
        summary["eval"] = evaluate_captions(model, tok, transform, cfg, cfg.data.heldout)
    if dist_utils.rank() == 0:
        save_bundle(adapter, out / "final", meta)
        write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    dist_utils.barrier()
    return summary


def evaluate_captions(
    model: MultimodalLM, tok: Tokenizer, transform: TileTransform, cfg: ImageStageConfig, manifests: list[str]
) -> dict[str, Any]:
    """Caption the first `eval_samples` images of each held-out manifest; exact match and attributes."""
    from mm.datasets.images import read_manifest
    from mm.models.caption import load_rgb

    res = {}
    for m in manifests:
        recs = read_manifest(m)[: cfg.eval_samples]
        images = [load_rgb(r.image) for r in recs]
        preds = caption_images(
            model, tok, transform, images, prompt=cfg.data.prompt, max_tiles=cfg.data.max_tiles
        )
        refs = [r.text for r in recs]
        world = all(
            parse_caption(t) is not None for t in refs
        )  # shapes-world captions: per-attribute figures
        res[Path(m).stem] = {
            **exact_match_report(preds, refs),
            **(caption_attribute_report(preds, refs) if world else {}),
            "examples": [
                {"image": str(r.image), "text": r.text, "pred": p}
                for r, p in zip(recs[:16], preds, strict=False)
            ],
        }
    return res


def load_image_bundle(path: Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """Rebuild a trained image model from its bundle (refusing an LM whose fingerprint changed)."""
    from mm.training.bundle import load_lm_checked, load_tokenizer, resolve_lm_path

    meta = read_config(path)
    lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    freeze(lm)
    enc_cfg = ImageEncoderConfig(**meta["image_encoder"])
    mllama = meta.get("lm_format") == "hf_mllama"
    if mllama:
        from mm.models.mllama import MLLAMA_EXTRA_TOKENS, load_hf_mllama_transform, mllama_image_encoder

        encoder = mllama_image_encoder(enc_cfg)
    else:
        encoder = ImageEncoder(enc_cfg)
    model = MultimodalLM(
        lm,
        encoder,
        xattn_every=meta["xattn"]["every"],
        xattn_layers=meta["xattn"].get("layers"),
        hf_row_compat=meta["xattn"]["hf_row_compat"],
        image_token_id=tok.image_id,
        extra_tokens=MLLAMA_EXTRA_TOKENS if mllama else 0,
        **caption_head_parts(meta.get("caption_head"), lm.cfg.dim),
    )
    load_adapter_weights(model, path)
    if mllama:
        transform = load_hf_mllama_transform(resolve_lm_path(path, meta), max_tiles=meta["max_tiles"])
    else:
        transform = TileTransform(meta["tile_size"], meta["max_tiles"], id_max_tiles=enc_cfg.max_tiles)
    return model.eval(), tok, transform, meta
