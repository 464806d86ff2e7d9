"""The `speech` stage (Llama 3 paper §7.6): speech encoder + speech adapter train, the LM stays frozen; the
adapter's outputs are spliced into the LM input as token embeddings between `<|speech_start|>` and
`<|speech_end|>` (no cross-attention). Also: `SpeechLM` (the composition), transcription (`mm transcribe`) and
the word error rate.

`SpeechLM(lm, encoder, adapter)`: trains `encoder` and `adapter`, never `lm`. A row is
`<bos> <|speech_start|> [speech slots] <|speech_end|> prompt text <eos>` (`mm.datasets.audio.SpeechCollator`);
the slots' token embeddings are replaced by the adapter outputs, one per 80 ms of audio.

WER (`word_error_rate`): jiwer's word error rate after `normalize_text` on both sides: lower case, every
character that is not a letter, digit, apostrophe or whitespace becomes a space, whitespace collapsed (a small
subset of Whisper's English normaliser; enough for the shapes world's plain sentences).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from mm.datasets.audio import AudioFeatures, SpeechCollator, open_audio_stream, read_audio_manifest
from mm.datasets.images import BadSample
from mm.datasets.shapes import ASR_PROMPT
from mm.datasets.streams import ManifestStream, ShardStream
from mm.encoders.speech import SpeechEncoder, SpeechEncoderConfig
from mm.lm import Tokenizer, Transformer, load_hf
from mm.models.speech import (
    SpeechLM,
    copy_transcripts,
    ctc_transcripts,
    token_embedding_rms,
    transcribe_features,
)
from mm.training import distributed as dist_utils
from mm.training.bundle import dataclass_dict, load_adapter_weights, read_config, save_bundle
from mm.training.checkpoint import latest_checkpoint, load_tensors, write_json
from mm.training.config import OptimConfig, TrainConfig, config_to_yaml
from mm.training.freeze import FrozenLMChanged, assert_not_in_optimizer, fingerprint, freeze
from mm.training.trainer import Task, Trainer, setup_run

log = logging.getLogger("mm.stages.speech")

STAGE = "speech"


# ------------------------------------------------------------------------------------------------- configs


@dataclass
class SpeechFeaturesConfig:
    """Log-mel features and the length policy (`mm.datasets.audio.AudioFeatures`)."""

    n_mels: int = 80
    max_seconds: float = 20.0
    too_long: str = "crop"  # crop | reject
    normalize: bool = True

    def build(self) -> AudioFeatures:
        """The feature transform."""
        return AudioFeatures(self.n_mels, self.max_seconds, self.too_long, normalize=self.normalize)


@dataclass
class SpecAugmentConfig:
    """SpecAugment during training (off with enabled=false)."""

    enabled: bool = True
    freq_masks: int = 2
    freq_width: int = 10
    time_masks: int = 2
    time_width: float = 0.05


@dataclass
class SpeechDataConfig:
    """Audio-text pairs: one JSONL manifest or WebDataset shards; held-out manifests for the WER."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    prompt: str = ASR_PROMPT  # used when a record has no `prompt` of its own (e.g. an AST instruction)
    max_bad_fraction: float = 0.05
    cache_samples: bool = False  # keep features in memory (small data, e.g. the demo)
    features: SpeechFeaturesConfig = field(default_factory=SpeechFeaturesConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)


@dataclass
class SpeechStageConfig:
    """`mm train` for the speech stage."""

    stage: str = STAGE
    lm: str = ""  # HF Llama directory of the frozen LM (e.g. runs/demo/lm-pretrain/final)
    tokenizer: str | None = None  # default: the LM directory's tokenizer
    encoder_weights: str | None = (
        None  # BEST-RQ output (`mm pretrain-encoder`), e.g. .../final/encoder.safetensors
    )
    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    adapter: SpeechAdapterConfig = field(default_factory=SpeechAdapterConfig)
    data: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_samples: int = 256  # clips transcribed per held-out manifest at the end (0 = none)
    out: str = "runs/speech"


