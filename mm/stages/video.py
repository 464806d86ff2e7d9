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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm.adapters import TemporalAggregator
from mm.datasets.shapes import VIDEO_PROMPT
from mm.datasets.streams import ManifestStream, ShardStream
from mm.datasets.tiling import TileTransform
from mm.datasets.video import VideoCaptionCollator, VideoTextDataset, open_video_stream
from mm.lm import Tokenizer, generate
from mm.models.multimodal import IMAGE_PATH_PARTS, VIDEO_PARTS, MultimodalLM, video_xattn_layer_ids
from mm.stages.image import load_image_bundle
from mm.training import distributed as dist_utils
from mm.training.bundle import (
    dataclass_dict,
    image_path_fingerprint,
    load_adapter_weights,
    read_config,
    resolve_image_bundle,
    save_bundle,
)
from mm.training.checkpoint import latest_checkpoint, write_json
from mm.training.config import OptimConfig, TrainConfig, config_to_yaml
from mm.training.freeze import FrozenLMChanged, assert_not_in_optimizer, fingerprint, fingerprint_tensors
from mm.training.trainer import Task, Trainer, setup_run

log = logging.getLogger("mm.stages.video")

VIDEO_STAGES = ("video",)


class FrozenImagePathChanged(RuntimeError):
    """The image path's fingerprint differs from the one recorded."""


@dataclass
class AggregatorConfig:
    """The perceiver-resampler temporal aggregator."""

    merge: int = 16  # frames merged into one effective frame (paper: 16 pretraining, 32 fine-tuning)
    n_latents: int = 64  # tokens per effective frame
    depth: int = 2
    n_heads: int = 8
    ffn_mult: int = 4
    max_frames: int = 64  # time embeddings
    spatial: bool = True  # a learned embedding per token position of a frame (where the object is)
    motion: bool = True  # + a learned projection of each token's change since the previous frame
    # Weight of a video-text contrastive loss in the video stage (0 = off): each clip's mean latent (through a
    # learned projection) against the mean of the frozen LM's token embeddings of every caption in the batch
    # (identical captions count as positives). The caption loss reaches the aggregator only through the gated
    # cross-attention, and what it asks of the latents is learned slowly there: measured, the latents never
    # came to encode the direction of motion, although the frozen LM reads it (direction 0.995) from an
    # aggregator that does. The contrastive loss asks for it directly, from the same video-text pairs.
    contrastive: float = 0.0

    def __post_init__(self) -> None:
        if self.contrastive < 0:
            raise ValueError(f"aggregator.contrastive must be >= 0 (0 = off), got {self.contrastive}")


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


@dataclass
class VideoStageConfig:
    """`mm train` for the video stage."""

    stage: str = "video"
    init_from: str = ""  # the image-stage bundle (e.g. runs/demo/image-anneal/final)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    video_xattn: VideoXAttnConfig = field(default_factory=VideoXAttnConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_samples: int = 256  # clips of each held-out manifest described at the end (0 = none)
    curve_samples: int = 64  # clips of the first held-out manifest scored every `train.eval_every` steps
    out: str = "runs/video"


# ------------------------------------------------------------------------------------------------- model


def image_path_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The frozen image path's tensors (image encoder, image cross-attention, extra token embeddings)."""
    return {k: v for k, v in model.adapter_state().items() if k.split(".")[0] in IMAGE_PATH_PARTS}


def video_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The video stage's tensors (aggregator, video cross-attention): what a video bundle holds."""
    return {k: v for k, v in model.adapter_state().items() if k.split(".")[0] in VIDEO_PARTS}


