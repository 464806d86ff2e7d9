"""The `clip-pretrain` stage (`mm pretrain-encoder`): contrastive (CLIP) pretraining of the image encoder with a small text tower
(Llama 3 paper section 7.2.1), a stage of the one runner.

The CLIP model is the `ImageEncoder` (pre-projection features, pooled) + a small causal `TextTower`, trained
with `clip_loss` on image-text pairs. The encoder's `project` (features -> LM width) is not used by the CLIP
objective and gets no gradient, so it is left out of the optimizer and stays at its initialisation.

Outputs: `OUT/final/encoder.safetensors` (the `ImageEncoder` state dict, `project.*` included, so an image
stage loads it with `encoder_weights=OUT/final/encoder.safetensors`; its `image_encoder.out_dim` must equal
that stage's LM width), `OUT/metrics.jsonl`, checkpoints, and `OUT/summary.json` with zero-shot retrieval
accuracy (image->text, text->image) on the first `eval_samples` pairs of each held-out manifest.

Under torchrun the model is replicated (gradients all-reduced) and each process reads its own pairs; the
contrastive loss gathers every process's embeddings (`clip_loss(..., gather=True)`), so it is the loss of the
whole global batch, as in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.datasets.collate import ImageCaptionCollator
from mm.datasets.images import image_decoder
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.media import MediaTextDataset
from mm.datasets.tiling import TileTransform
from mm.encoders.clip import (
    CLIPModel,
    TextTower,
    bag_of_words_loss,
    clip_loss,
    same_caption,
    zero_shot_retrieval_accuracy,
)
from mm.encoders.image import ImageEncoderConfig
from mm.formats.timm import build_image_encoder
from mm.lm import Tokenizer, preset
from mm.stages.image import TiledPairsConfig, open_pairs
from mm.training.checkpoint import save_tensors
from mm.training.config import StageConfig, TrainConfig
from mm.training.parallelize import ParallelPlan
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.clip_pretrain")

STAGE = "clip-pretrain"


@dataclass
class TextTowerConfig:
    """The small text tower: an `mm.lm` preset with optional shape overrides (None = the preset's value)."""

    preset: str = "nano"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_len: int = 64  # caption tokens (with begin/end tokens) kept per pair

    def build(self, vocab_size: int) -> Any:
        """The `LMConfig` of the tower for a tokenizer of `vocab_size` ids."""
        shape = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")}
        overrides = {k: v for k, v in shape.items() if v is not None}
        return preset(self.preset, vocab_size=vocab_size, **overrides)


@dataclass
class ClipPretrainConfig(StageConfig):
    """`mm pretrain-encoder` / `stage: clip-pretrain`: CLIP pretraining of the image encoder."""

    stage: str = STAGE

    tokenizer: str = ""  # tokenizer.json or its folder (e.g. the demo LM directory); required
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 64
    image_pool: str = "mean"  # mean | cls
    # true: identical captions in a batch count as matches (a small world repeats captions); false: CLIP's
    # one-positive loss, which pushes apart images whose captions are the same
    multi_positive: bool = False
    # weight of a caption bag-of-words loss on the pooled image features (0 = off): which words the caption
    # holds, asked of the image directly; with max pooling it teaches shape detectors far faster than CLIP alone
    bag_of_words: float = 0.0
    data: TiledPairsConfig = field(default_factory=TiledPairsConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))
    eval_samples: int = 256  # pairs per held-out manifest for zero-shot retrieval (0 = none)
    out: str = "runs/clip"


