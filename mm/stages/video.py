"""The video stage (Llama 3 paper §7.5; `paper-notes.md` §4): only the temporal aggregator and the video
cross-attention layers train, on video-caption pairs; the LM and the whole image path (image encoder, image
cross-attention) stay frozen. It starts from an image-stage bundle (`init_from`, e.g.
`runs/demo/image-anneal/final`) and runs on the one training loop.

Freeze proof, as for the LM: the LM fingerprint and the image-path fingerprint (sha256 over the image bundle's
tensors) are taken at start and checked at the end, the optimizer is checked to hold neither, and the final
bundle holds only the video tensors plus the location and fingerprints of the LM and the image bundle it
builds on (`mm verify-frozen` checks both; loading refuses a changed image path).

Each frame of a clip goes through the frozen image encoder; since that encoder is frozen its per-frame
features are a pure function of the clip, and `data.cache_features` keeps them in memory (small data, such as
the demo's) so later epochs skip decoding and encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.temporal_aggregator import AggregatorConfig
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.media import MediaTextDataset
from mm.datasets.streams import open_stream
from mm.datasets.tiling import TileTransform
from mm.datasets.video import VideoCaptionCollator, video_decoder
from mm.encoders.clip import gather_rows
from mm.formats.bundle import (
    dataclass_dict,
    image_path_fingerprint,
    read_config,
    resolve_lm_path,
    save_bundle,
)
from mm.lm import Tokenizer
from mm.models.multimodal import MediaInput, MultimodalLM, video_xattn_layer_ids
from mm.models.video import ClipFeatures, describe_clips
from mm.prompts import VIDEO_PROMPT
from mm.stages.evaluation import check_scorers, evaluate_videos, load_clips, score
from mm.stages.image_model import load_image_bundle
from mm.stages.video_model import VIDEO_STAGES, attach_video, image_path_state, load_video_bundle, video_state
from mm.training.config import StageConfig
from mm.training.freeze import FrozenLMChanged
from mm.training.parallelize import ParallelPlan, frozen_lm_dtype
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.video")

__all__ = ["AggregatorConfig", "VideoStage", "VideoStageConfig"]


@dataclass
class VideoXAttnConfig:
    """Placement of the video cross-attention blocks."""

    every: int = 4  # before every k-th image cross-attention layer (paper: 4)
    layers: list[int] | None = None  # explicit LM layer ids (overrides `every`)


@dataclass
class VideoDataConfig:
    """Video-caption pairs (JSONL manifests or WebDataset shards); frames per clip."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    n_frames: int = 16  # uniformly sampled per clip (<= 64), a multiple of aggregator.merge
    max_bad_fraction: float = 0.05
    prompt: str = VIDEO_PROMPT
    cache_features: bool = False  # keep each clip's frozen image-encoder features in memory (small data)
    num_workers: int = 0  # DataLoader workers decoding this process's samples (0 = in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for faster copies to the GPU (CUDA only)
    shuffle_window: int = 1024  # WebDataset shards: shuffled within windows of this many (1 = stored order)


@dataclass
class VideoStageConfig(StageConfig):
    """`mm train` for the video stage."""

    stage: str = "video"
    init_from: str = ""  # the image-stage bundle (e.g. runs/demo/image-anneal/final)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    video_xattn: VideoXAttnConfig = field(default_factory=VideoXAttnConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    eval_samples: int = 256  # clips of each held-out manifest described at the end (0 = none)
    scorers: list[str] = field(default_factory=lambda: ["exact_match"])  # `mm.stages.evaluation.score`
    curve_samples: int = 64  # clips of the first held-out manifest scored every `train.eval_every` steps
    out: str = "runs/video"


