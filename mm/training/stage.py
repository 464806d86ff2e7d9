"""What a training stage supplies; `mm.training.runner.run` does everything else, the same way for every stage.

A `Stage[C]` is generic over its typed config `C` (a `StageConfig`: the keys every stage has, extended with
the stage's own). The runner constructs it with the config and a `StageContext` (process rank and count, device,
resume, the dtype a frozen LM may keep, the FSDP2 mixed-precision policy); nothing is set on it afterwards.
It says what it builds (`build`), which parameters train (`trainable`) and which parts must not move
(`frozen`: fingerprinted at start and end, none of their parameters may reach the optimizer), where its
batches come from (`open_data` sets `self.stream`, `next_batch`: this process's rows only), its loss (`loss`:
a sum and the count it is normalised by), how it is parallelised (`parallel_plan`: a declared `ParallelPlan`
that the runner applies and `mm plan` reads), its evaluation (`evaluate` during training every
`train.eval_every` steps, `final_evaluation` at the end) and its export (`export`, the final folder).

Stage classes register themselves by the `stage:` names they run (`register`), so `mm train --config CFG`
runs any stage's config; a stage defined outside `mm` is imported from the file its config's `stage_file:`
names (`import_stage_file`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from mm.lm import Transformer, load_hf
from mm.lm.config import LMConfig
from mm.training import distributed as dist_utils
from mm.training.config import StageConfig
from mm.training.parallelize import ParallelPlan, frozen_lm_dtype

C = TypeVar("C", bound=StageConfig)


@dataclass(frozen=True)
class StageContext:
    """What the runner gives a stage at construction: this process's rank of `world`, the device the model runs
    on, whether the run resumes, the dtype a frozen LM may be kept in (bf16 for bf16 compute on CUDA,
    `mm.training.parallelize.frozen_dtype`), FSDP2's mixed-precision policy (None: parameters keep their
    dtype, as on the CPU), and whether only the model's shapes are wanted (`mm plan`: a frozen LM may then be
    named by an LM preset, and no weight file or tokenizer is read)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume: bool = False
    frozen_dtype: torch.dtype = torch.float32
    mp_policy: Any = None
    shapes_only: bool = False  # `mm plan`: shapes on the meta device; no weights, tokenizer or data read


