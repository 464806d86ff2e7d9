"""Typed run configurations: dataclasses read from YAML with command-line `key=value` overrides (OmegaConf).

Every run is described by one `RunConfig`-style dataclass; an unknown key or a value of the wrong type is an
error naming the key and what is allowed, raised before any data is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mm.lm.config import LMConfig, RopeScaling, preset

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the typed config."""


@dataclass
class ModelConfig:
    """The LM: a preset name plus field overrides (any `LMConfig` field)."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, **extra: Any) -> LMConfig:
        """The `LMConfig` this section describes."""
        allowed = {f.name for f in dataclasses.fields(LMConfig)}
        unknown = sorted(set(self.overrides) - allowed)
        if unknown:
            raise ConfigError(f"model.overrides: unknown keys {unknown}; allowed: {sorted(allowed)}")
        kw = {**self.overrides, **extra}
        if isinstance(kw.get("rope_scaling"), dict):
            kw["rope_scaling"] = RopeScaling(**kw["rope_scaling"])
        return preset(self.preset, **kw)


@dataclass
class DataSourceConfig:
    """One text source of the pretraining mixture."""

    paths: list[str] = field(default_factory=list)
    weight: float = 1.0
    name: str = ""
    doc_split: str = "paragraph"  # paragraph (blank-line separated) | line


@dataclass
class TokenizerConfig:
    """Tokenizer file to load, or (path null) train a byte-level BPE on the training data."""

    path: str | None = None
    vocab_size: int = 2048


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (linear warmup, cosine to a floor, optional final decay to 0)."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.01  # cosine floor = lr * min_lr_ratio (paper: peak / 100)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    lr_mult: dict[str, float] = field(default_factory=dict)  # name substring -> LR multiplier


@dataclass
class RampStageConfig:
    """A batch-size / sequence-length stage, active until `until_tokens` tokens were seen (0 = to the end)."""

    until_tokens: int = 0
    batch_size: int = 8
    seq_len: int = 256
    rope_scaling: RopeScaling | None = None  # set to switch RoPE scaling (a long-context stage)


@dataclass
class AnnealConfig:
    """Final annealing: LR to 0 linearly over `steps`, the named source upweighted, Polyak average at the end."""

    steps: int = 0
    source: str | None = None
    source_weight: float = 1.0  # the named source's share of rows (tokens) while annealing (1.0 = only it)
    polyak_k: int = 0  # average of the last K checkpoints (saved evenly during the anneal) is the final model


@dataclass
class TrainConfig:
    """The loop: steps, batch, accumulation, checkpoints, numerics."""

    max_steps: int = 1000
    batch_size: int = 8  # global batch, in sequences, per optimizer step (before any ramp)
    micro_batch_size: int = 0  # per process and micro-step; 0 = whole per-process batch in one micro-step
    seq_len: int = 256
    ramp: list[RampStageConfig] = field(default_factory=list)
    save_every: int = 200
    keep_last: int = 3
    async_checkpoint: bool = False  # write checkpoints in a background thread (torch.distributed.checkpoint)
    log_every: int = 1
    eval_every: int = 0  # 0 = evaluate only at the end
    eval_batches: int = 0  # 0 = the whole held-out split
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | none
    compile: bool = False
    activation_checkpointing: bool = False
    loss_chunk: int = 0  # LM cross-entropy per this many tokens (lm/loss.py, no whole logits); 0 = at once
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    peak_flops: float = 0.0  # for MFU; 0 = measure a matmul at start


@dataclass
class LoaderConfig:
    """LM pretraining's DataLoader (`mm.datasets.loader.LoaderOptions`): worker processes (0 = read in the
    training process), batches prefetched per worker, pinned host memory, worker start method."""

    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True
    start_method: str = ""  # "" = the platform's default (fork on Linux); spawn | forkserver


@dataclass
class StageConfig:
    """The keys every stage's config has (each stage's config extends it): the stage it runs, the file that
    defines a stage outside `mm` (imported before the stage is looked up), the optimizer, the loop, the output
    folder."""

    stage: str = ""
    stage_file: str = ""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/stage"


@dataclass
class LMPretrainConfig(StageConfig):
    """`mm pretrain-lm` (`mm train` with `stage: lm-pretrain`): the Llama 3 text pretraining recipe."""

    stage: str = "lm-pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: list[DataSourceConfig] = field(default_factory=list)
    heldout: list[DataSourceConfig] = field(default_factory=list)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    out: str = "runs/lm"


def _allowed_keys(cls: type, dotted: str) -> list[str]:
    """Field names allowed at `dotted` (a path of nested dataclass fields) under `cls`."""
    cur: Any = cls
    for part in [p for p in dotted.split(".") if p][:-1]:
        if not dataclasses.is_dataclass(cur):
            return []
        f = {f.name: f for f in dataclasses.fields(cur)}.get(part)
        if f is None:
            return []
        cur = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.type  # type: ignore[misc]
        if isinstance(cur, list):
            return []
        cur = type(cur) if dataclasses.is_dataclass(cur) and not isinstance(cur, type) else cur
    return sorted(f.name for f in dataclasses.fields(cur)) if dataclasses.is_dataclass(cur) else []


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `cls` from a YAML file and `key=value` overrides; errors name the key and the allowed values."""
    base = OmegaConf.structured(cls)
    layers = []
    where = "defaults"
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            where = str(p)
            loaded = OmegaConf.load(p)
            if loaded is None:
                loaded = OmegaConf.create({})
            layers.append(loaded)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            where = "command-line overrides" if path is None else f"{path} + command-line overrides"
            layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = getattr(e, "full_key", "") or ""
        allowed = _allowed_keys(cls, key)
        hint = f"; allowed keys there: {allowed}" if allowed else ""
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: bad value for {key!r}: {msg}") from None


def config_to_yaml(cfg: Any) -> str:
    """The YAML text of a config dataclass (saved beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
