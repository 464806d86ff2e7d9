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
from mm.lm import Tokenizer, Transformer, generate, load_hf
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


@dataclass
class SpeechContext:
    """Speech embeddings aligned with a prompt: `embeds` (B, T, D) are used where `mask` (B, T) is True."""

    embeds: torch.Tensor
    mask: torch.Tensor


class SpeechLM(nn.Module):
    """Frozen LM + speech encoder + speech adapter; `encoder` and `adapter` train, the LM never does."""

    trainable = ("speech_encoder", "speech_adapter")

    def __init__(self, lm: Transformer, encoder: SpeechEncoder, adapter: SpeechAdapter) -> None:
        super().__init__()
        self.lm, self.speech_encoder, self.speech_adapter = lm, encoder, adapter

    @property
    def cfg(self) -> Any:
        """The LM's config (generation and the KV cache read it)."""
        return self.lm.cfg

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Encoder and adapter parameters (never an `lm.` one)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("lm.")]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every non-LM tensor (what a stage bundle holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def n_slots(self, n_frames: int) -> int:
        """Speech embeddings for a clip of `n_frames` 10 ms feature frames."""
        n = self.speech_encoder.out_lengths(torch.tensor([n_frames]))
        return int(self.speech_adapter.out_lengths(n)[0])

    def encode_speech(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, T, 80), lengths (B,) -> LM-width speech embeddings (B, S, D) and their counts (B,)."""
        h, n = self.speech_encoder(feats, lengths)
        return self.speech_adapter(h, n)

    @staticmethod
    def splice(
        embeds: torch.Tensor, slots: torch.Tensor, speech: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Put row b's first counts[b] speech vectors, in order, at the True positions of slots[b]."""
        valid = torch.arange(speech.shape[1], device=speech.device)[None, :] < counts[:, None]
        if not torch.equal(slots.sum(1), counts):
            raise ValueError(
                f"speech slots per row {slots.sum(1).tolist()} != speech embeddings {counts.tolist()}"
            )
        out = embeds.clone()
        out[slots] = speech[valid].to(embeds.dtype)
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        speech: SpeechContext | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        last_only: bool = False,
        return_speech: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) (or (B, 1, V) of the last position with `last_only`). Training: `features`, `feature_lengths`, `speech_mask`. Generation: a precomputed
        `speech` context, spliced on the forward over the whole prompt (the first one, cache empty)."""
        h = self.lm.embed(tokens)
        sp = counts = None
        if features is not None:
            sp, counts = self.encode_speech(features, feature_lengths)
            h = self.splice(h, speech_mask, sp, counts)
            if self.speech_adapter.cfg.ctc_compress:  # hide the blank/repeat frames, close the position gaps
                keep = self.kept_frames(sp, counts)
                valid = torch.ones_like(speech_mask)
                in_row = torch.arange(sp.shape[1], device=sp.device)[None, :] < counts[:, None]
                valid[speech_mask] = keep[in_row]
                attention_mask = valid if attention_mask is None else attention_mask & valid
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        elif (
            speech is not None
            and (cache is None or cache.length == 0)
            and tokens.shape[1] == speech.mask.shape[1]
        ):
            h = torch.where(speech.mask[..., None], speech.embeds.to(h.dtype), h)
        kw = {"last_only": True} if last_only else {}  # only passed when asked: older LMs lack the flag
        logits = self.lm(
            input_embeds=h, positions=positions, attention_mask=attention_mask, cache=cache, **kw
        )
        if return_speech:  # training with the CTC loss: the adapter outputs (B, S, D) and their counts (B,)
            if sp is None or counts is None:
                raise ValueError("return_speech needs `features` and `feature_lengths`")
            return logits, sp, counts
        return logits

    @torch.no_grad()
    def ctc_greedy(
        self, speech: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy CTC of adapter outputs: CTC logits (B, S, V + 1), labels (B, S), and (B, S) True where a label
        starts (not blank, not the previous frame's label, within the clip's `counts` frames)."""
        logits = self.speech_adapter.ctc_logits(speech, self.lm.tok_embeddings.weight)
        best = logits.argmax(-1)
        blank = logits.shape[-1] - 1
        prev = F.pad(best[:, :-1], (1, 0), value=blank)
        in_row = torch.arange(best.shape[1], device=best.device)[None, :] < counts[:, None]
        return logits, best, (best != blank) & (best != prev) & in_row

    @torch.no_grad()
    def kept_frames(self, speech: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(B, S) True at the frames CTC compression keeps: where a greedy CTC label starts (`ctc_greedy`).

        A row whose frames are all blank keeps its least blank frame, so no clip loses all its speech."""
        logits, _, keep = self.ctc_greedy(speech, counts)
        blank = logits.shape[-1] - 1
        in_row = torch.arange(keep.shape[1], device=keep.device)[None, :] < counts[:, None]
        empty = ~keep.any(1)
        if bool(empty.any()):
            blank_logp = logits.float().log_softmax(-1)[..., blank].masked_fill(~in_row, float("inf"))
            keep[empty, blank_logp[empty].argmin(1)] = True
        return keep

    def ctc_loss(
        self, speech: torch.Tensor, counts: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Summed CTC loss of the adapter outputs against the transcripts' LM tokens (rows of length 0 skipped)."""
        rows = target_lengths > 0
        if not bool(rows.any()):
            return speech.sum() * 0.0
        logits = self.speech_adapter.ctc_logits(speech[rows], self.lm.tok_embeddings.weight)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (S, B, V + 1)
        return F.ctc_loss(
            log_probs,
            targets[rows],
            counts[rows],
            target_lengths[rows],
            blank=logits.shape[-1] - 1,
            reduction="sum",
            zero_infinity=True,
        )


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


@torch.no_grad()
def token_embedding_rms(lm: Transformer) -> float:
    """Root mean square of the LM's input token embeddings (the scale the speech embeddings start at)."""
    return float(lm.tok_embeddings.weight.float().pow(2).mean().sqrt())


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


# ------------------------------------------------------------------------------------- transcription, WER


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


@torch.no_grad()
def transcribe_features(
    model: SpeechLM,
    tok: Tokenizer,
    feats: list[torch.Tensor],
    *,
    prompt: str = ASR_PROMPT,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy transcripts of feature matrices (T, 80), in input order."""
    model.eval()
    device = next(model.parameters()).device
    collator = SpeechCollator(tok, prompt, model.n_slots)
    out: list[str] = []
    for s in range(0, len(feats), batch_size):
        chunk = [{"features": f} for f in feats[s : s + batch_size]]
        x, lengths = collator.features(chunk)
        sp, counts = model.encode_speech(x.to(device), lengths.to(device))
        if model.speech_adapter.cfg.ctc_compress:  # only the kept frames, moved to the front of each row
            keep = model.kept_frames(sp, counts)
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            sp, counts = torch.gather(sp, 1, order[..., None].expand_as(sp)), keep.sum(1)
        prompts, flags = zip(*(collator.prefix(None, int(c)) for c in counts.tolist()), strict=True)
        T = max(len(p) for p in prompts)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
        embeds = torch.zeros(len(prompts), T, sp.shape[-1], device=device)
        for b, f in enumerate(flags):  # `generate` left-pads: row b starts at T - len(prompt)
            start = T - len(f)
            mask[b, start:] = torch.tensor(f, device=device)
            embeds[b, start : start + len(f)][torch.tensor(f, device=device)] = sp[b, : int(counts[b])]
        new = generate(
            model,
            list(prompts),
            max_new_tokens,
            stop_tokens=[tok.eos_id, tok.eot_id],
            pad_id=tok.pad_id,
            model_kwargs={"speech": SpeechContext(embeds, mask)},
        )
        out.extend(" ".join(tok.decode(t).split()) for t in new)
    return out


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


@torch.no_grad()
def ctc_transcripts(
    model: SpeechLM, tok: Tokenizer, feats: list[torch.Tensor], batch_size: int = 64
) -> list[str]:
    """Greedy CTC transcripts of the adapter's CTC head (repeats merged, blanks dropped): the audio side alone."""
    model.eval()
    device = next(model.parameters()).device
    collator = SpeechCollator(tok, ASR_PROMPT, model.n_slots)
    out: list[str] = []
    for s in range(0, len(feats), batch_size):
        x, lengths = collator.features([{"features": f} for f in feats[s : s + batch_size]])
        sp, counts = model.encode_speech(x.to(device), lengths.to(device))
        _, best, starts = model.ctc_greedy(sp, counts)
        out.extend(" ".join(tok.decode(b[k].tolist()).split()) for b, k in zip(best, starts, strict=True))
    return out


@torch.no_grad()
def copy_transcripts(
    lm: Transformer, tok: Tokenizer, texts: list[str], prompt: str = ASR_PROMPT
) -> list[str]:
    """The frozen LM repeating each text given as text (`{text} {prompt}`): the ceiling of the speech path."""
    lm.eval()
    prompts = [[tok.bos_id, *tok.encode(f"{t.strip()} {prompt.rstrip()}")] for t in texts]
    out: list[str] = []
    for s in range(0, len(prompts), 64):
        new = generate(lm, prompts[s : s + 64], 32, stop_tokens=[tok.eos_id, tok.eot_id], pad_id=tok.pad_id)
        out.extend(" ".join(tok.decode(t).split()) for t in new)
    return out


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