class ClipCollator:
    """Samples -> CLIP batch: `pixel_values` (B, T, 3, S, S), `aspect_ratio_ids` (B,), `aspect_ratio_mask`
    (B, T), right-padded `input_ids` / `attention_mask` (B, L) of `<bos> caption <eos>`."""

    def __init__(self, tokenizer: Tokenizer, max_tiles: int, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"text.max_len={max_len}: need at least 2 tokens")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.media = ImageCaptionCollator(tokenizer, "", max_tiles=max_tiles)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate one batch (samples must not be None)."""
        tok = self.tokenizer
        media = self.media.media(samples)
        rows = []
        for s in samples:
            ids = tok.encode(s["text"], bos=True)[: self.max_len - 1]
            rows.append([*ids, tok.eos_id])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, : len(r)] = 1
        return {
            "pixel_values": media["pixel_values"][:, 0],
            "aspect_ratio_ids": media["aspect_ratio_ids"][:, 0],
            "aspect_ratio_mask": media["aspect_ratio_mask"][:, 0],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }


def build_clip_model(cfg: ClipPretrainConfig, vocab_size: int) -> CLIPModel:
    """Image encoder + text tower + projections, from the config."""
    encoder = build_image_encoder(cfg.image_encoder)
    tower = TextTower(cfg.text.build(vocab_size), cfg.embed_dim)
    if cfg.bag_of_words < 0:
        raise ValueError(f"bag_of_words must be >= 0 (0 = off), got {cfg.bag_of_words}")
    return CLIPModel(
        encoder, tower, image_pool=cfg.image_pool, bag_of_words=vocab_size if cfg.bag_of_words else 0
    )


def retrieval_eval(
    model: CLIPModel, collator: ClipCollator, transform: TileTransform, manifest: str, n: int
) -> dict[str, Any]:
    """Zero-shot retrieval accuracy on the first `n` usable pairs of a manifest."""
    ds = MediaTextDataset(manifest, image_decoder(transform))
    samples = [s for s in (ds.load(i) for i in range(min(n, len(ds)))) if s is not None]
    if not samples:
        raise ValueError(f"{manifest}: no usable held-out pairs")
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in collator(samples).items()}
    acc = zero_shot_retrieval_accuracy(
        model,
        b["pixel_values"],
        b["input_ids"],
        aspect_ratio_ids=b["aspect_ratio_ids"],
        aspect_ratio_mask=b["aspect_ratio_mask"],
        attention_mask=b["attention_mask"],
    )
    return {**acc, "n": len(samples)}


@register((STAGE,), ClipPretrainConfig)
class ClipStage(Stage[ClipPretrainConfig]):
    """CLIP loss on image-text pairs (+ the caption bag-of-words loss); replicated under torchrun."""

    def check(self) -> None:
        """The tokenizer, the data, the tiling against the encoder."""
        cfg = self.cfg
        self.require("tokenizer", "a tokenizer.json or its folder (e.g. runs/demo/lm-pretrain/final)")
        enc = cfg.image_encoder
        if cfg.data.tile_size != enc.tile_size or cfg.data.max_tiles > enc.max_tiles:
            raise ValueError(
                f"data.tile_size={cfg.data.tile_size} / data.max_tiles={cfg.data.max_tiles} do not fit the "
                f"image encoder (tile_size={enc.tile_size}, max_tiles={enc.max_tiles})"
            )

    def build(self, device: torch.device) -> nn.Module:
        """Image encoder + text tower + projections."""
        self.tok = Tokenizer.from_file(self.cfg.tokenizer)
        self.model = build_clip_model(self.cfg, self.tok.vocab_size).to(device)
        return self.model

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Every CLIP parameter except `image_encoder.project.*` (no gradient reaches it in CLIP)."""
        return [
            (n, p) for n, p in self.model.named_parameters() if not n.startswith("image_encoder.project.")
        ]

    def parallel_plan(self) -> ParallelPlan:
        """Activation checkpointing and compile of the text tower's layers; the model is replicated."""
        return ParallelPlan(self.model, blocks=list(self.model.text_tower.transformer.layers))

    def open_data(self, rank: int, world: int) -> None:
        """This process's pairs and the collator."""
        cfg, d = self.cfg, self.cfg.data
        self.transform = TileTransform(d.tile_size, d.max_tiles, id_max_tiles=cfg.image_encoder.max_tiles)
        self.collator = ClipCollator(self.tok, d.max_tiles, cfg.text.max_len)
        pairs = open_pairs(d, self.transform, cfg.train.seed, rank, world)
        self.stream = ResumableLoader(
            SampleReader(pairs, rank, world, self.collator), LoaderOptions.from_config(d)
        )

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's `rows` pairs of the next global batch, collated by the DataLoader workers (bad files
        are skipped and counted)."""
        return self.stream.next(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CLIP loss of this process's pairs against every process's, pairs): the loop divides by the
        pairs of the whole step."""
        model, cfg = self.model, self.cfg
        pooled = model.pool_image(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        image_emb = F.normalize(model.image_proj(pooled), dim=-1)
        text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positives = same_caption(ids, mask, gather=True) if cfg.multi_positive else None
        loss = clip_loss(
            image_emb.float(),
            text_emb.float(),
            model.scale().float(),
            positives,
            reduction="sum",
            gather=True,
        )
        if cfg.bag_of_words and model.bow_head is not None:
            keep = mask.bool()
            for special in (self.tok.bos_id, self.tok.eos_id, self.tok.pad_id):
                keep &= ids != special
            bow = bag_of_words_loss(model.bow_head(pooled).float(), ids, keep, reduction="sum")
            loss = loss + cfg.bag_of_words * bow
        return loss, torch.tensor(ids.shape[0], device=loss.device)

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs in the batch."""
        return int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> int:
        """Pairs in the batch (`tokens_per_s` counts pairs/s for this stage)."""
        return int(batch["input_ids"].shape[0])

    def _retrieval(self, limit: int) -> dict[str, Any]:
        with autocast_context(self.cfg.train.autocast, self.device):
            res = {
                Path(m).stem: retrieval_eval(self.model, self.collator, self.transform, m, limit)
                for m in self.cfg.data.heldout
            }
        self.model.train()
        return res

    def evaluate(self) -> dict[str, float]:
        """Zero-shot retrieval accuracy on the first `eval_samples` pairs of the first held-out manifest."""
        if not (self.cfg.eval_samples and self.cfg.data.heldout):
            return {}
        first = next(iter(self._retrieval(self.cfg.eval_samples).values()))
        return {f"heldout_{k}": float(v) for k, v in first.items() if k != "n"}

    def final_evaluation(self) -> dict[str, Any]:
        """Zero-shot retrieval on every held-out manifest."""
        if not (self.cfg.eval_samples and self.cfg.data.heldout):
            return {}
        return {"retrieval": self._retrieval(self.cfg.eval_samples)}

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """`final/encoder.safetensors`: the image encoder's state dict (`project.*` included)."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.model.image_encoder.state_dict().items()}
        if self.rank == 0:
            final.mkdir(parents=True, exist_ok=True)
            save_tensors(sd, final / "encoder.safetensors")

    def finish(self, trainer: Any, summary: dict[str, Any]) -> None:
        """The summary names the encoder file."""
        summary["final"] = str(Path(self.cfg.out) / "final" / "encoder.safetensors")
