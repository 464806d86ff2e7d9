"""The `vision-sft` stage (Llama 3 paper §7.5, post-training; `paper-notes.md`): the pretrained LM is swapped for
the instruct LM (frozen), and the image encoder and the cross-attention layers (video's too) are fine-tuned on
chat-formatted instruction data (`mm.datasets.chat`): questions about one or several images and about videos,
loss on the assistant's answers only, on the one training loop.

It starts from an image or video stage's final folder (`init_from`) trained against the pretrained LM (its
fingerprint is checked when it loads) and names the instruct LM (`lm`, e.g. the `lm-sft` stage's final folder).
Before training it measures what carries over with no training (`hot_swap`): captions of `caption_heldout` with
the pretrained LM and with the instruct LM swapped in, and question answering on the first held-out manifest.
The freeze proof holds for the instruct LM: fingerprinted at start and end, none of its parameters in the
optimizer, and the final folder holds only non-LM tensors plus the instruct LM's location and fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.datasets.chat import ChatDataset
from mm.datasets.chat_collate import ChatCollator
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.media import read_manifest
from mm.datasets.streams import SampleStream
from mm.formats.bundle import save_bundle
from mm.lm import Tokenizer
from mm.lm.io import read_json, write_json
from mm.models.caption import caption_images, load_rgb
from mm.models.chat import chat_decoders
from mm.models.multimodal import PARTS, MediaInput, MultimodalLM
from mm.stages.chat_eval import evaluate_chat
from mm.stages.evaluation import score
from mm.stages.vision_sft_model import (
    IMAGE_KEYS,
    SFT_STAGES,
    hot_swap,
    load_source,
    load_vision_sft_bundle,
    shapes_model,
)
from mm.training.config import StageConfig
from mm.training.parallelize import ParallelPlan
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.vision_sft")

__all__ = ["VisionSFTConfig", "VisionSFTStage"]


@dataclass
class ChatDataConfig:
    """Chat instruction data (one JSONL manifest, `mm.datasets.chat`) and its held-out manifests."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    max_len: int = 512  # longer conversations are skipped and counted (`too_long`)
    max_bad_fraction: float = 0.05
    cache_samples: bool = False  # keep decoded media in memory (small data, e.g. the demo)
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True


@dataclass
class VisionSFTConfig(StageConfig):
    """`mm train` for the `vision-sft` stage."""

    stage: str = "vision-sft"
    init_from: str = ""  # an image or video stage's final folder (trained against the pretrained LM)
    lm: str = ""  # the instruct LM (HF Llama directory, e.g. runs/demo/lm-sft/final), hot-swapped in
    image_slots: int = 4  # images per conversation told apart (`MultimodalLM.add_image_index`)
    trainable: list[str] = field(
        default_factory=lambda: [
            "image_encoder",
            "image_xattn",
            "image_index",
            "video_aggregator",
            "video_xattn",
        ]
    )
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    caption_heldout: str | None = None  # image-caption manifest: the hot-swap captioning figure
    caption_samples: int = 100
    eval_samples: int = 200  # conversations answered per held-out manifest at the end (0 = none)
    curve_samples: int = 64  # conversations of the first held-out manifest answered every train.eval_every
    max_new_tokens: int = 24
    out: str = "runs/vision-sft"


