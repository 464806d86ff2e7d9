"""`mm pretrain-encoder` with a BEST-RQ config (`kind: bestrq`, e.g. configs/encoders/bestrq_tiny.yaml):
self-supervised pretraining of the speech encoder on unlabeled audio (Llama 3 paper §7.6; `mm.encoders.speech`),
on the one training loop (`mm.training.trainer.Trainer`).

Trained: the encoder and the BEST-RQ softmax heads. Never trained: the random projections and codebooks (buffers,
not parameters; the optimizer never sees them). Outputs: `OUT/final/encoder.safetensors` holding `encoder.*`
(what the speech stage loads with `encoder_weights=`), `projection`, `codebooks` and `heads.*`, plus
`OUT/final/bestrq.json` (encoder and BEST-RQ configs), `OUT/metrics.jsonl` (masked-frame loss per step) and
`OUT/summary.json` (masked loss and code accuracy on held-out audio at the end).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm.datasets.audio import AudioTextDataset, SpeechCollator, open_audio_stream
from mm.datasets.streams import ManifestStream, ShardStream
from mm.encoders.speech import BestRQ, BestRQConfig, SpeechEncoder, SpeechEncoderConfig
from mm.stages.speech import SpecAugmentConfig, SpeechFeaturesConfig
from mm.training import distributed as dist_utils
from mm.training.checkpoint import load_tensors, save_tensors, write_json
from mm.training.config import OptimConfig, TrainConfig, config_to_yaml
from mm.training.trainer import Task, Trainer, setup_run

log = logging.getLogger("mm.stages.bestrq_pretrain")

STAGE = "bestrq-pretrain"


@dataclass
class BestRQDataConfig:
    """Unlabeled audio: one JSONL manifest (`audio`, `text` optional) or WebDataset shards."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    max_bad_fraction: float = 0.05
    cache_samples: bool = False
    features: SpeechFeaturesConfig = field(default_factory=SpeechFeaturesConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=lambda: SpecAugmentConfig(enabled=False))


@dataclass
class BestRQPretrainConfig:
    """`mm pretrain-encoder` for the speech encoder (BEST-RQ)."""

    kind: str = "bestrq"
    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    bestrq: BestRQConfig = field(default_factory=BestRQConfig)
    data: BestRQDataConfig = field(default_factory=BestRQDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32))
    eval_samples: int = 128  # held-out clips for the final masked loss (0 = none)
    out: str = "runs/bestrq"


class _FeatureBatcher:
    """Samples -> {features, feature_lengths} (zero-padded)."""

    def __init__(self) -> None:
        self.collator = SpeechCollator(None, "", lambda n: 0)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats, lengths = self.collator.features(samples)
        return {"features": feats, "feature_lengths": lengths}


