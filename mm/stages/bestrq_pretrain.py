"""`mm pretrain-encoder` with a BEST-RQ config (`kind: bestrq`, e.g. configs/encoders/bestrq_tiny.yaml):
self-supervised pretraining of the speech encoder on unlabeled audio (Llama 3 paper §7.6; `mm.encoders.speech`),
on the one training loop (`mm.training.trainer.Trainer`).

Trained: the encoder and the BEST-RQ softmax heads. Never trained: the random projections and codebooks (buffers,
not parameters; the optimizer never sees them). Outputs: `OUT/final/encoder.safetensors` holding `encoder.*`
(what the speech stage loads with `encoder_weights=`), `projection`, `codebooks` and `heads.*`, plus
`OUT/final/bestrq.json` (encoder and BEST-RQ configs), `OUT/metrics.jsonl` (masked-frame loss per step) and
`OUT/summary.json` (masked loss and code accuracy on held-out audio at the end).

Replicated under torchrun (gradients all-reduced; the encoder's masked batch norm synchronises its
statistics); each process reads its own clips, and each clip's mask and noise come from its stream position,
so a global batch trains the same whichever way it is split. The frozen projections and codebooks are a
frozen part: fingerprinted at start and end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.datasets.audio import SpeechCollator, audio_decoder
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.media import MediaTextDataset
from mm.datasets.streams import open_stream
from mm.encoders.speech import BestRQ, BestRQConfig, SpeechEncoder, SpeechEncoderConfig, sample_generator
from mm.lm.io import write_json
from mm.stages.speech import SpeechFeaturesConfig
from mm.training.checkpoint import load_tensors, save_tensors
from mm.training.config import StageConfig, TrainConfig
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.bestrq_pretrain")

STAGE = "bestrq-pretrain"


@dataclass
class BestRQDataConfig:
    """Unlabeled audio: one JSONL manifest (`audio`, `text` optional) or WebDataset shards. No SpecAugment: BEST-RQ
    masks spans itself (as in the paper's pretraining)."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    max_bad_fraction: float = 0.05
    cache_samples: bool = False
    num_workers: int = 0  # DataLoader workers decoding this process's samples (0 = in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for faster copies to the GPU (CUDA only)
    shuffle_window: int = 1024  # WebDataset shards: shuffled within windows of this many (1 = stored order)
    features: SpeechFeaturesConfig = field(default_factory=SpeechFeaturesConfig)


@dataclass
class BestRQPretrainConfig(StageConfig):
    """`mm pretrain-encoder` / `stage: bestrq-pretrain`: BEST-RQ pretraining of the speech encoder."""

    stage: str = STAGE
    kind: str = "bestrq"  # older configs name the stage by this key (`mm pretrain-encoder` reads it)
    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    bestrq: BestRQConfig = field(default_factory=BestRQConfig)
    data: BestRQDataConfig = field(default_factory=BestRQDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32))
    eval_samples: int = 128  # held-out clips for the final masked loss (0 = none)
    out: str = "runs/bestrq"