def attach_video(
    image_model: MultimodalLM, tok: Tokenizer, agg: AggregatorConfig, layers: list[int]
) -> MultimodalLM:
    """The image model plus a fresh video path (aggregator + video cross-attention before `layers`)."""
    c = image_model.cfg
    enc = image_model.image_encoder
    n_extra = (
        0 if image_model.extra_tok_embeddings is None else image_model.extra_tok_embeddings.num_embeddings
    )
    aggregator = TemporalAggregator(
        c.dim,
        agg.merge,
        n_latents=agg.n_latents,
        depth=agg.depth,
        n_heads=agg.n_heads,
        ffn_mult=agg.ffn_mult,
        max_frames=agg.max_frames,
        max_tokens=(enc.cfg.max_tiles * enc.num_tokens_per_tile) if agg.spatial else 0,
        motion=agg.motion,
        text_align=agg.contrastive > 0,
    )
    model = MultimodalLM(
        image_model.lm,
        image_model.image_encoder,
        xattn_layers=image_model.xattn_layers,
        hf_row_compat=next(iter(image_model.image_xattn.values())).hf_row_compat,
        trainable=VIDEO_PARTS,
        image_token_id=image_model.image_token_id,
        extra_tokens=n_extra,
        video_aggregator=aggregator,
        video_xattn_layers=layers,
        video_token_id=tok.video_id,
        image_aux=image_model.image_aux,  # the image stage's training-only head: kept, frozen, to match its bundle
    )
    model.image_xattn.load_state_dict(image_model.image_xattn.state_dict())
    if n_extra:
        model.extra_tok_embeddings.load_state_dict(image_model.extra_tok_embeddings.state_dict())
    model.set_trainable(VIDEO_PARTS)
    return model


def load_video_bundle(path: str | Path) -> tuple[MultimodalLM, Tokenizer, TileTransform, dict[str, Any]]:
    """Rebuild a trained video model from its bundle and the image bundle it names (both fingerprints checked)."""
    path = Path(path)
    meta = read_config(path)
    if meta.get("stage") not in VIDEO_STAGES:
        raise ValueError(
            f"{path} holds a {meta.get('stage')!r} stage, not a video stage (see mm describe --help)"
        )
    image = resolve_image_bundle(path, meta)
    image_model, tok, transform, _ = load_image_bundle(image)  # refuses a changed LM
    fp = fingerprint_tensors(image_path_state(image_model))
    if fp != meta["image_fingerprint"]:
        raise FrozenImagePathChanged(
            f"the image path at {image} has fingerprint {fp[:16]}..., but {path} was trained against "
            f"{meta['image_fingerprint'][:16]}...; refusing to combine them"
        )
    v = meta["video"]
    model = attach_video(image_model, tok, AggregatorConfig(**v["aggregator"]), v["xattn_layers"])
    load_adapter_weights(model, path)
    return model.eval(), tok, transform, meta


# -------------------------------------------------------------------------------------------------- data