# --------------------------------------------------------------------------------------------- composition
def build_speech_model(cfg: SpeechStageConfig, lm: Transformer) -> SpeechLM:
    """Frozen LM + speech encoder (+ BEST-RQ weights) + adapter."""
    encoder = SpeechEncoder(cfg.speech_encoder)
    if cfg.encoder_weights:
        tensors = load_tensors(Path(cfg.encoder_weights))
        sd = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
        if not sd:
            raise ValueError(
                f"{cfg.encoder_weights}: no `encoder.*` tensors (expected a BEST-RQ encoder file)"
            )
        encoder.load_state_dict(sd)  # strict: shapes and names must match speech_encoder
        log.info("speech encoder weights from %s (%d tensors)", cfg.encoder_weights, len(sd))
    adapter = SpeechAdapter(cfg.speech_encoder.dim, lm.cfg.dim, cfg.adapter)
    adapter.set_output_rms(token_embedding_rms(lm))
    return SpeechLM(lm, encoder, adapter)


# ----------------------------------------------------------------------------------------------------- task


class SpeechTask(Task):
    """Next-token loss on the text after the speech (ASR, AST); a seeded, resumable sample order."""

    def __init__(
        self, model: SpeechLM, stream: ManifestStream | ShardStream, collator: SpeechCollator, batch_size: int
    ) -> None:
        self.model, self.stream, self.collator, self.batch_size = model, stream, collator, batch_size
        self.name = STAGE

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Encoder and adapter only."""
        return self.model.trainable_named_parameters()

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """(clips per step, 0)."""
        return self.batch_size, 0

    def next_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The next `batch_size` usable clips (bad files skipped and counted by the readers)."""
        return self.collator([self.stream.next() for _ in range(batch_size)])

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the text tokens (+ `ctc_weight` x the summed CTC loss when configured)."""
        ctc_weight = self.model.speech_adapter.cfg.ctc_weight
        out = self.model(
            batch["tokens"],
            features=batch["features"],
            feature_lengths=batch["feature_lengths"],
            speech_mask=batch["speech_mask"],
            return_speech=bool(ctc_weight),
        )
        logits = out[0] if ctc_weight else out
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        if ctc_weight:
            _, sp, counts = out
            loss = loss + ctc_weight * self.model.ctc_loss(
                sp, counts, batch["ctc_targets"], batch["ctc_lengths"]
            )
        return loss, (labels != -100).sum()

    def data_state(self) -> dict[str, Any]:
        """Position in the sample stream."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the sample stream."""
        if state:
            self.stream.load_state_dict(state)


def normalize_text(text: str) -> str:
    """Lower case; anything but letters, digits, apostrophes and whitespace -> space; whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s']|_", " ", text.lower()).split())


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER (jiwer) after `normalize_text` on references and hypotheses."""
    import jiwer

    r = [normalize_text(t) for t in refs]
    h = [normalize_text(t) for t in hyps]
    keep = [i for i, t in enumerate(r) if t]
    return float(jiwer.wer([r[i] for i in keep], [h[i] for i in keep]))