class PositionsAnd:
    """Collate in the DataLoader worker, keeping each sample's stream position (for its mask and noise)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """(the collated batch, [{"position": g} per sample])."""
        return self.collate(samples), [{"position": s["position"]} for s in samples if "position" in s]


class FeatureCollator:
    """Samples -> {features, feature_lengths} (zero-padded)."""

    def __init__(self) -> None:
        self.collator = SpeechCollator(None, "", lambda n: 0)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats, lengths = self.collator.features(samples)
        return {"features": feats, "feature_lengths": lengths}


@register((STAGE,), BestRQPretrainConfig)
class BestRQStage(Stage[BestRQPretrainConfig]):
    """Masked-frame cross-entropy (BEST-RQ) on unlabeled audio; per-clip masks, resumable sample order."""

    def check(self) -> None:
        """The kind, the data and the feature size."""
        cfg = self.cfg
        if cfg.kind != "bestrq":
            raise ValueError(f"kind={cfg.kind!r}: this runs BEST-RQ (kind: bestrq)")
        if cfg.data.features.n_mels != cfg.speech_encoder.n_mels:
            raise ValueError(
                f"data.features.n_mels={cfg.data.features.n_mels} != "
                f"speech_encoder.n_mels={cfg.speech_encoder.n_mels}"
            )

    def build(self, device: torch.device) -> nn.Module:
        """Encoder + frozen random projections and codebooks + one head per codebook."""
        self.model = BestRQ(SpeechEncoder(self.cfg.speech_encoder), self.cfg.bestrq).to(device)
        self.last_accuracy = torch.zeros(())  # the last step's code accuracy, left on the device
        return self.model

    def frozen(self) -> dict[str, Any]:
        """The quantizer: the random projections and codebooks (buffers) that make the targets."""
        return {"quantizer": {"projection": self.model.projection, "codebooks": self.model.codebooks}}

    def open_data(self, rank: int, world: int) -> None:
        """This process's clips."""
        d = self.cfg.data
        clips = open_stream(
            d.train,
            audio_decoder(d.features.build()),
            seed=self.cfg.train.seed,
            max_bad_fraction=d.max_bad_fraction,
            cache=d.cache_samples,
            require_text=False,
            rank=rank,
            world=world,
            shuffle_window=d.shuffle_window,
        )
        self.collator = FeatureCollator()
        self.stream = ResumableLoader(
            SampleReader(clips, rank, world, PositionsAnd(self.collator)), LoaderOptions.from_config(d)
        )
        self.generator = torch.Generator().manual_seed(self.cfg.train.seed)

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's `rows` clips of the next global batch (featurised and padded by the DataLoader
        workers) with their span mask and noise (drawn here, so the loop knows the count): each clip's from a
        generator seeded by (run seed, its stream position), so they do not depend on how the global batch is
        split over processes."""
        batch, samples = self.stream.next(rows)
        gens = [self._sample_generator(s) for s in samples]
        batch["mask"], batch["noise"] = self.model.mask_and_noise(batch["feature_lengths"], gens)
        return batch

    def _sample_generator(self, sample: dict[str, Any]) -> torch.Generator:
        """(run seed, stream position) -> the clip's generator; a sample without a position (shards) gets a
        seed from this process's generator instead."""
        if "position" in sample:
            return sample_generator(self.cfg.train.seed, int(sample["position"]))
        return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed masked-frame CE / codebooks, masked frames)."""
        loss, info = self.model.loss(
            batch["features"], batch["feature_lengths"], batch["mask"], batch["noise"]
        )
        self.last_accuracy = info["accuracy"]
        return loss, batch["mask"].sum()

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Masked frames in the batch (the loss is averaged over them)."""
        return int(batch["mask"].sum())

    def batch_tokens(self, batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> int:
        """Encoder frames in the batch."""
        return int((batch["feature_lengths"] // 4).sum())

    def evaluate(self) -> dict[str, float]:
        """Masked loss and code accuracy on the first held-out manifest."""
        if not (self.cfg.eval_samples and self.cfg.data.heldout):
            return {}
        with autocast_context(self.cfg.train.autocast, self.device):
            r = masked_eval(self.model, self.cfg.data.heldout[0], self.cfg)
        self.model.train()
        return {f"heldout_{k}": float(v) for k, v in r.items() if k != "n"}

    def final_evaluation(self) -> dict[str, Any]:
        """Masked loss and code accuracy on every held-out manifest."""
        if not (self.cfg.eval_samples and self.cfg.data.heldout):
            return {}
        return {
            "heldout": {Path(m).stem: masked_eval(self.model, m, self.cfg) for m in self.cfg.data.heldout}
        }

    def finish(self, trainer: Any, summary: dict[str, Any]) -> None:
        """The summary names the encoder file."""
        summary["final"] = str(Path(self.cfg.out) / "final" / "encoder.safetensors")

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """`final/encoder.safetensors` (encoder, projections, codebooks, heads) and `final/bestrq.json`."""
        if self.rank != 0:
            return
        final.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_tensors(sd, final / "encoder.safetensors")
        cfg = self.cfg
        write_json(
            {
                "speech_encoder": json.loads(json.dumps(cfg.speech_encoder.__dict__)),
                "bestrq": cfg.bestrq.__dict__,
            },
            final / "bestrq.json",
        )


@torch.no_grad()
def masked_eval(model: BestRQ, manifest: str, cfg: BestRQPretrainConfig) -> dict[str, float]:
    """Mean masked-frame CE (per frame and codebook) and code accuracy on the first `eval_samples` clips."""
    ds = MediaTextDataset(manifest, audio_decoder(cfg.data.features.build()), require_text=False)
    samples = [s for s in (ds.load(i) for i in range(min(cfg.eval_samples, len(ds)))) if s is not None]
    batch = FeatureCollator()(samples)
    model.eval()
    gens = [sample_generator(1234, i) for i in range(len(samples))]  # the same masks and noise every time
    mask, noise = model.mask_and_noise(batch["feature_lengths"], gens)
    loss, info = model.loss(batch["features"], batch["feature_lengths"], mask, noise)
    return {
        "masked_loss": float(loss / mask.sum()),
        "code_accuracy": float(info["accuracy"]),
        "n": len(samples),
    }


def load_bestrq(path: str | Path) -> BestRQ:
    """A BEST-RQ model (encoder, frozen projections/codebooks, heads) from `OUT/final`."""
    path = Path(path)
    meta = json.loads((path / "bestrq.json").read_text())
    model = BestRQ(
        SpeechEncoder(SpeechEncoderConfig(**meta["speech_encoder"])), BestRQConfig(**meta["bestrq"])
    )
    model.load_state_dict(load_tensors(path / "encoder.safetensors"))
    return model.eval()
