"""`mm pretrain-encoder`: contrastive (CLIP) pretraining of the image encoder with a small text tower
(Llama 3 paper section 7.2.1), on the one training loop (`mm.training.trainer.Trainer`).

The CLIP model is the `ImageEncoder` (pre-projection features, pooled) + a small causal `TextTower`, trained
with `clip_loss` on image-text pairs. The encoder's `project` (features -> LM width) is not used by the CLIP
objective and gets no gradient, so it is left out of the optimizer and stays at its initialisation.

Outputs: `OUT/final/encoder.safetensors` (the `ImageEncoder` state dict, `project.*` included, so an image
stage loads it with `encoder_weights=OUT/final/encoder.safetensors`; its `image_encoder.out_dim` must equal
that stage's LM width), `OUT/metrics.jsonl`, checkpoints, and `OUT/summary.json` with zero-shot retrieval
accuracy (image->text, text->image) on the first `eval_samples` pairs of each held-out manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm.datasets.collate import ImageCaptionCollator
from mm.datasets.images import ImageTextDataset
from mm.datasets.streams import ManifestStream, ShardStream
from mm.datasets.tiling import TileTransform
from mm.encoders.clip import (
    CLIPModel,
    TextTower,
    bag_of_words_loss,
    clip_loss,
    same_caption,
    zero_shot_retrieval_accuracy,
)
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.lm import Tokenizer, preset
from mm.stages.image import ImageDataConfig, open_image_stream
from mm.training import distributed as dist_utils
from mm.training.checkpoint import save_tensors, write_json
from mm.training.config import OptimConfig, TrainConfig, config_to_yaml
from mm.training.trainer import Task, Trainer, setup_run

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
class ClipPretrainConfig:
    """`mm pretrain-encoder`: CLIP pretraining of the image encoder."""

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
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64))
    eval_samples: int = 256  # pairs per held-out manifest for zero-shot retrieval (0 = none)
    out: str = "runs/clip"


class ClipBatcher:
    """Samples -> CLIP batch: `pixel_values` (B, T, 3, S, S), `aspect_ratio_ids` (B,), `aspect_ratio_mask`
    (B, T), right-padded `input_ids` / `attention_mask` (B, L) of `<bos> caption <eos>`."""

    def __init__(self, tokenizer: Tokenizer, max_tiles: int, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"text.max_len={max_len}: need at least 2 tokens")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.media = ImageCaptionCollator(tokenizer, max_tiles=max_tiles)

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


class ClipTask(Task):
    """CLIP loss on image-text pairs; a seeded epoch order over the manifest, resumable."""

    def __init__(
        self,
        model: CLIPModel,
        stream: ManifestStream | ShardStream,
        batcher: ClipBatcher,
        *,
        batch_size: int,
        multi_positive: bool = False,
        bag_of_words: float = 0.0,
        special_ids: tuple[int, ...] = (),
    ) -> None:
        self.model, self.stream, self.batcher = model, stream, batcher
        self.multi_positive = multi_positive
        self.bag_of_words, self.special_ids = bag_of_words, special_ids
        self.name = STAGE
        self.batch_size = batch_size

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every CLIP parameter except `image_encoder.project.*` (no gradient reaches it in CLIP)."""
        return [
            (n, p) for n, p in self.model.named_parameters() if not n.startswith("image_encoder.project.")
        ]

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """(pairs per step, 0): the text length follows the captions."""
        return self.batch_size, 0

    def next_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The next `batch_size` usable pairs in the epoch order (bad files are skipped and counted)."""
        return self.batcher([self.stream.next() for _ in range(batch_size)])

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_loss * B, B): the loop divides by the pairs of the whole step."""
        model = self.model
        pooled = model.pool_image(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        image_emb = F.normalize(model.image_proj(pooled), dim=-1)
        text_emb = model.encode_text(batch["input_ids"], batch["attention_mask"])
        n = batch["input_ids"].shape[0]
        positives = same_caption(batch["input_ids"], batch["attention_mask"]) if self.multi_positive else None
        loss = clip_loss(image_emb.float(), text_emb.float(), model.scale().float(), positives)
        if self.bag_of_words and model.bow_head is not None:
            ids = batch["input_ids"]
            keep = batch["attention_mask"].bool()
            for special in self.special_ids:
                keep &= ids != special
            loss = loss + self.bag_of_words * bag_of_words_loss(model.bow_head(pooled).float(), ids, keep)
        return loss * n, torch.tensor(n, device=loss.device)

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs in the batch."""
        return int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> int:
        """Pairs in the global batch (`tokens_per_s` counts pairs/s for this stage)."""
        return int(batch["input_ids"].shape[0])

    def data_state(self) -> dict[str, Any]:
        """Position in the sample stream."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the sample stream."""
        if state:
            self.stream.load_state_dict(state)


def build_clip_model(cfg: ClipPretrainConfig, vocab_size: int) -> CLIPModel:
    """Image encoder + text tower + projections, from the config."""
    encoder = ImageEncoder(cfg.image_encoder)
    tower = TextTower(cfg.text.build(vocab_size), cfg.embed_dim)
    if cfg.bag_of_words < 0:
        raise ValueError(f"bag_of_words must be >= 0 (0 = off), got {cfg.bag_of_words}")
    return CLIPModel(
        encoder, tower, image_pool=cfg.image_pool, bag_of_words=vocab_size if cfg.bag_of_words else 0
    )


def retrieval_eval(
    model: CLIPModel, batcher: ClipBatcher, transform: TileTransform, manifest: str, n: int
) -> dict[str, Any]:
    """Zero-shot retrieval accuracy on the first `n` usable pairs of a manifest."""
    ds = ImageTextDataset(manifest, transform)
    samples = [s for s in (ds.load(i) for i in range(min(n, len(ds)))) if s is not None]
    if not samples:
        raise ValueError(f"{manifest}: no usable held-out pairs")
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batcher(samples).items()}
    acc = zero_shot_retrieval_accuracy(
        model,
        b["pixel_values"],
        b["input_ids"],
        aspect_ratio_ids=b["aspect_ratio_ids"],
        aspect_ratio_mask=b["aspect_ratio_mask"],
        attention_mask=b["attention_mask"],
    )
    return {**acc, "n": len(samples)}


