"""The speech LM (Llama 3 paper §7.6): a frozen LM whose input embeddings take the speech adapter's outputs
between `<|speech_start|>` and `<|speech_end|>` (no cross-attention); transcription with it (greedy, batched;
`translate_features`: the same decoding with the speech translation prompt; `transcribe_long`: recordings of any
length cut on silence and transcribed piecewise, in order), the CTC head's transcripts alone, and the frozen LM
copying a text (the ceiling of the speech path).

`SpeechLM(lm, encoder, adapter)`: trains `encoder` and `adapter`, never `lm`. A row is
`<bos> <|speech_start|> [speech slots] <|speech_end|> prompt text <eos>` (`mm.datasets.audio.SpeechCollator`);
the slots' token embeddings are replaced by the adapter outputs, one per 80 ms of audio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.speech import SpeechAdapter
from mm.datasets.audio import SAMPLE_RATE, AudioFeatures, SpeechCollator
from mm.datasets.long_audio import split_on_silence
from mm.datasets.skips import BadSample
from mm.encoders.speech import SpeechEncoder
from mm.lm import Tokenizer, Transformer, generate
from mm.lm.checks import check_on_host_or_async
from mm.lm.vocab import NUM_TIKTOKEN_SPECIAL_TOKENS, SPECIAL_TOKENS
from mm.prompts import AST_PROMPT, DIALOGUE_PROMPT

log = logging.getLogger(__name__)


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
        self.boundary_ids: tuple[int, int] | None = None  # (`<|speech_start|>`, `<|speech_end|>`) ids

    def set_layout_boundary_ids(self) -> None:
        """Boundary ids for a model without a tokenizer (`mm plan`'s shapes): where a Llama 3 tiktoken vocabulary
        of the LM's size keeps `<|speech_start|>` / `<|speech_end|>` (its last 256 ids are the special tokens)."""
        base = max(0, self.lm.cfg.vocab_size - NUM_TIKTOKEN_SPECIAL_TOKENS)
        ids = [base + SPECIAL_TOKENS.index(t) for t in ("<|speech_start|>", "<|speech_end|>")]
        self.set_boundary_ids(*(min(i, self.lm.cfg.vocab_size - 1) for i in ids))

    def set_boundary_ids(self, start: int, end: int) -> None:
        """The token ids whose input vectors the adapter learns (`SpeechAdapterConfig.learn_boundaries`)."""
        self.boundary_ids = (int(start), int(end))

    def speech_inputs(self, speech: torch.Tensor) -> torch.Tensor:
        """What the LM reads for adapter outputs (B, S, D): the outputs, moved `ctc_embeddings` of the way to
        their CTC-posterior-weighted token embeddings (blank left out); the outputs as they are when 0."""
        a = self.speech_adapter.cfg.ctc_embeddings
        if not a:
            return speech
        table = self.lm.tok_embeddings.weight
        probs = self.speech_adapter.ctc_logits(speech, table)[..., :-1].float().softmax(-1)
        soft = (probs @ table.float()).to(speech.dtype)
        return speech + a * (soft - speech)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The LM's token embeddings, with the adapter's learned vectors at `<|speech_start|>` and `<|speech_end|>`
        when it learns them."""
        h = self.lm.embed(tokens)
        if self.speech_adapter.boundary is None:
            return h
        if self.boundary_ids is None:
            raise ValueError("the adapter learns boundary vectors: call set_boundary_ids(start, end) first")
        b = self.speech_adapter.boundaries().to(h.dtype)
        for k, token in enumerate(self.boundary_ids):
            h = torch.where((tokens == token)[..., None], b[k], h)
        return h

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
        """Put row b's first counts[b] speech vectors, in order, at the True positions of slots[b]. No host sync:
        the slot counts are checked on the device on CUDA, and each slot gathers its vector (no boolean index)."""
        if slots.shape[1] != embeds.shape[1] or counts.shape[0] != embeds.shape[0]:
            raise ValueError(
                f"speech slots {tuple(slots.shape)} and counts {tuple(counts.shape)} do not match the embeddings "
                f"{tuple(embeds.shape)} (expected ({embeds.shape[0]}, {embeds.shape[1]}) and ({embeds.shape[0]},))"
            )
        per_row = slots.sum(1)
        check_on_host_or_async(
            (per_row == counts).all(),
            "speech slots per row != speech embeddings per row",
            lambda: f"speech slots per row {per_row.tolist()} != speech embeddings {counts.tolist()}",
        )
        if speech.shape[1] == 0:  # no speech vector anywhere (so no slot either)
            return embeds.clone()
        rank = slot_rank(slots, speech.shape[1])  # (B, T): which of its row's vectors a slot takes
        picked = speech.gather(1, rank[..., None].expand(-1, -1, speech.shape[2]))
        return torch.where(slots[..., None], picked.to(embeds.dtype), embeds)

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
        labels: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) (or (B, 1, V) of the last position with `last_only`; with `labels` (B, T) the LM's
        summed cross-entropy instead, `loss_chunk` tokens at a time). Training: `features`, `feature_lengths`,
        `speech_mask`. Generation: a precomputed `speech` context, spliced on the forward over the whole prompt
        (the first one, cache empty; its mask must have the tokens' shape, else ValueError) and ignored on the
        later one-token forwards."""
        h = self.embed(tokens)
        sp = counts = None
        if features is not None:
            sp, counts = self.encode_speech(features, feature_lengths)
            h = self.splice(h, speech_mask, self.speech_inputs(sp), counts)
            if self.speech_adapter.cfg.ctc_compress:  # hide the blank/repeat frames, close the position gaps
                valid = ~speech_mask  # a text position, or a slot whose frame is kept
                if sp.shape[1]:
                    keep = self.kept_frames(sp, counts)
                    valid = valid | keep.gather(1, slot_rank(speech_mask, sp.shape[1]))
                attention_mask = valid if attention_mask is None else attention_mask & valid
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        elif speech is not None and (
            cache is None or (not cache.static and cache.length == 0)
        ):  # the forward over the whole prompt
            if tuple(speech.mask.shape) != tuple(tokens.shape):
                raise ValueError(
                    f"speech context mask has shape {tuple(speech.mask.shape)} (length {speech.mask.shape[-1]}) "
                    f"but the tokens have shape {tuple(tokens.shape)} (length {tokens.shape[-1]}); expected the "
                    "same (batch, length): the context must cover the whole prompt of the first forward"
                )
            h = torch.where(speech.mask[..., None], speech.embeds.to(h.dtype), h)
        # each flag only when asked: older LMs lack `last_only`
        kw: dict[str, Any] = {"last_only": True} if last_only else {}
        if labels is not None:
            kw.update(labels=labels, loss_chunk=loss_chunk)
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

        A row whose frames are all blank keeps its least blank frame, so no clip loses all its speech. Branch-free
        (no host sync): every row's least blank frame is found, and added where the row keeps nothing else."""
        logits, _, keep = self.ctc_greedy(speech, counts)
        blank = logits.shape[-1] - 1
        frames = torch.arange(keep.shape[1], device=keep.device)
        in_row = frames[None, :] < counts[:, None]
        empty = ~keep.any(1)  # (B,)
        blank_logp = logits.float().log_softmax(-1)[..., blank].masked_fill(~in_row, float("inf"))
        least = frames[None, :] == blank_logp.argmin(1)[:, None]  # (B, S) (F.one_hot reads the ids' range)
        return keep | (least & empty[:, None])

    def ctc_loss(
        self, speech: torch.Tensor, counts: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Summed CTC loss of the adapter outputs against the transcripts' LM tokens (rows of length 0 count 0).
        Branch-free (no host sync): every row's loss is computed and those without a transcript are masked out."""
        rows = target_lengths > 0
        logits = self.speech_adapter.ctc_logits(speech, self.lm.tok_embeddings.weight)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (S, B, V + 1)
        per_row = F.ctc_loss(
            log_probs,
            targets,
            counts,
            target_lengths,
            blank=logits.shape[-1] - 1,
            reduction="none",
            zero_infinity=True,
        )
        return torch.where(rows, per_row, 0.0).sum()


def slot_rank(slots: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) bool slots -> (B, T) index of each slot among its row's slots (0 elsewhere), at most n - 1."""
    return (slots.long().cumsum(1) - 1).clamp(0, n - 1)


@torch.no_grad()
def token_embedding_rms(lm: Transformer) -> float:
    """Root mean square of the LM's input token embeddings (the scale the speech embeddings start at)."""
    return float(lm.tok_embeddings.weight.float().pow(2).mean().sqrt())


@torch.no_grad()
def transcribe_features(
    model: SpeechLM,
    tok: Tokenizer,
    feats: list[torch.Tensor],
    *,
    prompt: str,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    contexts: Sequence[str] | None = None,
) -> list[str]:
    """Greedy transcripts of feature matrices (T, 80), in input order (with `contexts`, clip i's row has
    `contexts[i]` as text before the speech: `SpeechCollator.prefix`)."""
    if contexts is not None and len(contexts) != len(feats):
        raise ValueError(f"{len(contexts)} contexts for {len(feats)} clips")
    model.eval()
    device = next(model.parameters()).device
    collator = SpeechCollator(tok, prompt, model.n_slots)
    out: list[str] = []
    for s in range(0, len(feats), batch_size):
        ctx = (
            list(contexts[s : s + batch_size])
            if contexts is not None
            else [""] * len(feats[s : s + batch_size])
        )
        chunk = [{"features": f} for f in feats[s : s + batch_size]]
        x, lengths = collator.features(chunk)
        sp, counts = model.encode_speech(x.to(device), lengths.to(device))
        if model.speech_adapter.cfg.ctc_compress:  # only the kept frames, moved to the front of each row
            keep = model.kept_frames(sp, counts)
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            sp, counts = torch.gather(sp, 1, order[..., None].expand_as(sp)), keep.sum(1)
        sp = model.speech_inputs(sp)
        rows = (collator.prefix(None, int(c), x) for c, x in zip(counts.tolist(), ctx, strict=True))
        prompts, flags = zip(*rows, strict=True)
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


def translate_features(
    model: SpeechLM,
    tok: Tokenizer,
    feats: list[torch.Tensor],
    *,
    prompt: str = AST_PROMPT,
    batch_size: int = 64,
    max_new_tokens: int = 48,
) -> list[str]:
    """Greedy translations of feature matrices (T, 80), in input order: `transcribe_features`'s decoding with the
    speech translation prompt (the row `<bos> <|speech_start|> [speech] <|speech_end|> {prompt}`)."""
    return transcribe_features(
        model, tok, feats, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens
    )


def answer_features(
    model: SpeechLM,
    tok: Tokenizer,
    feats: list[torch.Tensor],
    contexts: Sequence[str],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers to spoken questions (feature matrices (T, 80)), in input order: no prompt (spoken
    dialogue), clip i after `contexts[i]`, the conversation so far (e.g. a scene: "a large red circle.")."""
    return transcribe_features(
        model,
        tok,
        feats,
        prompt=DIALOGUE_PROMPT,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        contexts=contexts,
    )


@torch.no_grad()
def transcribe_long(
    model: SpeechLM,
    tok: Tokenizer,
    waves: list[torch.Tensor],
    features: AudioFeatures,
    *,
    prompt: str,
    every_pause: bool = True,
    split_short: bool = False,
    min_silence_s: float = 0.3,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> list[str]:
    """Transcripts of 16 kHz waveforms of any length, in input order: a recording longer than
    `features.max_seconds` (or any, with `split_short`) is cut on silence into pieces no longer than that
    (`split_on_silence`; with `every_pause` at every pause too, one sentence a piece as the stage trains), the
    pieces are transcribed together and each recording's texts joined in order. A recording within the window is
    transcribed whole, as `transcribe_features` does. A piece too short or too quiet for `features` is left out
    (logged)."""
    feats: list[torch.Tensor] = []
    owner: list[int] = []
    window = int(features.max_seconds * SAMPLE_RATE)
    for i, wave in enumerate(waves):
        if wave.numel() <= window and not split_short:
            pieces = [(0, wave.numel())]
        else:
            pieces = split_on_silence(
                wave, SAMPLE_RATE, features.max_seconds, min_silence_s, every_pause=every_pause
            )
        for a, b in pieces:
            try:
                feats.append(features(wave[a:b]))
            except BadSample as e:
                log.info(
                    "transcribe_long: recording %d, piece %.2f-%.2f s left out (%s)",
                    i,
                    a / SAMPLE_RATE,
                    b / SAMPLE_RATE,
                    e,
                )
                continue
            owner.append(i)
    texts = transcribe_features(
        model, tok, feats, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    out: list[list[str]] = [[] for _ in waves]
    for i, text in zip(owner, texts, strict=True):
        if text:
            out[i].append(text)
    return [" ".join(t) for t in out]


@torch.no_grad()
def ctc_transcripts(
    model: SpeechLM, tok: Tokenizer, feats: list[torch.Tensor], batch_size: int = 64
) -> list[str]:
    """Greedy CTC transcripts of the adapter's CTC head (repeats merged, blanks dropped): the audio side alone."""
    model.eval()
    device = next(model.parameters()).device
    collator = SpeechCollator(tok, "", model.n_slots)  # features only: no prompt
    out: list[str] = []
    for s in range(0, len(feats), batch_size):
        x, lengths = collator.features([{"features": f} for f in feats[s : s + batch_size]])
        sp, counts = model.encode_speech(x.to(device), lengths.to(device))
        _, best, starts = model.ctc_greedy(sp, counts)
        out.extend(" ".join(tok.decode(b[k].tolist()).split()) for b, k in zip(best, starts, strict=True))
    return out


@torch.no_grad()
def copy_transcripts(lm: Transformer, tok: Tokenizer, texts: list[str], prompt: str) -> list[str]:
    """The frozen LM repeating each text given as text (`{text} {prompt}`): the ceiling of the speech path."""
    lm.eval()
    prompts = [[tok.bos_id, *tok.encode(f"{t.strip()} {prompt.rstrip()}")] for t in texts]
    out: list[str] = []
    for s in range(0, len(prompts), 64):
        new = generate(lm, prompts[s : s + 64], 32, stop_tokens=[tok.eos_id, tok.eot_id], pad_id=tok.pad_id)
        out.extend(" ".join(tok.decode(t).split()) for t in new)
    return out