class Stage(Generic[C]):
    """One training stage. Subclasses fill in `build`, `open_data`, `next_batch`, `loss` and `export`."""

    names: ClassVar[tuple[str, ...]] = ()  # the `stage:` values this class runs
    reader: ClassVar[str] = ""  # the `mm` command that reads this stage's final folder ("": none)
    config_class: type[C]
    model: nn.Module
    stream: Any = None  # the training data loader (`open_data` sets it): position, skip counts, workers

    def __init__(self, cfg: C, ctx: StageContext | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or StageContext()
        self.name: str = cfg.stage
        self.rank, self.world, self.device = self.ctx.rank, self.ctx.world, self.ctx.device
        self.anneal_steps, self.polyak_k = 0, 0  # the final LR decay to 0 and its Polyak average

    # ---- before anything is read --------------------------------------------------------------------
    def check_common(self) -> None:
        """The stage name fits the class, and there is training data (every stage; before `check`)."""
        if self.name not in self.names:
            raise ValueError(f"stage={self.name!r}; {type(self).__name__} runs {list(self.names)}")
        data = self.cfg.data
        if not (data if isinstance(data, list) else data.train):
            key = "data" if isinstance(data, list) else "data.train"
            raise ValueError(f"no training data: pass --data PATH ... or set `{key}` in the config")

    def require(self, key: str, what: str) -> None:
        """Refuse an empty required config key, saying what it must name."""
        if not getattr(self.cfg, key):
            raise ValueError(f"`{key}` must name {what}")

    def heldout(self) -> list[str]:
        """The held-out manifests evaluated at the end (none when `eval_samples` is 0)."""
        data = self.cfg.data
        return list(data.heldout) if getattr(self.cfg, "eval_samples", 0) and hasattr(data, "heldout") else []

    def check(self) -> None:
        """Refuse impossible configurations, naming the key and what is allowed (reads no weights or data)."""

    # ---- the model ----------------------------------------------------------------------------------
    def meta_init(self) -> bool:
        """Whether `build` may run on the meta device with its initialisation recorded and replayed after
        sharding (`mm.training.materialize`): it reads no tensor value and loads big weights lazily."""
        return True

    def build(self, device: torch.device) -> nn.Module:
        """Build (or load) the model on `device`, set `self.model` and return it. With `meta_init` the runner
        passes the meta device and records what gives each tensor its value; frozen weights are loaded lazily
        (`load_hf(..., device=device, dtype=self.ctx.frozen_dtype)`) and read after sharding, each process its part."""
        raise NotImplementedError

    def frozen_lm(self, path: str | Path, device: torch.device) -> Transformer:
        """The frozen LM at `path`, an HF Llama directory (read lazily on the meta device, kept in the context's
        frozen dtype where stored in it); for shapes only, its config.json's shape or an LM preset's."""
        if not str(path):
            raise ValueError("`lm` must name the frozen LM directory (e.g. runs/demo/lm-pretrain/final)")
        if self.ctx.shapes_only:
            with torch.device("meta"):
                return Transformer(lm_shape(str(path)))
        path = Path(path).resolve()
        return load_hf(path, device=device, dtype=frozen_lm_dtype(path, self.ctx.frozen_dtype))

    def materialized(self) -> None:
        """After a meta-built model received its values (steps of building that read them, e.g. a scale taken
        from the frozen LM's embeddings)."""

    def check_frozen(self, fingerprints: dict[str, str]) -> None:
        """Refuse frozen parts other than those the stage builds on, given their fingerprints (after
        materialisation, before training)."""

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs handed to the optimizer; every other parameter stays as it is."""
        return list(self.model.named_parameters())

    def frozen(self) -> dict[str, nn.Module | Mapping[str, torch.Tensor]]:
        """Parts that must not move (name -> module or tensors), fingerprinted at start and end."""
        return {}

    def parallel_plan(self) -> ParallelPlan:
        """How the built model is parallelised (`mm.training.parallelize.ParallelPlan`), applied by the runner
        and read by `mm plan`. By default nothing is checkpointed and the model is replicated (the trainer
        all-reduces the gradients)."""
        return ParallelPlan(self.model)

    def record(self) -> dict[str, Any]:
        """What a checkpoint records about the run besides the frozen fingerprints (checked on `--resume`)."""
        return {}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint holds: the trainable parameters, and the persistent buffers of the modules
        that train (e.g. batch-norm running statistics), so a resumed run evaluates as an uninterrupted one."""
        state = {n: p.detach() for n, p in self.trainable()}
        trained = {id(p) for _, p in self.trainable()}
        for prefix, module in self.model.named_modules():
            own = list(module.parameters(recurse=False))
            if not own or not all(id(p) in trained for p in own):
                continue
            skip = getattr(module, "_non_persistent_buffers_set", set())
            for name, buf in module.named_buffers(recurse=False):
                if name not in skip:
                    state[f"{prefix}.{name}" if prefix else name] = buf.detach()
        return state

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put checkpoint tensors (parameters and buffers) back into the model."""
        known = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for k, v in tensors.items():
                if k not in known:
                    raise KeyError(f"checkpoint tensor {k!r} is not a tensor of the {self.name} model")
                known[k].copy_(v)

    # ---- data ---------------------------------------------------------------------------------------
    def open_data(self, rank: int, world: int) -> None:
        """Open the training data; process `rank` of `world` reads only its share."""
        raise NotImplementedError

    def batch_shape(self, step: int, tokens_seen: int) -> tuple[int, int]:
        """(global batch size, sequence length) of this step (0 = the rows decide the length)."""
        return self.cfg.train.batch_size, 0

    def next_batch(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        """This process's next `rows` rows of the global batch (on the CPU)."""
        raise NotImplementedError

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss tokens of a batch before the forward: the loss sum is divided by their global count."""
        return int((batch["labels"] != -100).sum())

    def batch_tokens(self, batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> int:
        """Tokens this process handled in a batch (for tokens/s): the text tokens when there are any."""
        return int(batch["tokens"].numel()) if "tokens" in batch else batch_size * max(1, seq_len)

    def data_state(self) -> dict[str, Any]:
        """JSON position of the data stream (where the run's next step starts)."""
        return self.stream.state_dict() if self.stream is not None else {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue the data stream from a saved position."""
        if state and self.stream is not None:
            self.stream.load_state_dict(state)

    def data_stats(self) -> dict[str, Any]:
        """Skipped samples per reason (this process's share)."""
        return self.stream.stats() if self.stream is not None else {}

    def close_data(self) -> None:
        """Stop the data workers of the training stream."""
        if self.stream is not None:
            self.stream.close()

    def on_step(self, step: int, tokens_seen: int) -> None:
        """Called before each optimizer step (e.g. a data mixture or RoPE switch)."""

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (0 = unknown: no MFU)."""
        return 0.0

    # ---- the loss -----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over the batch's loss tokens, their number)."""
        raise NotImplementedError

    # ---- evaluation and export ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out figures during training (`train.eval_every`); every process calls it (under FSDP2 each
        process must run the same forwards), under `train.autocast` like the training forwards."""
        return {}

    def final_evaluation(self) -> dict[str, Any]:
        """Held-out figures of the final model, merged into the summary; every process calls it."""
        return {}

    def finish(self, trainer: Any, summary: dict[str, Any]) -> None:
        """After the last step, before the final evaluation (e.g. a Polyak average of checkpoints)."""

    def bundle_meta(self) -> dict[str, Any]:
        """How to rebuild the model from the final folder (written beside the weights)."""
        return {}

    def export(self, final: Path, meta: dict[str, Any]) -> None:
        """Write the final folder (every process calls it: gathering is collective; rank 0 writes)."""
        raise NotImplementedError

    @classmethod
    def load_final(cls, path: Path) -> Any:
        """The trained model of a final folder this stage wrote, as its `reader` command uses it."""
        raise NotImplementedError(f"no mm command reads the final folder of {cls.__name__} ({path})")

    def gathered(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unsharded copies of (possibly FSDP-sharded) tensors; a collective."""
        return dist_utils.full_tensors(tensors)


def lm_shape(lm: str) -> LMConfig:
    """An LM's shape: an HF Llama directory's config.json, or (shapes only, e.g. for planning) an LM preset."""
    import json

    from mm.formats.hf_llama import config_from_hf
    from mm.lm.config import PRESETS, preset

    if not lm:
        raise ValueError("`lm` must name the frozen LM: an HF Llama directory, or an LM preset for planning")
    file = Path(lm) / "config.json"
    if file.is_file():
        return config_from_hf(json.loads(file.read_text()), source=str(file))
    if lm in PRESETS:
        return preset(lm)
    raise FileNotFoundError(
        f"lm={lm!r}: no {file}, and not an LM preset name (mm plan reads one of {sorted(PRESETS)})"
    )


STAGES: dict[str, type[Stage[Any]]] = {}


def register(names: tuple[str, ...], config_class: type[StageConfig]) -> Any:
    """Class decorator: `mm train` runs configs (of `config_class`) whose `stage:` is one of `names` with it."""

    def add(cls: type[Stage[Any]]) -> type[Stage[Any]]:
        cls.names, cls.config_class = tuple(names), config_class
        for name in names:
            STAGES[name] = cls
        return cls

    return add


def import_stage_file(path: str | Path) -> None:
    """Import a Python file that defines (and `register`s) stages outside `mm` (a config's `stage_file:`)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"stage_file={str(path)!r}: no such file")
    name = f"mm_stage_file_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"stage_file={str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a file that failed to import is imported again next time, not skipped
        raise


def stage_readers() -> dict[str, str]:
    """The `mm` command that reads each stage's final folder (`Stage.reader`), by stage name, in registration
    order."""
    import mm.stages  # noqa: F401  (registers every stage)

    return {name: cls.reader for name, cls in STAGES.items() if cls.reader}


def reader_stage(command: str) -> type[Stage[Any]]:
    """The stage class whose final folders `mm <command>` reads."""
    for name, reader in stage_readers().items():
        if reader == command:
            return STAGES[name]
    raise ValueError(f"no stage's final folder is read by mm {command}")


def stage_class(name: str) -> type[Stage[Any]]:
    """The stage class that runs `stage: name`."""
    import mm.stages  # noqa: F401  (registers every stage)

    if name not in STAGES:
        raise ValueError(f"stage={name!r} is not a stage; available: {sorted(STAGES)}")
    return STAGES[name]