class CachedClips:
    """A `VideoTextDataset` view for `ManifestStream`: clips whose features are cached are not decoded again."""

    def __init__(
        self, dataset: VideoTextDataset, cache: dict[str, tuple[torch.Tensor, torch.Tensor]]
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
        if str(record.video) in self.cache:
            return {"text": record.text, "source": str(record.video), "index": i}
        return self.dataset.load(i)


class ClipFeatures:
    """Per-frame features of the frozen image encoder for clips, optionally cached by clip source."""

    def __init__(self, model: MultimodalLM, collator: VideoCaptionCollator, cache: bool) -> None:
        self.model, self.collator = model, collator
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    @torch.no_grad()
    def __call__(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, F, max_tiles * P, D) and tile mask (B, max_tiles) of the samples' clips."""
        cached = self.cache or {}
        todo = [s for s in samples if s["source"] not in cached]
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if todo:
            media = self.collator.media(todo)
            device = next(self.model.parameters()).device
            feats = self.model.video_frame_features(*(media[k].to(device) for k in _MEDIA_KEYS)).cpu()
            for s, f, m in zip(todo, feats, media["video_aspect_ratio_mask"][:, 0]):
                fresh[s["source"]] = (f, m)
            if self.cache is not None:
                self.cache.update(fresh)
        rows = [fresh.get(s["source"]) or cached[s["source"]] for s in samples]
        return torch.stack([f for f, _ in rows]), torch.stack([m for _, m in rows])


_MEDIA_KEYS = ("video_frames", "video_aspect_ratio_ids", "video_aspect_ratio_mask")


class VideoCaptionTask(Task):
    """Caption loss (caption tokens only) on clips; a seeded epoch order, resumable; eval = exact match."""

    def __init__(
        self,
        model: MultimodalLM,
        stream: ManifestStream | ShardStream,
        collator: VideoCaptionCollator,
        features: ClipFeatures,
        *,
        batch_size: int,
        n_frames: int,
        name: str,
        curve: tuple[list[dict[str, Any]], list[str]] | None = None,
        contrastive: float = 0.0,
    ) -> None:
        self.model, self.stream, self.collator, self.features, self.name = (
            model,
            stream,
            collator,
            features,
            name,
        )
        self.batch_size, self.n_frames = batch_size, n_frames
        self.curve = curve  # (samples, references) scored by `evaluate`
        # weight of the video-text contrastive loss (AggregatorConfig.contrastive)
        self.contrastive = contrastive

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Only the video parts (never the LM or the image path)."""
        return self.model.trainable_named_parameters()

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """(clips per step, 0): the text length follows the captions."""
        return self.batch_size, 0

    def make_batch(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Token rows and masks plus the clips' frozen frame features."""
        feats, tile_mask = self.features(samples)
        return {
            **self.collator.text(samples, self.n_frames),
            "video_features": feats,
            "video_tile_mask": tile_mask,
        }

    def next_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The next `batch_size` usable clips (bad files are skipped and counted by the readers)."""
        return self.make_batch([self.stream.next() for _ in range(batch_size)])

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over caption tokens."""
        video = self.model.encode_video(
            frame_features=batch["video_features"], tile_mask=batch["video_tile_mask"]
        )
        logits = self.model(
            batch["tokens"], video=video, video_cross_attention_mask=batch["video_cross_attention_mask"]
        )  # right-padded rows: causal attention keeps pads out of real tokens
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        n_tokens = (labels != -100).sum()
        weight = self.contrastive if self.model.video_aggregator.align is not None else 0.0
        if weight:  # per clip, scaled to the token count: the trainer divides the sum by n_tokens
            loss = loss + weight * self.contrastive_loss(video.extra["aggregated"], labels) * n_tokens
        return loss, n_tokens

    def contrastive_loss(self, aggregated: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean video-text InfoNCE (both directions) of a batch; identical captions are shared positives."""
        lm = self.model.lm
        real = labels != -100
        emb = lm.tok_embeddings(labels.clamp(min=0)).detach() * real[..., None]
        text = emb.sum(1) / real.sum(1, keepdim=True).clamp(min=1)  # (B, D) mean caption embedding
        logits = self.model.video_aggregator.align_logits(aggregated, text).float()
        same = (labels[:, None, :] == labels[None, :, :]).all(-1).float()  # (B, B) identical captions
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))

    def evaluate(self) -> dict[str, float]:
        """Exact match and direction accuracy on the learning-curve clips."""
        if not self.curve:
            return {}
        samples, refs = self.curve
        preds = describe_clips(self.model, self.collator, samples, features=self.features)
        r = motion_report(preds, refs)
        return {
            "heldout_exact_match": r["exact_match"],
            "heldout_direction_accuracy": r["direction_accuracy"],
        }

    def data_state(self) -> dict[str, Any]:
        """Position in the clip stream."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the clip stream."""
        if state:
            self.stream.load_state_dict(state)


# ------------------------------------------------------------------------------------------- describing


@torch.no_grad()
def describe_clips(
    model: MultimodalLM,
    collator: VideoCaptionCollator,
    samples: list[dict[str, Any]],
    *,
    features: ClipFeatures | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy captions of tiled clips, in input order; the video K/V are computed once per batch."""
    was_training = model.training
    model.eval()
    tok = collator.tokenizer
    features = features or ClipFeatures(model, collator, cache=False)
    device = next(model.parameters()).device
    out: list[str] = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        feats, tile_mask = features(chunk)
        video = model.encode_video(frame_features=feats.to(device), tile_mask=tile_mask.to(device))
        new = generate(
            model,
            [collator.prefix] * len(chunk),
            max_new_tokens,
            stop_tokens=[tok.eos_id, tok.eot_id],
            model_kwargs={"video": video},
        )
        out.extend(tok.decode(t).strip() for t in new)
    model.train(was_training)
    return out


def motion_report(preds: list[str], refs: list[str]) -> dict[str, Any]:
    """Exact match, and accuracy of the colour, shape and direction words ("a red circle moves left")."""

    def parts(caption: str) -> tuple[str | None, str | None, str | None]:
        words = caption.split()
        if "moves" not in words:
            return None, None, None
        k = words.index("moves")
        color = words[k - 2] if k >= 2 else None
        shape = words[k - 1] if k >= 1 else None
        return color, shape, words[k + 1] if k + 1 < len(words) else None

    n = max(1, len(refs))
    got = [parts(p) for p in preds]
    want = [parts(r) for r in refs]
    acc = [sum(g[j] == w[j] for g, w in zip(got, want, strict=True)) / n for j in range(3)]
    return {
        "exact_match": sum(p == r for p, r in zip(preds, refs, strict=True)) / n,
        "color_accuracy": acc[0],
        "shape_accuracy": acc[1],
        "direction_accuracy": acc[2],
        "n": len(refs),
    }


def load_clips(
    manifest: str | Path, transform: TileTransform, n_frames: int, limit: int = 0
) -> tuple[list[dict[str, Any]], list[str]]:
    """The first `limit` (0 = all) usable clips of a manifest, tiled, and their captions."""
    ds = VideoTextDataset(manifest, transform, n_frames=n_frames, max_bad_fraction=1.0)
    samples = []
    for i in range(len(ds)):
        if limit and len(samples) == limit:
            break
        sample = ds.load(i)
        if sample is not None:
            samples.append(sample)
    return samples, [s["text"] for s in samples]


def evaluate_videos(
    model: MultimodalLM,
    collator: VideoCaptionCollator,
    transform: TileTransform,
    manifests: list[str],
    n_frames: int,
    limit: int,
    features: ClipFeatures | None = None,
) -> dict[str, Any]:
    """Describe the first `limit` clips of each held-out manifest; exact match and word accuracies."""
    res = {}
    for m in manifests:
        samples, refs = load_clips(m, transform, n_frames, limit)
        preds = describe_clips(model, collator, samples, features=features)
        res[Path(m).stem] = {
            **motion_report(preds, refs),
            "examples": [
                {"video": str(s.get("source", "")), "text": r, "pred": p}
                for s, r, p in zip(samples[:8], refs, preds, strict=False)
            ],
        }
    return res


# ------------------------------------------------------------------------------------------------- stage


def run_video_stage(cfg: VideoStageConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train the video stage and write OUT/final (video bundle) and OUT/summary.json."""
    if cfg.stage not in VIDEO_STAGES:
        raise ValueError(f"stage={cfg.stage!r}; video stages: {list(VIDEO_STAGES)}")
    if not cfg.init_from:
        raise ValueError("`init_from` must name an image-stage bundle (e.g. runs/demo/image-anneal/final)")
    if not cfg.data.train:
        raise ValueError("no training data: pass --data MANIFEST.jsonl|SHARD.tar ... or set data.train")
    if dist_utils.world_size() > 1:
        raise ValueError(
            "the video stage runs in one process (no FSDP set-up for it yet); run it without torchrun"
        )
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)
    init = Path(cfg.init_from).resolve()
    image_model, tok, transform, image_meta = load_image_bundle(init)  # refuses a changed LM
    if image_meta.get("stage") in VIDEO_STAGES:
        raise ValueError(f"init_from={init} is a video bundle; give the image-stage bundle it started from")
    agg = cfg.aggregator
    if cfg.data.n_frames % agg.merge or not 1 <= cfg.data.n_frames <= agg.max_frames:
        raise ValueError(
            f"data.n_frames={cfg.data.n_frames} must be a multiple of aggregator.merge={agg.merge} and at most "
            f"aggregator.max_frames={agg.max_frames}"
        )
    layers = cfg.video_xattn.layers
    if layers is None:
        layers = video_xattn_layer_ids(image_model.xattn_layers, cfg.video_xattn.every)
    model = attach_video(image_model, tok, agg, list(layers)).to(device)
    lm = model.lm
    fp_start = fingerprint(lm)
    img_start = fingerprint_tensors(image_path_state(model))
    if img_start != image_path_fingerprint(init):
        raise ValueError(
            f"{init}: the bundle's tensors are not the whole image path of the model it describes"
        )
    if resume:
        ck = latest_checkpoint(out / "checkpoints")
        if ck is not None:
            rec = json.loads((ck / "trainer.json").read_text())["config"]
            if rec.get("lm_fingerprint") != fp_start or rec.get("image_fingerprint") != img_start:
                raise FrozenLMChanged(f"{ck} belongs to another LM or image path than {init}")

    max_tiles = image_meta["max_tiles"]
    collator = VideoCaptionCollator(tok, prompt=cfg.data.prompt, max_tiles=max_tiles, merge=agg.merge)
    features = ClipFeatures(model, collator, cache=cfg.data.cache_features)
    stream = open_video_stream(
        cfg.data.train,
        transform,
        n_frames=cfg.data.n_frames,
        seed=tr.seed,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    if features.cache is not None and isinstance(stream, ManifestStream):
        stream.dataset = CachedClips(stream.dataset, features.cache)
    curve = None
    if tr.eval_every and cfg.curve_samples and cfg.data.heldout:
        curve = load_clips(cfg.data.heldout[0], transform, cfg.data.n_frames, cfg.curve_samples)
    task = VideoCaptionTask(
        model,
        stream,
        collator,
        features,
        batch_size=tr.batch_size,
        n_frames=cfg.data.n_frames,
        name=cfg.stage,
        curve=curve,
        contrastive=agg.contrastive,
    )
    record = {
        "yaml": config_to_yaml(cfg),
        "lm_fingerprint": fp_start,
        "image_fingerprint": img_start,
        "image_bundle": str(init),
    }
    trainer = Trainer(task, tr, cfg.optim, out, config_record=record)
    assert_not_in_optimizer(lm, trainer.optimizer)
    for name in IMAGE_PATH_PARTS:
        part = getattr(model, name)
        if part is not None:
            assert_not_in_optimizer(part, trainer.optimizer, what=f"image-path ({name})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    summary = trainer.fit(resume=resume)
    fp_end = fingerprint(lm)
    img_end = fingerprint_tensors(image_path_state(model))
    if fp_end != fp_start:
        raise FrozenLMChanged(f"the LM changed during {cfg.stage}: {fp_start[:16]}... -> {fp_end[:16]}...")
    if img_end != img_start:
        raise FrozenImagePathChanged(
            f"the image path changed during {cfg.stage}: {img_start[:16]}... -> {img_end[:16]}..."
        )
    summary.update(
        lm_fingerprint_start=fp_start,
        lm_fingerprint_end=fp_end,
        image_fingerprint_start=img_start,
        image_fingerprint_end=img_end,
        data_skips=stream.stats(),
    )
    if summary["stopped"] != "max_steps":
        return summary
    meta = {
        "stage": cfg.stage,
        "lm_path": image_meta["lm_path"],
        "lm_fingerprint": fp_start,
        "lm_fingerprint_start": fp_start,
        "lm_fingerprint_end": fp_end,
        "tokenizer": image_meta.get("tokenizer"),
        "image_bundle": str(init),
        "image_fingerprint": img_start,
        "image_fingerprint_start": img_start,
        "image_fingerprint_end": img_end,
        "video": {
            "aggregator": dataclass_dict(agg),
            "xattn_layers": list(model.video_xattn_layers),
            "n_frames": cfg.data.n_frames,
            "prompt": cfg.data.prompt,
            "max_tiles": max_tiles,
        },
    }
    if image_meta.get("lm_format"):
        meta["lm_format"] = image_meta["lm_format"]
    if cfg.eval_samples and cfg.data.heldout:
        summary["eval"] = evaluate_videos(
            model, collator, transform, cfg.data.heldout, cfg.data.n_frames, cfg.eval_samples
        )
    save_bundle(video_state(model), out / "final", meta)
    write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    return summary


def describe_videos(
    model: MultimodalLM,
    tok: Tokenizer,
    transform: TileTransform,
    meta: dict[str, Any],
    sources: list[str | Path | bytes],
    *,
    batch_size: int = 32,
) -> list[str]:
    """Captions of video files (or their bytes) with a loaded video bundle, one per input, in input order."""
    from mm.datasets.video import decode_clip, tile_clip

    v = meta["video"]
    collator = VideoCaptionCollator(
        tok, v["prompt"], max_tiles=v["max_tiles"], merge=v["aggregator"]["merge"]
    )
    samples = []
    for k, src in enumerate(sources):
        frames, _ = decode_clip(src if isinstance(src, bytes) else str(src), v["n_frames"])
        samples.append({**tile_clip(frames, transform), "source": f"#{k}", "text": ""})
    return describe_clips(model, collator, samples, batch_size=batch_size)
