"""The `lm-pretrain` stage (`mm pretrain-lm`): the Llama 3 text pretraining recipe (paper §2).

Packed sequences with document masking, a weighted mixture of sources, a batch-size / sequence-length ramp by
tokens seen, a long-context stage that switches RoPE scaling, and a final annealing phase on a chosen source
whose final model is the Polyak average of the last K checkpoints. The final LM is exported as a Hugging
Face Llama directory (`OUT/final`) with its tokenizer.

Data: each source is a folder written by `mm data tokenize` (memory-mapped token shards, the way to train on real
corpora) or text files tokenized in memory at start (small corpora such as the demo's). Rows are packed by
position (`mm.datasets.tokens`), so each process reads only its rows of every global batch, straight from the
memory map, and the data state in a checkpoint (rows taken, each source's offset) does not depend on the number
of processes. Presets of real size need a tokenizer (`tokenizer.path`; the Llama 3 presets use Meta's
`tokenizer.model`): training a BPE of 32k ids or more is refused in a multi-process run.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.datasets.loader import LoaderOptions, ResumableLoader
from mm.datasets.packing import heldout_batches
from mm.datasets.text import TextSource, read_documents
from mm.datasets.token_folders import check_tokenizer, is_token_folder, read_index
from mm.datasets.tokens import TokenCorpus, TokenReader, heldout_token_batches
from mm.formats.hf_llama import load_hf, save_hf
from mm.lm import RopeScaling, Tokenizer, Transformer
from mm.training import distributed as dist_utils
from mm.training.checkpoint import polyak_average_into
from mm.training.config import DataSourceConfig, LMPretrainConfig
from mm.training.parallelize import ParallelPlan
from mm.training.services import autocast_context
from mm.training.stage import Stage, register

log = logging.getLogger("mm.stages.lm_pretrain")

# A BPE of this many ids or more is not trained inside a multi-process run (rank 0 would train it on the whole
# corpus while the others wait at a barrier, past NCCL's timeout): train it beforehand or name a tokenizer.
MAX_BPE_IN_RUN = 32_000
# Models of at least this many parameters are "of real size": they must name their tokenizer.
REAL_SIZE_PARAMS = 100_000_000


def _sources(cfgs: list[DataSourceConfig]) -> list[TextSource]:
    return [
        TextSource(paths=list(c.paths), weight=c.weight, name=c.name or f"source{i}", doc_split=c.doc_split)
        for i, c in enumerate(cfgs)
    ]


@register(("lm-pretrain",), LMPretrainConfig)
class LMPretrainStage(Stage[LMPretrainConfig]):
    """Next-token prediction on packed text with document masking; FSDP2 per layer under torchrun."""

    reader = "generate"

    @classmethod
    def load_final(cls, path: Path) -> tuple[Transformer, Tokenizer]:
        """The LM of a final folder (an HF Llama directory) and its tokenizer."""
        return load_hf(path), Tokenizer.from_file(path)

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
            tokenized(s)  # refuses a source mixing tokenized folders and text files
        check_tokenizer_config(cfg)
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
        if self.ctx.shapes_only:  # `mm plan`: the vocabulary from the config, no tokenizer or data read
            extra = {} if "vocab_size" in cfg.model.overrides else {"vocab_size": cfg.tokenizer.vocab_size}
            with torch.device("meta"):
                self.model = Transformer(cfg.model.build(**extra))
            return self.model
        self.sources = _sources(cfg.data)
        self.tokenizer = build_tokenizer(cfg, Path(cfg.out), self.sources, self.ctx.resume)
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

    def parallel_plan(self) -> ParallelPlan:
        """Activation checkpointing and compile of each layer, then FSDP2 per layer and the root (embeddings,
        norm, output), in torchtitan's order."""
        layers = list(self.model.layers)
        return ParallelPlan(self.model, blocks=layers, fsdp_units=layers)

    def open_data(self, rank: int, world: int) -> None:
        """The packed, weighted row stream (each process reads only its rows of every global batch)."""
        self.corpora = open_corpora(self.cfg.data, self.tokenizer)
        self.base_weights = {s.name or f"source{i}": s.weight for i, s in enumerate(self.cfg.data)}
        self.weights: tuple[float, ...] | None = None  # None: the configured weights
        self.reader = TokenReader(
            self.corpora,
            list(self.base_weights.values()),
            seed=self.cfg.train.seed,
            rank=rank,
            world=world,
        )
        # DataLoader workers when the config has a `loader` section (num_workers, ...); else in-process
        self.stream = ResumableLoader(
            self.reader, LoaderOptions.from_config(getattr(self.cfg, "loader", None))
        )

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
            anneal = self._anneal_weights()
            self.weights = tuple(float(anneal[n]) for n in self.base_weights)

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
        return self.stream.next((rows * self.world, seq_len, self.weights))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over label tokens, and their count."""
        labels = batch["labels"]
        chunk = self.cfg.train.loss_chunk
        loss = self.model(batch["tokens"], doc_ids=batch["doc_ids"], labels=labels, loss_chunk=chunk)
        return loss, (labels != -100).sum()

    def data_state(self) -> dict[str, Any]:
        """The packing position: global rows taken, each source's offset (the same on every process)."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the packed stream at a saved position (nothing before it is read)."""
        if state:
            self.stream.load_state_dict(state)

    def data_stats(self) -> dict[str, Any]:
        """Rows and tokens this process read (per source), and the run's position per source."""
        return {**self.stream.stats(), **self.reader.progress(self.stream.state_dict())}

    def flops_per_token(self, seq_len: int) -> float:
        """6N + 12 L d T."""
        return float(self.lm_cfg.flops_per_token(seq_len))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and perplexity over the whole held-out split (or `train.eval_batches` batches of
        `train.batch_size` rows): each process its rows of every batch, in micro-batches of
        `train.micro_batch_size` rows under `train.autocast`; the sums are added over processes."""
        if not self.heldout:
            return {}
        tr = self.cfg.train
        was_training = self.model.training
        self.model.eval()
        dev = self.device
        autocast = autocast_context(tr.autocast, dev)
        nll, n = 0.0, 0
        for i, b in enumerate(self._heldout_batches(tr.seq_len, max(1, tr.batch_size))):
            if tr.eval_batches and i >= tr.eval_batches:
                break
            for mb in self._eval_micro_batches(b):
                with autocast:
                    loss, cnt = self.loss({k: v.to(dev) for k, v in mb.items()})
                nll += float(loss)
                n += int(cnt)
        self.model.train(was_training)
        nll, n = (
            float(x)
            for x in dist_utils.all_reduce_sum(torch.tensor([nll, n], dtype=torch.float64, device=dev))
        )
        if n == 0:
            return {}
        return {"heldout_loss": nll / n, "heldout_ppl": math.exp(nll / n), "heldout_tokens": n}

    def _heldout_batches(self, seq_len: int, batch_size: int) -> Any:
        """One pass over the held-out documents: tokenized folders read from their shards, text tokenized."""
        if self.heldout and all(tokenized(s) for s in self.cfg.heldout):
            corpora = open_corpora(self.cfg.heldout, self.tokenizer)
            return heldout_token_batches(corpora, seq_len, batch_size, self.tokenizer.eos_id)
        return heldout_batches(self.heldout, self.tokenizer, seq_len, batch_size)

    def _eval_micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """This process's rows of a held-out batch in micro-batches; every process gets the same number (the
        forwards of a sharded model are collective), a process short of rows fills in rows without labels."""
        rows = batch["tokens"].shape[0]
        per = -(-rows // self.world)
        mine = {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}
        mb = self.cfg.train.micro_batch_size or per
        out = []
        for s in range(0, per, mb):
            part = {k: v[s : s + mb] for k, v in mine.items()}
            if part["tokens"].shape[0] == 0:  # nothing left here: a row that counts for nothing
                part = {k: v[:1].clone() for k, v in batch.items()}
                part["labels"].fill_(-100)
            out.append(part)
        return out

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
            "data_stats": self.data_stats(),
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
    """Load the configured tokenizer, or the one tokenized data was made with, or the run's own (a resumed run),
    or train one on the training data."""
    if cfg.tokenizer.path:
        return Tokenizer.from_file(cfg.tokenizer.path)
    folders = [Path(p) for s in cfg.data if tokenized(s) for p in s.paths]
    if folders:
        saved = read_index(folders[0])["tokenizer"].get("file")
        if not saved or not (folders[0] / saved).is_file():
            raise ValueError(
                f"tokenizer.path is unset and {folders[0]} holds no copy of its tokenizer: set it"
            )
        return Tokenizer.from_file(folders[0] / saved)
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


def tokenized(source: DataSourceConfig) -> bool:
    """True if every path of a source is a `mm data tokenize` folder, False if none is (text files)."""
    flags = [is_token_folder(p) for p in source.paths]
    if any(flags) and not all(flags):
        raise ValueError(
            f"data source {source.name or source.paths[0]!r} mixes tokenized folders and text files; give each "
            "its own source"
        )
    return bool(flags) and all(flags)


def open_corpora(sources: list[DataSourceConfig], tokenizer: Tokenizer) -> list[TokenCorpus]:
    """Each source's documents: memory-mapped token folders (checked against the tokenizer), or text tokenized
    in memory (every process tokenizes the whole source: for small corpora; use `mm data tokenize` otherwise)."""
    corpora = []
    for i, s in enumerate(sources):
        name = s.name or f"source{i}"
        if tokenized(s):
            for p in s.paths:
                check_tokenizer(p, tokenizer)
            corpora.append(TokenCorpus.open(s.paths, name))
            continue
        size = sum(
            f.stat().st_size
            for p in s.paths
            for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*"))
            if f.is_file()
        )
        if size > 256 * 2**20:
            log.warning(
                "data source %s: %.1f GB of text tokenized in memory by every process; `mm data tokenize` it "
                "once and train on the folder instead",
                name,
                size / 2**30,
            )
        source = TextSource(paths=list(s.paths), weight=s.weight, name=name, doc_split=s.doc_split)
        corpora.append(TokenCorpus.from_text(source, tokenizer))
    return corpora


def check_tokenizer_config(cfg: LMPretrainConfig) -> None:
    """A named tokenizer must exist; presets of real size must name one; no large BPE is trained in a
    multi-process run (each refusal names the key)."""
    tok = cfg.tokenizer
    if tok.path:
        if not Path(tok.path).exists():
            raise FileNotFoundError(
                f"tokenizer.path={tok.path} does not exist: give a tokenizer.json, a tiktoken tokenizer.model "
                "(the Llama 3 presets use Meta's Llama 3 tokenizer.model, e.g. original/tokenizer.model of "
                "meta-llama/Meta-Llama-3-8B) or a folder holding one"
            )
        return
    if cfg.data and all(tokenized(s) for s in cfg.data):
        return  # the tokenizer the folders were made with
    params = cfg.model.build().num_params()
    if params >= REAL_SIZE_PARAMS:
        raise ValueError(
            f"tokenizer.path is unset for model.preset={cfg.model.preset!r} ({params / 1e9:.1f}B parameters): a "
            "model of real size trains with a given tokenizer (the Llama 3 presets: Meta's Llama 3 "
            "tokenizer.model); set tokenizer.path=PATH"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and tok.vocab_size >= MAX_BPE_IN_RUN:
        raise ValueError(
            f"tokenizer.vocab_size={tok.vocab_size} with tokenizer.path unset would train a BPE of "
            f"{tok.vocab_size} ids on the whole corpus inside this {world}-process run (the other processes "
            f"wait at a barrier meanwhile); below {MAX_BPE_IN_RUN} ids it is allowed. Train it beforehand "
            "(`mm tokenizer train`) and set tokenizer.path"
        )