@register(SFT_STAGES, VisionSFTConfig)
class VisionSFTStage(Stage[VisionSFTConfig]):
    """Answer loss on chat data (assistant tokens only), several images per row; the instruct LM frozen."""

    reader = "chat"

    @classmethod
    def load_final(cls, path: Path) -> tuple[MultimodalLM, Tokenizer, Any, dict[str, Any]]:
        """The chat model of a final folder (its instruct LM's fingerprint checked)."""
        return load_vision_sft_bundle(path)

    def check(self) -> None:
        """The source folder, the instruct LM and the trainable parts."""
        cfg = self.cfg
        self.require("init_from", "an image or video stage's final folder (e.g. runs/demo/video/final)")
        self.require("lm", "the instruct LM directory (e.g. runs/demo/lm-sft/final)")
        bad = sorted(t for t in cfg.trainable if t.split(".")[0] not in PARTS[1:])
        if bad or not cfg.trainable:
            raise ValueError(
                f"trainable={cfg.trainable}: allowed parts are {list(PARTS[1:])} or modules inside them, e.g. "
                "image_encoder.project (never the LM)"
            )
        if cfg.image_slots < 1:
            raise ValueError(f"image_slots={cfg.image_slots} must be >= 1")

    def meta_init(self) -> bool:
        """Built eagerly: the source folder and both LMs are read whole (demo-sized models)."""
        return False

    def build(self, device: torch.device) -> nn.Module:
        """The source model (its LM fingerprint checked), the hot-swap figures, the instruct LM swapped in,
        the image-index embedding."""
        cfg = self.cfg
        self.init, self.lm_path = Path(cfg.init_from).resolve(), Path(cfg.lm).resolve()
        if self.ctx.shapes_only:  # `mm plan`: no weights, tokenizer or data
            self.model = shapes_model(self.init, cfg.lm, cfg.image_slots)
            self.model.set_trainable(self.parts(self.model))
            return self.model
        model, self.tok, self.transform, self.source_meta = load_source(self.init)
        self.model = model
        swap_file = Path(cfg.out) / "hot_swap.json"
        measure = not self.ctx.resume and not self.ctx.shapes_only and cfg.caption_heldout
        before = self.captioning() if measure else None
        hot_swap(model, self.tok, self.lm_path)
        if measure:
            self.hot_swap_figures = {"pretrained_lm": before, "instruct_lm_no_training": self.captioning()}
            if self.rank == 0:
                write_json(self.hot_swap_figures, swap_file)
        else:
            self.hot_swap_figures = read_json(swap_file) if swap_file.is_file() else {}
        model.add_image_index(cfg.image_slots)
        model.set_trainable(self.parts(model))
        self.model = model.to(device)
        return self.model

    def parts(self, model: MultimodalLM) -> tuple[str, ...]:
        """The configured trainable parts the model has (an image-stage source has no video path)."""
        return tuple(p for p in self.cfg.trainable if getattr(model, p.split(".")[0], None) is not None)

    def captioning(self) -> dict[str, Any]:
        """Captions of the first `caption_samples` images of `caption_heldout` with the bundle's caption prompt."""
        m = self.source_meta
        recs = read_manifest(self.cfg.caption_heldout, "image")[: self.cfg.caption_samples]
        images = [load_rgb(r.media) for r in recs]
        preds = caption_images(
            self.model, self.tok, self.transform, images, prompt=m["prompt"], max_tiles=m["max_tiles"]
        )
        return score(preds, [r.text for r in recs], ["exact_match"])

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The configured parts (image encoder, cross-attention, image index, video path): never the LM."""
        return self.model.trainable_named_parameters()

    def frozen(self) -> dict[str, Any]:
        """The instruct LM."""
        return {"lm": self.model.lm}

    def parallel_plan(self) -> ParallelPlan:
        """Checkpoint and compile the LM layers and cross-attention blocks; FSDP2 per encoder, cross-attention
        block and LM layer, the image index with the root (its `encode_media` gathers it); the caption head of
        the image stage (frozen, unused here) stays replicated."""
        m = self.model
        xattn = [*m.image_xattn.values(), *(m.video_xattn.values() if m.video_xattn is not None else [])]
        units = [x for x in (m.image_encoder, m.video_aggregator) if x is not None]
        extra: dict[str, list[nn.Module]] = {"media_kv": xattn, "encode_media": [m], "encode_video": [m]}
        keep = [m.image_aux] if m.image_aux is not None else []
        return ParallelPlan(
            m,
            blocks=[*m.lm.layers, *xattn],
            fsdp_units=[*units, *xattn, *m.lm.layers],
            replicated=keep,
            extra_forward_methods=extra,
        )

    def record(self) -> dict[str, Any]:
        """The source folder and the instruct LM."""
        return {"init_from": str(self.init), "lm_path": str(self.lm_path)}

    def video_meta(self) -> dict[str, Any] | None:
        """The source's video section (None for an image-stage source)."""
        return self.source_meta.get("video")

    def open_data(self, rank: int, world: int) -> None:
        """This process's share of the conversations (media decoded by the modality decoders)."""
        cfg, d = self.cfg, self.cfg.data
        video = self.video_meta()
        self.merge = int(video["aggregator"]["merge"]) if video else 1
        self.decoders = chat_decoders(self.transform, video["n_frames"] if video else None)
        self.collator = ChatCollator(self.tok, max_tiles=self.source_meta["max_tiles"], merge=self.merge)
        ds = ChatDataset(
            d.train[0], self.tok, self.decoders, max_bad_fraction=d.max_bad_fraction, max_len=d.max_len
        )
        stream = SampleStream(ds, cfg.train.seed, cache=d.cache_samples, rank=rank, world=world)
        self.stream = ResumableLoader(
            SampleReader(stream, rank, world, self.collator), LoaderOptions.from_config(d)
        )

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's `rows` conversations of the next global batch."""
        return self.stream.next(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the assistant's tokens; each modality encoded for its rows only. A
        modality with no row in the batch runs on one blank input that no token sees (`idle`), so every
        process runs every part in every step (FSDP2's collectives) and the optimizer sees the same
        parameters with gradients whatever the batch holds."""
        model, media = self.model, {}
        tokens = batch["tokens"]
        if "image_rows" in batch:
            ctx = model.encode_media(
                batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
            )
            media["image"] = MediaInput(ctx, batch["cross_attention_mask"], rows=batch["image_rows"])
        else:
            media["image"] = self.idle("image", tokens)
        if "video_rows" in batch:
            ctx = model.encode_video(
                batch["video_frames"], batch["video_aspect_ratio_ids"], batch["video_aspect_ratio_mask"]
            )
            media["video"] = MediaInput(ctx, batch["video_cross_attention_mask"], rows=batch["video_rows"])
        elif model.video_xattn is not None:
            media["video"] = self.idle("video", tokens)
        labels = batch["labels"]
        loss = model(tokens, media, labels=labels, loss_chunk=self.cfg.train.loss_chunk)
        return loss, (labels != -100).sum()

    def idle(self, kind: str, tokens: torch.Tensor) -> MediaInput:
        """One blank image (or clip of one effective frame) for row 0, seen by no token."""
        m, model = self.source_meta, self.model
        n = 1 if kind == "image" else self.merge
        S, T = m["tile_size"], m["max_tiles"]
        pixels = torch.zeros(1, n, T, 3, S, S, device=tokens.device)
        ids = torch.ones(1, n, dtype=torch.long, device=tokens.device)
        tiles = torch.zeros(1, n, T, dtype=torch.long, device=tokens.device)
        tiles[..., 0] = 1
        ctx = (
            model.encode_media(pixels, ids, tiles)
            if kind == "image"
            else model.encode_video(pixels, ids, tiles)
        )
        mask = torch.zeros(
            *tokens.shape, 1, T if kind == "image" else 1, dtype=torch.long, device=tokens.device
        )
        return MediaInput(ctx, mask, rows=torch.zeros(1, dtype=torch.long, device=tokens.device))

    def answer(self, manifests: list[str], limit: int) -> dict[str, Any]:
        """Question answering on held-out manifests (accuracy per family)."""
        return evaluate_chat(
            self.model,
            self.tok,
            self.decoders,
            manifests,
            limit=limit,
            merge=self.merge,
            max_tiles=self.source_meta["max_tiles"],
            max_new_tokens=self.cfg.max_new_tokens,
        )

    def evaluate(self) -> dict[str, float]:
        """Answer accuracy on the first `curve_samples` conversations of the first held-out manifest."""
        d = self.cfg.data
        if not (d.heldout and self.cfg.curve_samples):
            return {}
        with autocast_context(self.cfg.train.autocast, self.device):
            r = next(iter(self.answer(d.heldout[:1], self.cfg.curve_samples).values()))
        self.model.train()
        return {"heldout_accuracy": r["accuracy"]}

    def final_evaluation(self) -> dict[str, Any]:
        """Answers on each held-out manifest, captioning after training, and the hot-swap figures."""
        out: dict[str, Any] = {}
        if self.heldout():
            out["eval"] = self.answer(self.heldout(), self.cfg.eval_samples)
        swap = dict(self.hot_swap_figures)
        if self.cfg.caption_heldout:
            swap["instruct_lm_after_vision_sft"] = self.captioning()
        if swap:
            out["hot_swap"] = swap
        return out

    def bundle_meta(self) -> dict[str, Any]:
        """How to rebuild the whole chat model: the source's image (and video) sections, the instruct LM."""
        m = self.source_meta
        return {
            **{k: m[k] for k in (*IMAGE_KEYS, "video") if k in m},
            "lm_path": str(self.lm_path),
            "tokenizer": None,
            "image_slots": self.cfg.image_slots,
            "adapters_from": str(self.init),
            "adapters_lm_path": m["lm_path"],
            "adapters_lm_fingerprint": m["lm_fingerprint"],
        }

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """The chat bundle: every non-LM tensor."""
        state = self.gathered(self.model.adapter_state())
        if self.rank == 0:
            save_bundle(state, final, meta)
