"""The image stages (`image-pretrain`, `image-anneal`; Llama 3 paper §7.4): the image encoder and the
cross-attention layers train on image-caption pairs while the LM stays frozen, on the one training loop.

Freeze proof: the LM fingerprint is taken at start and checked at the end, the optimizer is checked to hold
no LM parameter, checkpoints and the final bundle hold only non-LM tensors plus the LM's fingerprint and
location. `image-anneal` starts from the `image-pretrain` bundle with more tiles and a re-warmed LR.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm import distributed as dist_utils
from mm.bundle import dataclass_dict, load_adapter_weights, read_config, save_bundle
from mm.caption import caption_images
from mm.checkpoint import latest_checkpoint, load_tensors, write_json
from mm.config import OptimConfig, TrainConfig, config_to_yaml
from mm.datasets.collate import ImageCaptionCollator
from mm.datasets.shapes import IMAGE_PROMPT
from mm.datasets.streams import ManifestStream, ShardStream, open_stream
from mm.datasets.tiling import TileTransform
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.freeze import FrozenLMChanged, assert_not_in_optimizer, fingerprint, freeze
from mm.lm import Tokenizer, load_hf
from mm.multimodal import MultimodalLM
from mm.train import Task, Trainer, setup_run

log = logging.getLogger("mm.image_stage")

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
    hf_row_compat: bool = False


@dataclass
class ImageStageConfig:
    """`mm train` for an image stage."""

    stage: str = "image-pretrain"
    lm: str = ""  # HF Llama directory of the frozen LM (e.g. runs/demo/lm-pretrain/final)
    tokenizer: str | None = None  # default: the LM directory's tokenizer
    init_from: str | None = None  # a previous stage's bundle (image-anneal starts from image-pretrain)
    encoder_weights: str | None = None  # image encoder weights (e.g. from `mm pretrain-encoder`)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_samples: int = 256  # captions scored at the end (0 = none)
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
    ) -> None:
        self.model, self.stream, self.collator, self.name = model, stream, collator, name
        self.batch_size = batch_size

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
        """Summed cross-entropy over caption tokens."""
        logits = self.model(
            batch["tokens"],
            pixel_values=batch["pixel_values"],
            aspect_ratio_ids=batch["aspect_ratio_ids"],
            aspect_ratio_mask=batch["aspect_ratio_mask"],
            cross_attention_mask=batch["cross_attention_mask"],
        )  # rows are right-padded: causal attention keeps pads out of real tokens, no key mask needed
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss, (labels != -100).sum()

    def data_state(self) -> dict[str, Any]:
        """Position in the sample stream."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the sample stream."""
        if state:
            self.stream.load_state_dict(state)


def open_image_stream(
    data: ImageDataConfig, encoder: ImageEncoderConfig, seed: int
) -> tuple[TileTransform, ManifestStream | ShardStream]:
    """The tiling and the resumable training stream of an image-text stage."""
    # Aspect-ratio ids are numbered by the encoder's grid list, whatever this stage's tile budget.
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
        hf_row_compat=cfg.xattn.hf_row_compat,
        image_token_id=tok.image_id,
    )


def run_image_stage(cfg: ImageStageConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train one image stage and write OUT/final (adapter bundle) and OUT/summary.json."""
    if cfg.stage not in IMAGE_STAGES:
        raise ValueError(f"stage={cfg.stage!r}; image stages: {list(IMAGE_STAGES)}")
    if not cfg.lm:
        raise ValueError("`lm` must name the frozen LM directory (e.g. runs/demo/lm-pretrain/final)")
    if not cfg.data.train:
        raise ValueError("no training data: pass --data MANIFEST.jsonl|SHARD.tar ... or set data.train")
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)
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
        dist_utils.apply_fsdp(
            model, blocks, extra_forward_methods={"media_kv": list(model.image_xattn.values())}
        )
    transform, stream = open_image_stream(cfg.data, cfg.image_encoder, tr.seed)
    collator = ImageCaptionCollator(tok, prompt=cfg.data.prompt, max_tiles=cfg.data.max_tiles)
    task = ImageCaptionTask(model, stream, collator, batch_size=tr.batch_size, name=cfg.stage)
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
        "tile_size": cfg.data.tile_size,
        "max_tiles": cfg.data.max_tiles,
        "prompt": cfg.data.prompt,
    }
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
    from mm.caption import load_rgb
    from mm.datasets.images import read_manifest

    res = {}
    for m in manifests:
        recs = read_manifest(m)[: cfg.eval_samples]
        images = [load_rgb(r.image) for r in recs]
        preds = caption_images(
            model, tok, transform, images, prompt=cfg.data.prompt, max_tiles=cfg.data.max_tiles
        )
        res[Path(m).stem] = exact_match_report(preds, [r.text for r in recs])
    return res


def load_image_bundle(path: Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """Rebuild a trained image model from its bundle (refusing an LM whose fingerprint changed)."""
    from mm.bundle import load_lm_checked, load_tokenizer

    meta = read_config(path)
    lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    freeze(lm)
    enc_cfg = ImageEncoderConfig(**meta["image_encoder"])
    encoder = ImageEncoder(enc_cfg)
    model = MultimodalLM(
        lm,
        encoder,
        xattn_every=meta["xattn"]["every"],
        hf_row_compat=meta["xattn"]["hf_row_compat"],
        image_token_id=tok.image_id,
    )
    load_adapter_weights(model, path)
    transform = TileTransform(meta["tile_size"], meta["max_tiles"], id_max_tiles=enc_cfg.max_tiles)
    return model.eval(), tok, transform, meta
