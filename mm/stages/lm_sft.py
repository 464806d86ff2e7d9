"""The `lm-sft` stage: supervised fine-tuning of the whole LM on chat dialogues (Llama 3 paper §4.1), turning
the pretrained LM into the instruct LM.

It starts from an HF Llama directory (`init_from`, e.g. runs/demo/lm-pretrain/final, whose tokenizer.json is the
tokenizer) and trains every parameter on text dialogues in the Llama 3 chat format (`data.train`: chat JSONL
manifests, loss on the assistant's tokens and their `<|eot_id|>` only), mixed with plain corpus documents
(`data.text`, a share `data.text_fraction` of the rows, loss on every token) so the LM keeps its text ability.
Rows are padded per batch, not packed (`mm.stages.lm_sft_data`). The loss is the summed cross-entropy over the
label tokens, divided by their count over the whole step by the trainer, as in every stage.

Evaluation: the held-out plain corpus perplexity (`data.heldout_text`) of the pretrained LM (measured once the
weights are loaded, before any step) and of the fine-tuned LM, and their ratio `ppl_ratio`; the greedy-answer
exact-match accuracy on held-out text-QA dialogues (`data.heldout_chat`), with a few examples. The final folder
is an HF Llama directory (config.json, model.safetensors, tokenizer.json, read by `mm generate` and
`mm.lm.load_hf`) plus `stage.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader
from mm.datasets.packing import heldout_batches
from mm.datasets.text import DOC_SPLITS, TextSource
from mm.formats.hf_llama import load_hf
from mm.lm import Tokenizer, Transformer
from mm.lm.io import write_json
from mm.stages.lm_pretrain import LMPretrainStage
from mm.stages.lm_sft_data import CollateRows, SFTRows, answer_questions, text_fraction
from mm.training.config import StageConfig
from mm.training.stage import lm_shape, register

log = logging.getLogger("mm.stages.lm_sft")


@dataclass
class LMSFTDataConfig:
    """Chat dialogues, the plain corpus mixed in, and the held-out splits."""

    train: list[str] = field(default_factory=list)  # chat JSONL manifests of text dialogues
    text: list[str] = field(default_factory=list)  # plain corpus files or folders (documents per doc_split)
    text_fraction: float = 0.25  # share of the rows that are plain documents
    doc_split: str = "line"  # how the plain files split into documents: line | paragraph
    heldout_text: list[str] = field(default_factory=list)  # held-out plain corpus: perplexity
    heldout_chat: list[str] = field(default_factory=list)  # held-out text-QA dialogues: exact match
    max_len: int = 256  # longest row in tokens (longer conversations are skipped, documents cut)
    max_bad_fraction: float = 0.05
    num_workers: int = 0  # DataLoader workers (0 = rows made in the training process)
    prefetch_factor: int = 2
    pin_memory: bool = True


@dataclass
class LMSFTConfig(StageConfig):
    """`mm train` with `stage: lm-sft`."""

    stage: str = "lm-sft"
    init_from: str = ""  # HF Llama directory of the pretrained LM (its tokenizer.json is the tokenizer)
    data: LMSFTDataConfig = field(default_factory=LMSFTDataConfig)
    eval_samples: int = 200  # held-out dialogues answered per `heldout_chat` manifest (0 = none)
    curve_samples: int = 0  # held-out dialogues answered every train.eval_every steps (learning curve)
    max_new_tokens: int = 16  # longest greedy answer
    out: str = "runs/lm-sft"


@register(("lm-sft",), LMSFTConfig)
class LMSFTStage(LMPretrainStage):
    """Full fine-tune of an HF Llama LM on chat rows mixed with plain rows; FSDP2 per layer under torchrun.
    Its final folder is an LM like lm-pretrain's (`load_final`, `mm generate`)."""

    reader = "generate"

    def check(self) -> None:
        """The LM directory, the data files and the mixture, before anything is read."""
        cfg, d = self.cfg, self.cfg.data
        self.require("init_from", "the pretrained LM's HF Llama directory (e.g. runs/demo/lm-pretrain/final)")
        init = Path(cfg.init_from)
        if not self.ctx.shapes_only:
            for name in ("config.json", "tokenizer.json"):
                if not (init / name).is_file():
                    raise FileNotFoundError(f"init_from={cfg.init_from}: no {name} (an HF Llama directory)")
            keys = ("train", "text", "heldout_text", "heldout_chat")
            for key, p in [(k, p) for k in keys for p in getattr(d, k)]:
                if not Path(p).exists():
                    raise FileNotFoundError(f"data.{key}: {p} does not exist")
        text_fraction(d.text_fraction)
        if d.text_fraction > 0 and not d.text:
            raise ValueError(f"data.text_fraction={d.text_fraction} needs plain corpus files in `data.text`")
        if d.doc_split not in DOC_SPLITS:
            raise ValueError(f"data.doc_split={d.doc_split!r}; allowed: {', '.join(DOC_SPLITS)}")
        longest = lm_shape(cfg.init_from).max_seq_len
        for key, n in (("data.max_len", d.max_len), ("train.seq_len", cfg.train.seq_len)):
            if not 2 <= n <= longest:
                raise ValueError(f"{key}={n}; must be in [2, {longest}] (the LM's max_seq_len)")
        if d.heldout_chat and cfg.eval_samples and cfg.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens={cfg.max_new_tokens}; must be >= 1 to answer `data.heldout_chat`"
            )

    def build(self, device: torch.device) -> nn.Module:
        """The pretrained LM (read lazily on the meta device, every parameter trainable in float32) and its
        tokenizer."""
        cfg = self.cfg
        if self.ctx.shapes_only:  # `mm plan`: the LM's shape only
            with torch.device("meta"):
                self.model = Transformer(lm_shape(cfg.init_from))
        else:
            self.init_path = Path(cfg.init_from).resolve()
            self.model = load_hf(self.init_path, device=device, dtype=torch.float32)
            self.tokenizer = Tokenizer.from_file(self.init_path)
            if self.tokenizer.vocab_size > self.model.cfg.vocab_size:
                raise ValueError(
                    f"{self.init_path}: tokenizer has {self.tokenizer.vocab_size} ids, the LM "
                    f"{self.model.cfg.vocab_size}"
                )
        self.lm_cfg = self.model.cfg
        texts = list(cfg.data.heldout_text)
        self.heldout = [TextSource(texts, doc_split=cfg.data.doc_split)] if texts else []
        self.pretrained_eval: dict[str, float] = {}
        return self.model

    def materialized(self) -> None:
        """The pretrained LM's held-out perplexity, measured before any step (a resumed run loads its checkpoint
        later, so this is always the pretrained LM)."""
        self.pretrained_eval = self.evaluate()

    def meta_init(self) -> bool:
        """Built on the meta device, the weights read after sharding (each process its part)."""
        return True

    def record(self) -> dict[str, Any]:
        """Where the pretrained LM lives."""
        return {"init_from": str(getattr(self, "init_path", self.cfg.init_from))}

    def open_data(self, rank: int, world: int) -> None:
        """The mixed chat and plain rows, by position (each process reads its rows of every global batch)."""
        cfg, d = self.cfg, self.cfg.data
        self.rows = SFTRows(
            d.train,
            d.text if d.text_fraction > 0 else [],
            self.tokenizer,
            fraction=d.text_fraction,
            seed=cfg.train.seed,
            max_len=d.max_len,
            doc_split=d.doc_split,
            max_bad_fraction=d.max_bad_fraction,
        )
        reader = SampleReader(self.rows, rank, world, CollateRows(self.tokenizer))
        self.stream = ResumableLoader(reader, LoaderOptions.from_config(d))

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """The global batch; the rows decide the length."""
        return self.cfg.train.batch_size, 0

    def on_step(self, step: int, tokens_seen: int) -> None:
        """Nothing changes during the run."""

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's rows of the next global batch: tokens, labels, attention_mask (right-padded)."""
        return self.stream.next(rows)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over the label tokens (the assistant's in chat rows, all in plain
        rows), and their count. Rows are right-padded: causal attention keeps the pads out of real tokens.
        Packed held-out batches carry document ids."""
        labels = batch["labels"]
        chunk = self.cfg.train.loss_chunk
        loss = self.model(batch["tokens"], doc_ids=batch.get("doc_ids"), labels=labels, loss_chunk=chunk)
        return loss, (labels != -100).sum()

    def data_stats(self) -> dict[str, Any]:
        """Rows read per kind and the conversations skipped (this process's share)."""
        return self.stream.stats() if self.stream is not None else {}

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity (lm-pretrain's), and the text-QA accuracy on the first `curve_samples` dialogues
        of the first `data.heldout_chat` manifest."""
        out = super().evaluate()
        cfg = self.cfg
        if cfg.curve_samples and cfg.data.heldout_chat:
            qa = answer_questions(
                self.model,
                self.tokenizer,
                cfg.data.heldout_chat[0],
                limit=cfg.curve_samples,
                max_new_tokens=cfg.max_new_tokens,
            )
            out["text_qa_accuracy"] = qa["exact_match"]
        return out

    def _heldout_batches(self, seq_len: int, batch_size: int) -> Any:
        """One pass over the held-out plain documents, packed as in pretraining."""
        return heldout_batches(self.heldout, self.tokenizer, seq_len, batch_size)

    def final_evaluation(self) -> dict[str, Any]:
        """Held-out perplexity of the pretrained and of the fine-tuned LM and their ratio; text-QA exact match."""
        cfg = self.cfg
        out: dict[str, Any] = dict(self.evaluate())
        if self.pretrained_eval and "heldout_ppl" in out:
            before = self.pretrained_eval["heldout_ppl"]
            out.update(pretrained_heldout_ppl=before, ppl_ratio=out["heldout_ppl"] / before)
            log.info("held-out perplexity %.4f -> %.4f (x%.3f)", before, out["heldout_ppl"], out["ppl_ratio"])
        if cfg.eval_samples and cfg.data.heldout_chat:
            out["eval"] = {
                Path(m).stem: answer_questions(
                    self.model, self.tokenizer, m, limit=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens
                )
                for m in cfg.data.heldout_chat
            }
            first = next(iter(out["eval"].values()))
            out["text_qa_accuracy"] = first["exact_match"]
        out["params"] = self.lm_cfg.num_params()
        return out

    def bundle_meta(self) -> dict[str, Any]:
        """The LM it started from."""
        return {"init_from": str(self.init_path)}

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """An HF Llama directory with the tokenizer (lm-pretrain's export), and `stage.json`."""
        super().export(final, meta)
        if self.rank == 0:
            write_json({**meta, "reader": self.reader}, final / "stage.json")


__all__ = ["LMSFTConfig", "LMSFTDataConfig", "LMSFTStage"]