class BestRQTask(Task):
    """Masked-frame cross-entropy (BEST-RQ) on unlabeled audio; seeded masks, resumable sample order."""

    def __init__(
        self, model: BestRQ, stream: ManifestStream | ShardStream, batch_size: int, seed: int
    ) -> None:
        self.model, self.stream, self.batch_size = model, stream, batch_size
        self.name = STAGE
        self.batcher = _FeatureBatcher()
        self.generator = torch.Generator().manual_seed(seed)
        self.last_accuracy = 0.0

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Encoder + heads (projections and codebooks are buffers: never trained)."""
        return list(self.model.named_parameters())

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """(clips per step, 0)."""
        return self.batch_size, 0

    def next_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The next `batch_size` usable clips and their span mask (drawn here, so the loop knows the count)."""
        batch = self.batcher([self.stream.next() for _ in range(batch_size)])
        batch["mask"] = self.model.mask(batch["feature_lengths"], self.generator)
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed masked-frame CE / codebooks, masked frames)."""
        loss, info = self.model.loss(batch["features"], batch["feature_lengths"], batch["mask"])
        self.last_accuracy = info["accuracy"]
        return loss, batch["mask"].sum()

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Masked frames in the batch (the loss is averaged over them)."""
        return int(batch["mask"].sum())

    def batch_tokens(self, batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> int:
        """Encoder frames in the batch."""
        return int((batch["feature_lengths"] // 4).sum())

    def data_state(self) -> dict[str, Any]:
        """Position in the sample stream."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the sample stream."""
        if state:
            self.stream.load_state_dict(state)


@torch.no_grad()
def masked_eval(model: BestRQ, manifest: str, cfg: BestRQPretrainConfig) -> dict[str, float]:
    """Mean masked-frame CE (per frame and codebook) and code accuracy on the first `eval_samples` clips."""
    ds = AudioTextDataset(manifest, cfg.data.features.build(), require_text=False)
    samples = [s for s in (ds.load(i) for i in range(min(cfg.eval_samples, len(ds)))) if s is not None]
    batch = _FeatureBatcher()(samples)
    model.eval()
    mask = model.mask(
        batch["feature_lengths"], torch.Generator().manual_seed(1234)
    )  # the same masks every time
    loss, info = model.loss(batch["features"], batch["feature_lengths"], mask)
    return {"masked_loss": float(loss / mask.sum()), "code_accuracy": info["accuracy"], "n": len(samples)}


def load_bestrq(path: str | Path) -> BestRQ:
    """A BEST-RQ model (encoder, frozen projections/codebooks, heads) from `OUT/final`."""
    path = Path(path)
    meta = json.loads((path / "bestrq.json").read_text())
    model = BestRQ(
        SpeechEncoder(SpeechEncoderConfig(**meta["speech_encoder"])), BestRQConfig(**meta["bestrq"])
    )
    model.load_state_dict(load_tensors(path / "encoder.safetensors"))
    return model.eval()


def run_bestrq_pretrain(cfg: BestRQPretrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Pretrain the speech encoder with BEST-RQ; write OUT/final/encoder.safetensors and OUT/summary.json."""
    if cfg.kind != "bestrq":
        raise ValueError(f"kind={cfg.kind!r}: this runs BEST-RQ (kind: bestrq)")
    if not cfg.data.train:
        raise ValueError("no training data: pass --data MANIFEST.jsonl | SHARDS.tar ... or set data.train")
    if cfg.data.features.n_mels != cfg.speech_encoder.n_mels:
        raise ValueError(
            f"data.features.n_mels={cfg.data.features.n_mels} != speech_encoder.n_mels={cfg.speech_encoder.n_mels}"
        )
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)
    model = BestRQ(SpeechEncoder(cfg.speech_encoder), cfg.bestrq).to(device)
    stream = open_audio_stream(
        cfg.data.train,
        cfg.data.features.build(),
        seed=tr.seed,
        max_bad_fraction=cfg.data.max_bad_fraction,
        cache=cfg.data.cache_samples,
        require_text=False,
    )
    task = BestRQTask(model, stream, tr.batch_size, tr.seed)
    trainer = Trainer(task, tr, cfg.optim, out, config_record={"yaml": config_to_yaml(cfg)})
    frozen = {id(model.projection), id(model.codebooks)}
    if any(id(p) in frozen for g in trainer.optimizer.param_groups for p in g["params"]):
        raise RuntimeError("a BEST-RQ projection or codebook is in the optimizer")
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
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_tensors(sd, final / "encoder.safetensors")
        meta = {
            "speech_encoder": json.loads(json.dumps(cfg.speech_encoder.__dict__)),
            "bestrq": cfg.bestrq.__dict__,
        }
        write_json(meta, final / "bestrq.json")
        summary["final"] = str(final / "encoder.safetensors")
        if cfg.eval_samples and cfg.data.heldout:
            summary["heldout"] = {Path(m).stem: masked_eval(model, m, cfg) for m in cfg.data.heldout}
        write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    return summary
