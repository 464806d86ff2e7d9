"""The `speech` stage (Llama 3 paper §7.6): speech encoder + speech adapter train, the LM stays frozen; the
adapter's outputs are spliced into the LM input as token embeddings between `<|speech_start|>` and
`<|speech_end|>` (no cross-attention; the model is `mm.models.speech.SpeechLM`). ASR and speech translation
(AST) train together: `data.ast_fraction` of the rows, drawn per stream position, translate the clip into its
record's `spanish` after `data.ast_prompt` (`mm.datasets.speech_tasks`); `data.conditions` hears a share
(`data.condition_prob`) of the clips under audio conditions (noise, level, telephone band, MP3/OGG, silences).
Evaluation: the word error rate (`mm.stages.evaluation.word_error_rate`) on held-out manifests, beside the CTC
head alone and the frozen LM copying the text; with AST the translations' BLEU and exact match, with
`eval_conditions` the WER per condition (`mm.stages.speech_eval`). Under torchrun FSDP2 shards the frozen LM; the speech encoder and adapter are replicated
(gradients all-reduced; the masked batch norm of the speech encoder synchronises its statistics), each process
reading only its clips.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
from mm.datasets.audio import AudioFeatures, SpeechCollator, audio_decoder
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.media import read_manifest
from mm.datasets.speech_tasks import SpeechBatches, SpeechRows, is_question
from mm.datasets.streams import open_stream
from mm.encoders.speech import SpeechEncoder, SpeechEncoderConfig
from mm.formats.bundle import (
    dataclass_dict,
    load_adapter_weights,
    load_lm_checked,
    load_tokenizer,
    save_bundle,
)
from mm.lm import Tokenizer, Transformer
from mm.models.loading import read_stage_config
from mm.models.speech import SpeechLM, token_embedding_rms
from mm.prompts import ASR_PROMPT, AST_PROMPT, DIALOGUE_PROMPT
from mm.stages.evaluation import evaluate_wer
from mm.stages.speech_eval import (
    evaluate_conditions,
    evaluate_questions,
    evaluate_translation,
    is_question_manifest,
)
from mm.training import distributed as dist_utils
from mm.training.checkpoint import load_tensors
from mm.training.config import StageConfig
from mm.training.parallelize import ParallelPlan
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.speech")

STAGE = "speech"
SPEECH_STAGES = (STAGE,)


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
    num_workers: int = 0  # DataLoader workers decoding this process's samples (0 = in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for faster copies to the GPU (CUDA only)
    shuffle_window: int = 1024  # WebDataset shards: shuffled within windows of this many (1 = stored order)
    features: SpeechFeaturesConfig = field(default_factory=SpeechFeaturesConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    # speech translation (AST): this share of rows (drawn per stream position) are translation rows: the clip,
    # `ast_prompt`, its record's `spanish` (0 = ASR only, the rows of before)
    ast_fraction: float = 0.0
    ast_prompt: str = AST_PROMPT
    # audio conditions (names of mm.datasets.audio_conditions.CONDITIONS): a clip is heard under one of them
    # with probability `condition_prob` (drawn per stream position; empty = as decoded)
    conditions: list[str] = field(default_factory=list)
    condition_prob: float = 0.5


@dataclass
class SpeechStageConfig(StageConfig):
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
    eval_samples: int = 256  # clips transcribed per held-out manifest at the end (0 = none)
    curve_samples: int = 64  # clips of the first held-out manifest transcribed every `train.eval_every` steps
    eval_conditions: list[str] = field(default_factory=list)  # final WER on heldout[0] under each condition
    out: str = "runs/speech"


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
    if not lm.tok_embeddings.weight.is_meta:  # else once the LM has its values (SpeechStage.materialized)
        adapter.set_output_rms(token_embedding_rms(lm))
    return SpeechLM(lm, encoder, adapter)


def load_speech_bundle(path: Path) -> tuple[SpeechLM, Tokenizer, AudioFeatures, dict[str, Any]]:
    """Rebuild a trained speech model from its bundle (refusing an LM whose fingerprint changed)."""
    meta = read_stage_config(path, SPEECH_STAGES)
    lm = load_lm_checked(path, meta)
    tok = load_tokenizer(path, meta)
    enc_cfg = SpeechEncoderConfig(**meta["speech_encoder"])
    model = SpeechLM(
        lm,
        SpeechEncoder(enc_cfg),
        SpeechAdapter(enc_cfg.dim, lm.cfg.dim, SpeechAdapterConfig(**meta["speech_adapter"])),
    )
    load_adapter_weights(model, path)
    model.set_boundary_ids(tok.speech_start_id, tok.speech_end_id)
    f = meta["features"]
    features = AudioFeatures(f["n_mels"], f["max_seconds"], f["too_long"], normalize=f["normalize"])
    return model.eval(), tok, features, meta


@register(SPEECH_STAGES, SpeechStageConfig)
class SpeechStage(Stage[SpeechStageConfig]):
    """Next-token loss on the text after the speech (ASR, AST) + the adapter's CTC loss; the LM frozen."""

    reader = "transcribe"

    @classmethod
    def load_final(cls, path: Path) -> tuple[SpeechLM, Tokenizer, AudioFeatures, dict[str, Any]]:
        """The speech model of a final folder (its LM fingerprint checked)."""
        return load_speech_bundle(path)

    def check(self) -> None:
        """The stage name, the LM, the data and the feature size."""
        cfg = self.cfg
        self.require("lm", "the frozen LM directory (e.g. runs/demo/lm-pretrain/final)")
        if cfg.data.features.n_mels != cfg.speech_encoder.n_mels:
            raise ValueError(
                f"data.features.n_mels={cfg.data.features.n_mels} != "
                f"speech_encoder.n_mels={cfg.speech_encoder.n_mels}"
            )
        self.rows()  # the task and condition settings (ValueError naming the bad one)

    def rows(self) -> SpeechRows:
        """Each training sample's task (ASR/AST) and audio condition, from the `data` settings."""
        d = self.cfg.data
        features = d.features.build() if d.conditions else None
        return SpeechRows(
            d.ast_fraction, d.ast_prompt, d.conditions, d.condition_prob, features, self.cfg.train.seed
        )

    def _check_spanish(self) -> None:
        """With translation rows, every JSONL training manifest's records carry a `spanish` string."""
        for m in self.cfg.data.train:
            if not m.endswith(".jsonl"):
                continue  # shards: checked per sample when a translation row meets one
            missing = [
                r
                for r in read_manifest(m, "audio")
                if not isinstance(r.meta.get("spanish"), str)
                and not is_question(r.meta)
                and not r.meta.get("asr_only")
            ]
            if missing:
                raise ValueError(
                    f"{m}: {len(missing)} records have no 'spanish' string (first: {missing[0].media}); "
                    f"data.ast_fraction={self.cfg.data.ast_fraction} needs each record's Spanish translation"
                )

    def build(self, device: torch.device) -> nn.Module:
        """Frozen LM (read lazily on the meta device) + speech encoder (+ BEST-RQ weights) + adapter."""
        self.lm_path = Path(self.cfg.lm).resolve()
        lm = self.frozen_lm(self.cfg.lm, device)  # (`mm plan`: the shape of a directory or an LM preset)
        if not self.ctx.shapes_only:
            self.tok = Tokenizer.from_file(self.cfg.tokenizer or self.lm_path)
        self.model = build_speech_model(self.cfg, lm).to(device)
        if not self.ctx.shapes_only:
            self.model.set_boundary_ids(self.tok.speech_start_id, self.tok.speech_end_id)
        else:  # no tokenizer read: the ids a Llama 3 vocabulary of the LM's size gives them
            self.model.set_layout_boundary_ids()
        return self.model

    def materialized(self) -> None:
        """The adapter's output scale: the LM's token-embedding RMS, now that the LM has its values (from every
        process's rows when the embeddings are sharded)."""
        w = self.model.lm.tok_embeddings.weight
        if not hasattr(w, "to_local"):
            rms = token_embedding_rms(self.model.lm)
        else:
            local = w.to_local().detach().double()
            sq = dist_utils.all_reduce_sum(local.pow(2).sum().reshape(1))
            rms = float((sq / w.numel()).sqrt())
        self.model.speech_adapter.set_output_rms(rms)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The speech encoder and adapter (never an `lm.` parameter)."""
        return self.model.trainable_named_parameters()

    def frozen(self) -> dict[str, Any]:
        """The LM."""
        return {"lm": self.model.lm}

    def parallel_plan(self) -> ParallelPlan:
        """Activation checkpointing and compile of the LM layers, then FSDP2 on the frozen LM only (per layer,
        then its embeddings, norm and output); the small speech encoder and adapter stay replicated (the
        trainer all-reduces their gradients)."""
        lm = self.model.lm
        layers = list(lm.layers)
        return ParallelPlan(lm, blocks=layers, fsdp_units=layers, extra_forward_methods={"embed": [lm]})

    def record(self) -> dict[str, Any]:
        """Where the frozen LM lives."""
        return {"lm_path": str(self.lm_path)}

    def open_data(self, rank: int, world: int) -> None:
        """This process's clips and the collator (SpecAugment per clip, seeded by its stream position)."""
        d, tr = self.cfg.data, self.cfg.train
        self.features: AudioFeatures = d.features.build()
        rows = self.rows()
        if d.ast_fraction > 0:
            self._check_spanish()
        keep_wave = rows.condition_prob > 0 and bool(rows.conditions)
        clips = open_stream(
            d.train,
            audio_decoder(self.features, keep_wave=keep_wave),
            seed=tr.seed,
            max_bad_fraction=d.max_bad_fraction,
            cache=d.cache_samples,
            rank=rank,
            world=world,
            shuffle_window=d.shuffle_window,
        )
        sa = d.spec_augment
        augment = None
        if sa.enabled:
            augment = {k: getattr(sa, k) for k in ("freq_masks", "freq_width", "time_masks", "time_width")}
        self.collator = SpeechCollator(self.tok, d.prompt, self.model.n_slots, augment=augment, seed=tr.seed)
        collate = SpeechBatches(rows, self.collator)  # question records, AST draws, conditions
        self.stream = ResumableLoader(SampleReader(clips, rank, world, collate), LoaderOptions.from_config(d))

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's `rows` clips of the next global batch, featurised and collated by the DataLoader
        workers (bad files skipped and counted by the readers)."""
        return self.stream.next(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the text tokens (+ `ctc_weight` x the summed CTC loss when configured)."""
        ctc_weight = self.model.speech_adapter.cfg.ctc_weight
        out = self.model(
            batch["tokens"],
            features=batch["features"],
            feature_lengths=batch["feature_lengths"],
            speech_mask=batch["speech_mask"],
            return_speech=bool(ctc_weight),
            labels=batch["labels"],
            loss_chunk=self.cfg.train.loss_chunk,
        )
        loss = out[0] if ctc_weight else out
        labels = batch["labels"]
        if ctc_weight:
            _, sp, counts = out
            loss = loss + ctc_weight * self.model.ctc_loss(
                sp, counts, batch["ctc_targets"], batch["ctc_lengths"]
            )
        return loss, (labels != -100).sum()

    def _wer(self, manifest: str, n: int, translation: bool = False) -> dict[str, Any]:
        """WER of a manifest's first `n` clips (and with `translation` its AST BLEU and exact match, `ast`)."""
        d = self.cfg.data
        with autocast_context(self.cfg.train.autocast, self.device):
            res = evaluate_wer(self.model, self.tok, self.features, manifest, n, d.prompt)
            if translation:
                res["ast"] = evaluate_translation(
                    self.model, self.tok, self.features, manifest, n, d.ast_prompt
                )
        self.model.train()
        return res

    def _questions(self, manifest: str, n: int) -> dict[str, Any]:
        """Accuracy of the answers to a manifest's first `n` spoken questions."""
        with autocast_context(self.cfg.train.autocast, self.device):
            res = evaluate_questions(self.model, self.tok, self.features, manifest, n)
        self.model.train()
        return res

    def _held_out(self, manifest: str, n: int, translation: bool) -> dict[str, Any]:
        """A held-out manifest's figures: answer accuracy for spoken questions, else the WER (and AST)."""
        if is_question_manifest(manifest):
            return self._questions(manifest, n)
        return self._wer(manifest, n, translation)

    def _wer_by_condition(self, manifest: str, n: int) -> dict[str, float]:
        with autocast_context(self.cfg.train.autocast, self.device):
            res = evaluate_conditions(
                self.model,
                self.tok,
                self.features,
                manifest,
                n,
                self.cfg.data.prompt,
                self.cfg.eval_conditions,
            )
        self.model.train()
        return res

    def evaluate(self) -> dict[str, float]:
        """WER of the first `curve_samples` clips of the first held-out manifest."""
        cfg = self.cfg
        if not (cfg.curve_samples and cfg.data.heldout):
            return {}
        res = self._wer(cfg.data.heldout[0], cfg.curve_samples, translation=cfg.data.ast_fraction > 0)
        out = {"heldout_wer": res["wer"]}
        if "ast" in res:
            out["heldout_bleu"] = res["ast"]["bleu"]
        return out

    def final_evaluation(self) -> dict[str, Any]:
        """WER (and CTC-alone, LM-copy) of the first `eval_samples` clips of each held-out manifest; with AST
        training its translations' BLEU and exact match (`eval.<manifest>.ast`); for a manifest of spoken
        questions the answers' accuracy instead; with `eval_conditions` the WER on the first held-out manifest
        under each condition (`wer_by_condition`)."""
        cfg = self.cfg
        if not (cfg.eval_samples and cfg.data.heldout):
            return {}
        ast = cfg.data.ast_fraction > 0
        out: dict[str, Any] = {
            "eval": {Path(m).stem: self._held_out(m, cfg.eval_samples, ast) for m in cfg.data.heldout}
        }
        if cfg.eval_conditions:
            out["wer_by_condition"] = self._wer_by_condition(cfg.data.heldout[0], cfg.eval_samples)
        return out

    def bundle_meta(self) -> dict[str, Any]:
        """LM location, tokenizer, encoder, adapter, features and prompts (ASR; AST when trained)."""
        cfg = self.cfg
        return {
            "lm_path": str(self.lm_path),
            "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
            "speech_encoder": dataclass_dict(cfg.speech_encoder),
            "speech_adapter": dataclass_dict(cfg.adapter),
            "features": dataclass_dict(cfg.data.features),
            "prompt": cfg.data.prompt,
            "ast_prompt": cfg.data.ast_prompt if cfg.data.ast_fraction > 0 else None,
            # spoken dialogue (no prompt after the speech) when training had spoken-question records
            "dialogue_prompt": DIALOGUE_PROMPT if self._trains_questions() else None,
        }

    def _trains_questions(self) -> bool:
        """Whether a JSONL training manifest holds spoken-question records (`context`, `answer`)."""
        return any(
            is_question(r.meta)
            for m in self.cfg.data.train
            if m.endswith(".jsonl")
            for r in read_manifest(m, "audio")
        )

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """The bundle: speech encoder and adapter tensors (no LM tensor)."""
        state = self.gathered(self.model.adapter_state())
        if self.rank == 0:
            save_bundle(state, final, meta)
