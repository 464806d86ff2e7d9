"""The loop's services: the learning-rate schedule and AdamW groups, device, autocast and compute dtype, the
run's start (threads, process group, seed), the MFU denominator (a matmul in the compute dtype), and
`metrics.jsonl` + TensorBoard.

Numerics on CPU: float32 by default (`autocast: auto` means bf16 autocast on CUDA only). bf16 autocast on
CPU is allowed (`autocast: bf16`) but is slower than float32 on CPUs without bf16 matrix units and makes
CPU runs harder to compare with the float32 references, hence not the default.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.training import distributed as dist_utils
from mm.training.config import OptimConfig, TrainConfig

log = logging.getLogger("mm.training.services")


def lr_at(step: int, optim: OptimConfig, max_steps: int, anneal_steps: int = 0) -> float:
    """Learning rate of optimizer step `step` (0-based): warmup, cosine to the floor, linear anneal to 0."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    warm = max(0, optim.warmup_steps)
    decay_end = max(warm, max_steps - anneal_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if step < decay_end:
        span = max(1, decay_end - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / span))
    start = floor if decay_end > warm else peak
    return start * max(0.0, 1 - (step - decay_end + 1) / max(1, anneal_steps))


def param_groups(
    params: list[tuple[str, nn.Parameter]], optim: OptimConfig, apart: set[int] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; `optim.lr_mult` scales the LR of parameters whose name
    contains a given substring (first match wins), e.g. {"gate": 10} for the cross-attention gates. The
    parameters whose ids are in `apart` never share a group with the others: FSDP2 shards the others and leaves
    these whole (`ParallelPlan.whole_parameters`), and AdamW's foreach and fused kernels take a group's tensors
    as one list, which cannot mix DTensors and plain tensors."""
    apart = apart or set()
    groups: dict[tuple[bool, float, bool], list[nn.Parameter]] = {}
    for name, p in params:
        mult = next((m for pat, m in optim.lr_mult.items() if pat in name), 1.0)
        groups.setdefault((p.dim() >= 2, float(mult), id(p) in apart), []).append(p)
    out = [
        {"params": ps, "weight_decay": optim.weight_decay if decay else 0.0, "lr_mult": mult}
        for (decay, mult, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1], kv[0][2]))
    ]
    for g in out:
        if len({hasattr(p, "device_mesh") for p in g["params"]}) > 1:
            raise ValueError(
                "an AdamW group mixes sharded (DTensor) and whole parameters: list the modules FSDP2 leaves "
                "whole in the stage's ParallelPlan.replicated"
            )
    return out


def resolve_device(name: str) -> torch.device:
    """`auto` -> this process's CUDA device if there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_utils.local_rank())
        return torch.device("cpu")
    return torch.device(name)


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the matrix products run in under `train.autocast` (auto = bf16 on CUDA, float32 on CPU)."""
    if setting == "auto":
        setting = "bf16" if device.type == "cuda" else "none"
    if setting == "bf16":
        return torch.bfloat16
    if setting == "none":
        return torch.float32
    raise ValueError(f"train.autocast={setting!r}; allowed: auto, bf16, none")


def autocast_context(setting: str, device: torch.device) -> Any:
    """The autocast context for `train.autocast` (auto = bf16 on CUDA, none on CPU)."""
    if compute_dtype(setting, device) == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


_PEAK_CACHE: dict[tuple[str, str, int, int], float] = {}  # (device, dtype, n, CPU threads)

# Dense (no sparsity) peak FLOP/s of the GPUs mm knows, from their data sheets, by a part of the name
# `torch.cuda.get_device_name` gives (first match wins): (bf16/fp16, tf32, fp32 without tensor cores).
CHIP_PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100 NVL", (835e12, 418e12, 60e12)),
    ("H100", (989.4e12, 494.7e12, 66.9e12)),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", (989.4e12, 494.7e12, 66.9e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
)


def chip_peak_flops(name: str, dtype: torch.dtype, tf32: bool = False) -> float:
    """The data-sheet dense peak FLOP/s of the GPU called `name` in `dtype` (float32 with `tf32`: the TF32
    tensor-core peak); 0.0 for a chip not in `CHIP_PEAKS`."""
    for part, (half, tf, single) in CHIP_PEAKS:
        if part in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf if tf32 else single
    return 0.0


def mfu_denominator(device: torch.device, dtype: torch.dtype) -> float:
    """MFU's denominator: on a GPU of `CHIP_PEAKS`, its data-sheet peak in `dtype` (as torchtitan reports MFU);
    elsewhere (the CPU, another GPU) a timed matmul (`measure_peak_flops`)."""
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        peak = chip_peak_flops(torch.cuda.get_device_name(device), dtype, tf32)
        if peak:
            return peak
    return measure_peak_flops(device, dtype)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 0) -> float:
    """FLOP/s of a large square `dtype` matmul on this device (the denominator of MFU: pass the dtype the
    model computes in, `compute_dtype`). n = 0: 8192 on CUDA (smaller products do not reach the tensor
    cores' peak), 1024 on CPU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    key = (str(device), str(dtype), n, torch.get_num_threads() if device.type == "cpu" else 0)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    _PEAK_CACHE[key] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _PEAK_CACHE[key]


class MetricsWriter:
    """`metrics.jsonl` (one record per optimizer step) and TensorBoard scalars; rank 0 only."""

    def __init__(self, out: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop records past the step we resume from (they will be recomputed)
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_step + 1)
        except Exception as e:  # TensorBoard is optional at run time; metrics.jsonl is not
            log.warning("TensorBoard disabled: %s", e)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def set_seed(seed: int) -> None:
    """Seed torch (CPU and CUDA) for reproducible runs."""
    torch.manual_seed(seed)


def enable_tf32(device: torch.device) -> bool:
    """On CUDA, float32 matmuls and convolutions (the parts that stay float32 under bf16 autocast, or a whole
    float32 run) use the TF32 tensor cores, as the torch default leaves them off; True if set."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def setup_run(train: TrainConfig) -> torch.device:
    """Threads, process group (under torchrun), device (TF32 on CUDA) and seed: the common start of a stage."""
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    dist_utils.init_distributed()
    device = resolve_device(train.device)
    enable_tf32(device)
    set_seed(train.seed)
    return device