class CachedClips:
    """A video `MediaTextDataset` view for `ManifestStream`: clips with cached features are not decoded again."""

    def __init__(
        self, dataset: MediaTextDataset, cache: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.dataset, self.cache = dataset, cache
        self.manifest, self.transform, self.stats = dataset.manifest, dataset.transform, dataset.stats

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_order(self, seed: int, epoch: int) -> list[int]:
        """The dataset's order."""
        return self.dataset.sample_order(seed, epoch)

    def load(self, i: int) -> dict[str, Any] | None:
        """Caption and source only when the clip's features are cached, else the decoded clip."""
        record = self.dataset.records[i]
        if str(record.media) in self.cache:
            return {"text": record.text, "source": str(record.media), "index": i}
        return self.dataset.load(i)


@register(VIDEO_STAGES, VideoStageConfig)
class VideoStage(Stage[VideoStageConfig]):
    """Caption loss on clips (+ the video-text contrastive loss); the LM and the whole image path frozen.

    Under torchrun FSDP2 shards the frozen LM, the image cross-attention and the trained video cross-attention;
    the aggregator and the image encoder are replicated (`parallel_plan`); each process reads and encodes only
    its clips."""

    reader = "describe"

    @classmethod
    def load_final(cls, path: Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
        """The video model of a final folder and the image bundle it names (both fingerprints checked)."""
        return load_video_bundle(path)

    def check(self) -> None:
        """The stage name, the image bundle, the data and the frame count."""
        cfg = self.cfg
        self.require("init_from", "an image-stage bundle (e.g. runs/demo/image-anneal/final)")
        check_scorers(cfg.scorers)
        agg = cfg.aggregator
        if cfg.data.n_frames % agg.merge or not 1 <= cfg.data.n_frames <= agg.max_frames:
            raise ValueError(
                f"data.n_frames={cfg.data.n_frames} must be a multiple of aggregator.merge={agg.merge} and at "
                f"most aggregator.max_frames={agg.max_frames}"
            )

    def build(self, device: torch.device) -> nn.Module:
        """The image bundle's model (its LM read lazily on the meta device, its fingerprint checked in
        `check_frozen`; else at once) plus a fresh video path."""
        cfg = self.cfg
        self.init = Path(cfg.init_from).resolve()
        lazy = None
        if device.type == "meta":
            lm_path = resolve_lm_path(self.init, read_config(self.init))
            lazy = frozen_lm_dtype(lm_path, self.ctx.frozen_dtype)
        try:
            image_model, self.tok, self.transform, self.image_meta = load_image_bundle(
                self.init, lazy_lm_dtype=lazy, weights=not self.ctx.shapes_only
            )
        except ValueError as e:
            raise ValueError(
                f"init_from: {e}; give the image-stage bundle the video stage starts from"
            ) from None
        layers = cfg.video_xattn.layers
        if layers is None:
            layers = video_xattn_layer_ids(image_model.xattn_layers, cfg.video_xattn.every)
        self.model = attach_video(image_model, self.tok, cfg.aggregator, list(layers)).to(device)
        return self.model

    def meta_init(self) -> bool:
        """Built on the meta device unless the image bundle's LM is a Mllama checkpoint's (read whole)."""
        try:
            return read_config(Path(self.cfg.init_from)).get("lm_format", "hf_llama") == "hf_llama"
        except FileNotFoundError:
            return False  # build names the problem

    def check_frozen(self, fingerprints: dict[str, str]) -> None:
        """The LM must be the one the image bundle was trained against."""
        want = self.image_meta["lm_fingerprint"]
        if fingerprints["lm"] != want:
            raise FrozenLMChanged(
                f"the LM at {self.image_meta['lm_path']} has fingerprint {fingerprints['lm'][:16]}..., but "
                f"{self.init} was trained against {want[:16]}...; refusing to combine them"
            )

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The aggregator and the video cross-attention only."""
        return self.model.trainable_named_parameters()

    def frozen(self) -> dict[str, Any]:
        """The LM and the image path (image encoder, image cross-attention, extra tokens, caption head)."""
        parts: dict[str, Any] = {"lm": self.model.lm, "image": image_path_state(self.model)}
        return parts

    def parallel_plan(self) -> ParallelPlan:
        """Activation checkpointing and compile of the LM layers and video cross-attention blocks, then FSDP2
        per image cross-attention block, video cross-attention block (trained: its parameters and AdamW state
        sharded too; `media_kv` and the root's `encode_video` gather them) and LM layer, and the root (the LM's
        embeddings, norm and output). Replicated (the trainer all-reduces the gradients of what trains there):
        the temporal aggregator (its `align_vectors` runs outside any forward, its `align_log_scale` is a
        scalar), the frozen image encoder (the data side runs it on each process's own clips, a different
        number of times on each: cached clips skip it) and the caption head."""
        m = self.model
        video = list(m.video_xattn.values())
        blocks = [*m.lm.layers, *video]
        units = [*m.image_xattn.values(), *video, *m.lm.layers]
        keep = [x for x in (m.image_encoder, m.image_aux, m.video_aggregator) if x is not None]
        extra: dict[str, list[nn.Module]] = {"media_kv": video, "encode_video": [m]}
        return ParallelPlan(m, blocks=blocks, fsdp_units=units, replicated=keep, extra_forward_methods=extra)

    def record(self) -> dict[str, Any]:
        """The image bundle it builds on; refuses one whose tensors are not the model's whole image path."""
        if self.frozen_image_fingerprint() != image_path_fingerprint(self.init):
            raise ValueError(
                f"{self.init}: the bundle's tensors are not the whole image path of the model it describes"
            )
        return {"image_bundle": str(self.init)}

    def frozen_image_fingerprint(self) -> str:
        """Fingerprint of the image path in the model."""
        from mm.training.freeze import fingerprint_tensors

        return fingerprint_tensors(image_path_state(self.model))

    def open_data(self, rank: int, world: int) -> None:
        """This process's clips, the collator, the frozen-feature cache and the learning-curve clips."""
        cfg, d = self.cfg, self.cfg.data
        self.collator = VideoCaptionCollator(
            self.tok, prompt=d.prompt, max_tiles=self.image_meta["max_tiles"], merge=cfg.aggregator.merge
        )
        autocast = cfg.train.autocast
        self.features = ClipFeatures(
            self.model,
            self.collator,
            cache=d.cache_features,
            context=lambda: autocast_context(autocast, self.device),
        )
        clips = open_stream(
            d.train,
            video_decoder(self.transform, n_frames=d.n_frames),
            seed=cfg.train.seed,
            max_bad_fraction=d.max_bad_fraction,
            rank=rank,
            world=world,
            shuffle_window=d.shuffle_window,
        )
        if self.features.cache is not None and isinstance(clips.dataset, MediaTextDataset):
            # with DataLoader workers, each sees the cache as it was when the workers started
            clips.dataset = CachedClips(clips.dataset, self.features.cache)
        self.stream = ResumableLoader(SampleReader(clips, rank, world), LoaderOptions.from_config(d))
        self.curve = None
        if cfg.train.eval_every and cfg.curve_samples and d.heldout:
            self.curve = load_clips(d.heldout[0], self.transform, d.n_frames, cfg.curve_samples)

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's `rows` clips of the next global batch (decoded and tiled by the DataLoader workers):
        token rows and masks plus their frozen frame features (computed here, with the model)."""
        samples = self.stream.next(rows)
        feats, tile_mask = self.features(samples)
        text = self.collator.text(samples, self.cfg.data.n_frames)
        return {**text, "video_features": feats, "video_tile_mask": tile_mask}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over caption tokens (+ the contrastive loss per clip, scaled to tokens)."""
        model = self.model
        video = model.encode_video(frame_features=batch["video_features"], tile_mask=batch["video_tile_mask"])
        labels = batch["labels"]  # right-padded rows: causal attention keeps pads out of real tokens
        clips = {"video": MediaInput(video, batch["video_cross_attention_mask"])}
        loss = model(batch["tokens"], clips, labels=labels, loss_chunk=self.cfg.train.loss_chunk)
        n_tokens = (labels != -100).sum()
        weight = self.cfg.aggregator.contrastive if model.video_aggregator.align is not None else 0.0
        if weight:  # per clip, weighted by its caption tokens: the trainer divides the sum by all tokens
            per_clip = self.contrastive_loss(video.extra["aggregated"], labels)
            loss = loss + weight * (per_clip * (labels != -100).sum(1)).sum()
        return loss, n_tokens

    def contrastive_loss(self, aggregated: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Video-text InfoNCE per clip (B,) (both directions, halved) against every process's clips and captions
        (gathered); identical captions are shared positives."""
        real = labels != -100
        emb = self.model.lm.tok_embeddings(labels.clamp(min=0)).detach() * real[..., None]
        text = emb.sum(1) / real.sum(1, keepdim=True).clamp(min=1)  # (B, D) mean caption embedding
        agg = self.model.video_aggregator
        v = agg.align_vectors(aggregated).float()
        t = F.normalize(text.float(), dim=-1)
        both = gather_rows(torch.cat([v, t], dim=-1))  # (N, 2D): every process's clips, in rank order
        all_v, all_t = both.split([v.shape[-1], t.shape[-1]], dim=-1)
        start = self.rank * v.shape[0] if both.shape[0] > v.shape[0] else 0
        scale = agg.align_log_scale.exp().float()
        same = (all_t[:, None, :] == all_t[None, :, :]).all(-1).float()  # (N, N) identical captions
        target = (same / same.sum(1, keepdim=True))[start : start + v.shape[0]]  # symmetric classes
        i2t = F.cross_entropy(scale * v @ all_t.T, target, reduction="none")
        t2i = F.cross_entropy(scale * t @ all_v.T, target, reduction="none")
        return 0.5 * (i2t + t2i)

    def evaluate(self) -> dict[str, float]:
        """Exact match and direction accuracy on the learning-curve clips."""
        if not self.curve:
            return {}
        samples, refs = self.curve
        with autocast_context(self.cfg.train.autocast, self.device):
            described = describe_clips(self.model, self.collator, samples, features=self.features)
        r = score(described, refs, self.cfg.scorers)
        return {f"heldout_{k}": r[k] for k in ("exact_match", "direction_accuracy") if k in r}

    def final_evaluation(self) -> dict[str, Any]:
        """Captions of the first `eval_samples` clips of each held-out manifest."""
        d = self.cfg.data
        if not self.heldout():
            return {}
        return {
            "eval": evaluate_videos(
                self.model,
                self.collator,
                self.transform,
                self.heldout(),
                d.n_frames,
                self.cfg.eval_samples,
                scorers=self.cfg.scorers,
            )
        }

    def bundle_meta(self) -> dict[str, Any]:
        """The LM and image bundle it builds on, and how to rebuild the video path."""
        m, d = self.image_meta, self.cfg.data
        meta = {
            "lm_path": m["lm_path"],
            "tokenizer": m.get("tokenizer"),
            "image_bundle": str(self.init),
            "video": {
                "aggregator": dataclass_dict(self.cfg.aggregator),
                "xattn_layers": list(self.model.video_xattn_layers),
                "n_frames": d.n_frames,
                "prompt": d.prompt,
                "max_tiles": m["max_tiles"],
            },
        }
        if m.get("lm_format"):
            meta["lm_format"] = m["lm_format"]
        return meta

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """The video bundle: the aggregator and video cross-attention tensors only."""
        state = self.gathered(video_state(self.model))
        if self.rank == 0:
            save_bundle(state, final, meta)
