"""The `lm-pretrain` stage (`mm pretrain-lm`): the Llama 3 text pretraining recipe (paper §2).

Packed sequences with document masking, a weighted mixture of sources, a batch-size / sequence-length ramp by
tokens seen, a long-context stage that switches RoPE scaling, and a final annealing phase on a chosen source
whose final model is the Polyak average of the last K checkpoints. The final LM is exported as a Hugging
Face Llama directory (`OUT/final`) with its tokenizer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.datasets.text import PackedText, TextSource, heldout_batches, read_documents
from mm.lm import RopeScaling, Tokenizer, Transformer, save_hf
from mm.training import distributed as dist_utils
from mm.training.checkpoint import polyak_average_into
from mm.training.config import DataSourceConfig, LMPretrainConfig
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.lm_pretrain")


def _sources(cfgs: list[DataSourceConfig]) -> list[TextSource]:
    return [
        TextSource(paths=list(c.paths), weight=c.weight, name=c.name or f"source{i}", doc_split=c.doc_split)
        for i, c in enumerate(cfgs)
    ]


@register(("lm-pretrain",), LMPretrainConfig)
class LMPretrainStage(Stage):
    """Next-token prediction on packed text with document masking; FSDP2 per layer under torchrun."""

    def check(self) -> None:
        """The model section first (a bad shape is reported before any data is read), then the data."""
        cfg = self.cfg
        try:
            cfg.model.build()
        except ValueError as e:
            raise ValueError(
                f"model (preset={cfg.model.preset!r}, overrides={dict(cfg.model.overrides)}): {e}"
            ) from None
        for s in cfg.data + cfg.heldout:
            if not s.paths:
                raise ValueError(f"data source {s.name or '(unnamed)'} lists no paths")
            missing = [p for p in s.paths if not Path(p).exists()]
            if missing:
                raise FileNotFoundError(f"data path(s) not found: {', '.join(missing)}")
        names = [s.name for s in cfg.data if s.name]
        an = cfg.anneal
        if an.steps > 0 and an.source and an.source not in names:
            raise ValueError(f"anneal.source={an.source!r} is not a data source name; allowed: {names}")
        if an.polyak_k > 0 and an.polyak_k > max(1, an.steps or cfg.train.max_steps):
            raise ValueError("anneal.polyak_k must not exceed the number of annealing steps")
        self.anneal_steps, self.polyak_k = an.steps, an.polyak_k

    def build(self, device: torch.device) -> nn.Module:
        """The tokenizer (given, the run's own on resume, or trained on the data) and a fresh Transformer."""
        cfg, tr = self.cfg, self.cfg.train
        self.sources = _sources(cfg.data)
        self.tokenizer = build_tokenizer(cfg, Path(cfg.out), self.sources, self.resume)
        extra: dict[str, Any] = {}
        if "vocab_size" not in cfg.model.overrides:
            extra["vocab_size"] = self.tokenizer.vocab_size
        lm_cfg = cfg.model.build(**extra)
        if lm_cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size={lm_cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids"
            )
        lm_cfg.max_seq_len = max(lm_cfg.max_seq_len, tr.seq_len, *[st.seq_len for st in tr.ramp])
        with torch.device(device):
            self.model = Transformer(lm_cfg)
        self.lm_cfg = lm_cfg
        self._rope: RopeScaling | None = lm_cfg.rope_scaling
        self.heldout = _sources(cfg.heldout)
        return self.model

    def blocks(self) -> list[nn.Module]:
        """The Transformer layers."""
        return list(self.model.layers)

    def parallelize(self) -> None:
        """FSDP2 per layer, then the root (embeddings, norm, output)."""
        dist_utils.apply_fsdp(self.model, list(self.model.layers))

    def open_data(self, rank: int, world: int) -> None:
        """The packed, weighted text stream (each process cuts only its rows of every global batch)."""
        self.data = PackedText(self.sources, self.tokenizer, seed=self.cfg.train.seed)
        self.base_weights = {s.name: s.weight for s in self.data.sources}

    # batch-size / sequence-length ramp (paper §2: 4M tokens at 4096 -> 8M at 8192 -> 16M)
    def _ramp_stage(self, tokens_seen: int) -> Any:
        for st in self.cfg.train.ramp:
            if st.until_tokens <= 0 or tokens_seen < st.until_tokens:
                return st
        return None

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """Global batch and sequence length for this step."""
        st = self._ramp_stage(tokens_seen)
        if st is None:
            return self.cfg.train.batch_size, self.cfg.train.seq_len
        return st.batch_size, st.seq_len

    def on_step(self, step: int, tokens_seen: int) -> None:
        """Switch RoPE scaling when a long-context stage starts; upweight the anneal source at the end."""
        st = self._ramp_stage(tokens_seen)
        if st is not None and st.rope_scaling is not None:
            want = RopeScaling(**asdict(st.rope_scaling))
            if want != self._rope:
                self.model.set_rope_scaling(want, max_seq_len=max(self.model.cfg.max_seq_len, st.seq_len))
                self._rope = want
                log.info("step %d: RoPE scaling switched to %s", step, want)
        an = self.cfg.anneal
        if an.steps > 0 and an.source and step >= self.cfg.train.max_steps - an.steps:
            self.data.set_weights(self._anneal_weights())

    def _anneal_weights(self) -> dict[str, float]:
        an = self.cfg.anneal
        others = sum(w for n, w in self.base_weights.items() if n != an.source)
        weights = {}
        for n, w in self.base_weights.items():
            if n == an.source:
                weights[n] = an.source_weight
            else:
                weights[n] = (1 - an.source_weight) * (w / others) if others > 0 else 0.0
        return weights

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's rows of the next packed batch: tokens, labels, doc_ids (rows, T)."""
        return self.data.next_batch(rows * self.world, seq_len, self.rank, self.world)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over label tokens, and their count."""
        logits = self.model(batch["tokens"], doc_ids=batch["doc_ids"])
        labels = batch["labels"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss, (labels != -100).sum()

    def data_state(self) -> dict[str, Any]:
        """Position in the packed stream."""
        return self.data.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the packed stream."""
        if state:
            self.data.load_state_dict(state)

    def data_stats(self) -> dict[str, Any]:
        """Documents drawn per source."""
        return dict(self.data.stats)

    def flops_per_token(self, seq_len: int) -> float:
        """6N + 12 L d T."""
        return float(self.lm_cfg.flops_per_token(seq_len))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and perplexity over the whole held-out split (or `train.eval_batches` batches)."""
        if not self.heldout:
            return {}
        was_training = self.model.training
        self.model.eval()
        nll, n = 0.0, 0
        seq = self.cfg.train.seq_len
        bs = max(1, self.cfg.train.batch_size)
        for i, b in enumerate(heldout_batches(self.heldout, self.tokenizer, seq, bs)):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            dev = next(self.model.parameters()).device
            b = {k: v.to(dev) for k, v in b.items()}
            loss, cnt = self.loss(b)
            nll += float(loss)
            n += int(cnt)
        self.model.train(was_training)
        if n == 0:
            return {}
        return {"heldout_loss": nll / n, "heldout_ppl": math.exp(nll / n), "heldout_tokens": float(n)}

    def finish(self, trainer: Any, summary: dict[str, Any]) -> None:
        """The Polyak average of the annealing checkpoints becomes the final model (when asked for)."""
        if self.polyak_k > 0:
            paths = trainer.polyak_checkpoints()
            polyak_average_into(self.checkpoint_state(), paths)  # shard by shard, each checkpoint read once
            summary["polyak_checkpoints"] = [p.name for p in paths]

    def final_evaluation(self) -> dict[str, Any]:
        """Held-out loss and perplexity of the final model, its size and the tokenizer's."""
        return {
            **self.evaluate(),
            "params": self.lm_cfg.num_params(),
            "tokenizer_vocab_size": self.tokenizer.vocab_size,
            "data_stats": dict(self.data.stats),
        }

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """An HF Llama directory with the tokenizer."""
        full = dist_utils.full_state(self)
        if self.rank == 0:
            model = Transformer(self.lm_cfg)
            model.load_state_dict(full, strict=False)
            save_hf(model, final)
            self.tokenizer.save(final)

    def bundle_meta(self) -> dict[str, Any]:
        """Nothing beyond the HF directory (the summary records the size)."""
        return {}


def build_tokenizer(cfg: LMPretrainConfig, out: Path, sources: list[TextSource], resume: bool) -> Tokenizer:
    """Load the configured tokenizer, or the run's own (a resumed run), or train one on the training data."""
    if cfg.tokenizer.path:
        return Tokenizer.from_file(cfg.tokenizer.path)
    own = out / "tokenizer.json"
    if own.is_file() and resume:
        return Tokenizer.from_file(own)
    if dist_utils.rank() == 0:
        texts = (doc for s in sources for p in s.paths for doc in read_documents(p, doc_split=s.doc_split))
        tok = Tokenizer.train(texts, cfg.tokenizer.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        log.info("trained a %d-token BPE tokenizer on the training data -> %s", tok.vocab_size, own)
    dist_utils.barrier()
    return Tokenizer.from_file(own)