def run_encoder_pretrain(cfg: ClipPretrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train the CLIP model; write OUT/final/encoder.safetensors and OUT/summary.json."""
    if not cfg.tokenizer:
        raise ValueError(
            "`tokenizer` must name a tokenizer.json or its folder (e.g. runs/demo/lm-pretrain/final)"
        )
    if not cfg.data.train:
        raise ValueError("no training data: pass --data MANIFEST.jsonl | SHARDS.tar ... or set data.train")
    enc = cfg.image_encoder
    if cfg.data.tile_size != enc.tile_size or cfg.data.max_tiles > enc.max_tiles:
        raise ValueError(
            f"data.tile_size={cfg.data.tile_size} / data.max_tiles={cfg.data.max_tiles} do not fit the image "
            f"encoder (tile_size={enc.tile_size}, max_tiles={enc.max_tiles})"
        )
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)
    tok = Tokenizer.from_file(cfg.tokenizer)
    model = build_clip_model(cfg, tok.vocab_size).to(device)
    transform, stream = open_image_stream(cfg.data, cfg.image_encoder, tr.seed)
    batcher = ClipBatcher(tok, cfg.data.max_tiles, cfg.text.max_len)
    task = ClipTask(
        model,
        stream,
        batcher,
        batch_size=tr.batch_size,
        multi_positive=cfg.multi_positive,
        bag_of_words=cfg.bag_of_words,
        special_ids=(tok.bos_id, tok.eos_id, tok.pad_id),
    )
    trainer = Trainer(task, tr, cfg.optim, out, config_record={"yaml": config_to_yaml(cfg)})
    if dist_utils.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    summary = trainer.fit(resume=resume)
    summary["data_skips"] = stream.stats()
    if summary["stopped"] != "max_steps":
        return summary
    if dist_utils.rank() == 0:
        final = out / "final"
        final.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in model.image_encoder.state_dict().items()}
        save_tensors(sd, final / "encoder.safetensors")
        summary["final"] = str(final / "encoder.safetensors")
        if cfg.eval_samples and cfg.data.heldout:
            summary["retrieval"] = {
                Path(m).stem: retrieval_eval(model, batcher, transform, m, cfg.eval_samples)
                for m in cfg.data.heldout
            }
        write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    return summary
