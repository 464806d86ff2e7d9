"""`mm pretrain-lm`: the Llama 3 text pretraining recipe (paper §2) on the one training loop.

Packed sequences with document masking, a weighted mixture of sources, a batch-size / sequence-length ramp by
tokens seen, a long-context stage that switches RoPE scaling, and a final annealing phase on a chosen source
whose final model is the Polyak average of the last K checkpoints. The final LM is exported as a Hugging
Face Llama directory (`OUT/final`) with its tokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm.datasets.text import PackedText, TextSource, heldout_batches, read_documents
from mm.lm import RopeScaling, Tokenizer, Transformer, save_hf
from mm.training import distributed as dist_utils
from mm.training.checkpoint import polyak_average, write_json
from mm.training.config import DataSourceConfig, LMPretrainConfig, config_to_yaml
from mm.training.trainer import Task, Trainer, setup_run

log = logging.getLogger("mm.stages.lm_pretrain")


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (applied from outside the model code)."""
    for block in blocks:
        fwd = block.forward
        block.forward = functools.partial(checkpoint, fwd, use_reentrant=False)  # type: ignore[method-assign]


def _sources(cfgs: list[DataSourceConfig]) -> list[TextSource]:
    return [
        TextSource(paths=list(c.paths), weight=c.weight, name=c.name or f"source{i}", doc_split=c.doc_split)
        for i, c in enumerate(cfgs)
    ]


class LMPretrainTask(Task):
    """Next-token prediction on packed text with document masking."""

    name = "lm-pretrain"

    def __init__(
        self,
        model: nn.Module,
        data: PackedText,
        cfg: LMPretrainConfig,
        heldout: list[TextSource],
        tokenizer: Tokenizer,
    ) -> None:
        self.model, self.data, self.cfg, self.heldout, self.tokenizer = model, data, cfg, heldout, tokenizer
        self.lm_cfg = model.cfg
        self.base_weights = {s.name: s.weight for s in data.sources}
        self._rope: RopeScaling | None = model.cfg.rope_scaling

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

    def next_batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """The next packed batch: tokens, labels, doc_ids (B, T)."""
        return self.data.next_batch(batch_size, seq_len)

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


def build_tokenizer(cfg: LMPretrainConfig, out: Path, sources: list[TextSource], resume: bool) -> Tokenizer:
    """Load the configured tokenizer, or the run's own (on resume), or train one on the training data."""
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


def run_pretrain_lm(cfg: LMPretrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the whole recipe described by `cfg`; returns the summary written to OUT/summary.json."""
    try:  # the model section first: a bad shape is reported before any data is read
        cfg.model.build()
    except ValueError as e:
        raise ValueError(
            f"model (preset={cfg.model.preset!r}, overrides={dict(cfg.model.overrides)}): {e}"
        ) from None
    if not cfg.data:
        raise ValueError("no training data: pass --data PATH ... or set `data` in the config")
    for s in cfg.data + cfg.heldout:
        if not s.paths:
            raise ValueError(f"data source {s.name or '(unnamed)'} lists no paths")
        missing = [p for p in s.paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"data path(s) not found: {', '.join(missing)}")
    names = [s.name for s in cfg.data if s.name]
    if cfg.anneal.steps > 0 and cfg.anneal.source and cfg.anneal.source not in names:
        raise ValueError(f"anneal.source={cfg.anneal.source!r} is not a data source name; allowed: {names}")
    if cfg.anneal.polyak_k > 0 and cfg.anneal.polyak_k > max(1, cfg.anneal.steps or cfg.train.max_steps):
        raise ValueError("anneal.polyak_k must not exceed the number of annealing steps")
    tr = cfg.train
    device = setup_run(tr)
    out = Path(cfg.out)

    sources = _sources(cfg.data)
    tokenizer = build_tokenizer(cfg, out, sources, resume)
    max_seq = max([tr.seq_len] + [st.seq_len for st in tr.ramp])
    extra: dict[str, Any] = {}
    if "vocab_size" not in cfg.model.overrides:
        extra["vocab_size"] = tokenizer.vocab_size
    lm_cfg = cfg.model.build(**extra)
    if lm_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={lm_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids"
        )
    lm_cfg.max_seq_len = max(lm_cfg.max_seq_len, max_seq)
    with torch.device(device):
        model = Transformer(lm_cfg)
    if tr.activation_checkpointing:
        apply_activation_checkpointing(list(model.layers))
    if dist_utils.world_size() > 1:
        dist_utils.apply_fsdp(model, list(model.layers))
    if tr.compile:
        for block in model.layers:
            block.compile()

    data = PackedText(sources, tokenizer, seed=tr.seed)
    task = LMPretrainTask(model, data, cfg, _sources(cfg.heldout), tokenizer)
    trainer = Trainer(
        task,
        tr,
        cfg.optim,
        out,
        anneal_steps=cfg.anneal.steps,
        polyak_k=cfg.anneal.polyak_k,
        config_record={"yaml": config_to_yaml(cfg)},
    )
    if dist_utils.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    summary = trainer.fit(resume=resume)
    summary["data_stats"] = data.stats if hasattr(data, "stats") else {}
    if summary["stopped"] != "max_steps":
        return summary

    if cfg.anneal.polyak_k > 0:
        paths = trainer.polyak_checkpoints()
        avg = polyak_average(paths)
        dist_utils.load_full_state(task, avg)
        summary["polyak_checkpoints"] = [p.name for p in paths]
    summary.update(task.evaluate())
    full = dist_utils.full_state(task)
    if dist_utils.rank() == 0:
        final_model = Transformer(model.cfg)
        final_model.load_state_dict(full, strict=False)
        save_hf(final_model, out / "final")
        tokenizer.save(out / "final")
        summary["final"] = str(out / "final")
        summary["tokenizer_vocab_size"] = tokenizer.vocab_size
        summary["params"] = model.cfg.num_params()
        write_json(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    dist_utils.barrier()
    return summary