def evaluate_wer(
    model: SpeechLM, tok: Tokenizer, features: AudioFeatures, manifest: str, n: int, prompt: str
) -> dict[str, Any]:
    """Transcribe the first `n` usable clips of a manifest; WER overall and per voice (when recorded)."""
    recs = read_audio_manifest(manifest)[:n]
    feats, refs, voices = [], [], []
    skipped = 0
    for r in recs:
        try:
            feats.append(features.load(r.audio))
        except BadSample as e:
            skipped += 1
            log.warning("evaluation: skipped %s (%s)", r.audio, e)
            continue
        refs.append(r.text)
        voices.append(r.meta.get("voice"))
    hyps = transcribe_features(model, tok, feats, prompt=prompt)
    res: dict[str, Any] = {"wer": word_error_rate(refs, hyps), "n": len(refs), "skipped": skipped}
    res["exact_match"] = sum(normalize_text(a) == normalize_text(b) for a, b in zip(refs, hyps)) / max(
        1, len(refs)
    )
    if any(v is not None for v in voices):
        per = {}
        for v in sorted({v for v in voices if v is not None}):
            idx = [i for i, u in enumerate(voices) if u == v]
            per[v] = word_error_rate([refs[i] for i in idx], [hyps[i] for i in idx])
        res["wer_per_voice"] = per
    res["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]
    if model.speech_adapter.ctc_blank is not None:  # what the audio side alone recognises (no LM)
        res["ctc_wer"] = word_error_rate(refs, ctc_transcripts(model, tok, feats))
    res["lm_copy_wer"] = word_error_rate(refs, copy_transcripts(model.lm, tok, refs, prompt))
    return res


# ---------------------------------------------------------------------------------------------------- run


def run_speech_stage(cfg: SpeechStageConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train the speech stage; write OUT/final (encoder + adapter bundle, no LM tensor) and OUT/summary.json."""
    if cfg.stage != STAGE:
        raise ValueError(f"stage={cfg.stage!r}; this runs the {STAGE!r} stage")
    if not cfg.lm:
        raise ValueError("`lm` must name the frozen LM directory (e.g. runs/demo/lm-pretrain/final)")
    if not cfg.data.train:
        raise ValueError("no training data: pass --data MANIFEST.jsonl|SHARD.tar ... or set data.train")
    if cfg.data.features.n_mels != cfg.speech_encoder.n_mels:
        raise ValueError(
            f"data.features.n_mels={cfg.data.features.n_mels} != speech_encoder.n_mels={cfg.speech_encoder.n_mels}"
        )
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)
    lm_path = Path(cfg.lm).resolve()
    lm = load_hf(lm_path, device=device)
    tok = Tokenizer.from_file(cfg.tokenizer or lm_path)
    freeze(lm)
    fp_start = fingerprint(lm)
    model = build_speech_model(cfg, lm).to(device)
    if resume:
        ck = latest_checkpoint(out / "checkpoints")
        if ck is not None:
            rec = json.loads((ck / "trainer.json").read_text())["config"]
            if rec.get("lm_fingerprint") != fp_start:
                raise FrozenLMChanged(f"{ck} belongs to an LM with another fingerprint than {lm_path}")
    features = cfg.data.features.build()
    stream = open_audio_stream(
        cfg.data.train,
        features,
        seed=tr.seed,
        max_bad_fraction=cfg.data.max_bad_fraction,
        cache=cfg.data.cache_samples,
    )
    sa = cfg.data.spec_augment
    augment = None
    if sa.enabled:
        augment = {k: getattr(sa, k) for k in ("freq_masks", "freq_width", "time_masks", "time_width")}
    collator = SpeechCollator(tok, cfg.data.prompt, model.n_slots, augment=augment, seed=tr.seed)
    task = SpeechTask(model, stream, collator, tr.batch_size)
    meta_record = {"yaml": config_to_yaml(cfg), "lm_fingerprint": fp_start, "lm_path": str(lm_path)}
    trainer = Trainer(task, tr, cfg.optim, out, config_record=meta_record)
    assert_not_in_optimizer(lm, trainer.optimizer)
    if dist_utils.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    summary = trainer.fit(resume=resume)
    fp_end = fingerprint(lm)
    if fp_end != fp_start:
        raise FrozenLMChanged(f"the LM changed during {STAGE}: {fp_start[:16]}... -> {fp_end[:16]}...")
    summary.update(lm_fingerprint_start=fp_start, lm_fingerprint_end=fp_end, data_skips=stream.stats())
    if summary["stopped"] != "max_steps":
        return summary
    meta = {
        "stage": STAGE,
        "lm_path": str(lm_path),
        "lm_fingerprint": fp_start,
        "lm_fingerprint_start": fp_start,
        "lm_fingerprint_end": fp_end,
        "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
        "speech_encoder": dataclass_dict(cfg.speech_encoder),
        "speech_adapter": dataclass_dict(cfg.adapter),
        "features": dataclass_dict(cfg.data.features),
        "prompt": cfg.data.prompt,
    }
    if cfg.eval_samples and cfg.data.heldout:
        summary["eval"] = {
            Path(m).stem: evaluate_wer(model, tok, features, m, cfg.eval_samples, cfg.data.prompt)
            for m in cfg.data.heldout
        }
    if dist_utils.rank() == 0:
        save_bundle(model.adapter_state(), out / "final", meta)
        write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    dist_utils.barrier()
    return summary


def load_speech_bundle(path: Path) -> tuple[SpeechLM, Tokenizer, AudioFeatures, dict[str, Any]]:
    """Rebuild a trained speech model from its bundle (refusing an LM whose fingerprint changed)."""
    from mm.training.bundle import load_lm_checked, load_tokenizer

    meta = read_config(path)
    if meta.get("stage") != STAGE:
        raise ValueError(f"{path} is a {meta.get('stage')!r} checkpoint, not a speech-stage one")
    lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    freeze(lm)
    enc_cfg = SpeechEncoderConfig(**meta["speech_encoder"])
    model = SpeechLM(
        lm,
        SpeechEncoder(enc_cfg),
        SpeechAdapter(enc_cfg.dim, lm.cfg.dim, SpeechAdapterConfig(**meta["speech_adapter"])),
    )
    load_adapter_weights(model, path)
    features = SpeechFeaturesConfig(**meta["features"]).build()
    return model.eval(), tok, features, meta
