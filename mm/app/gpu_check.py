"""The GPU readiness check: five checks that run on one CUDA GPU as it comes, assert what they measure and write
their figures to a JSON file (`scripts/gpu_check.sh` runs it from a plain checkout; README "On a GPU").

    python -m mm.app.gpu_check OUT [--only NAME ...] [--steps N] [--no-speech] [--cpu]

1. `attention`: FlexAttention (compiled) and varlen document attention against float32 dense SDPA at the 8B
   head shapes, one 4096-token document and a ragged batch; the cross-attention under the fused SDPA kernels
   only (`mm.app.gpu_check_kernels`).
2. `lm_step`: 8B-wide LM layers, vocabulary 128256, 8192 tokens, activation checkpointing, compile off then
   on: the loss falls, step time, MFU, peak memory against `mm plan`, host syncs and recompiles
   (`mm.app.gpu_check_train`).
3. `fsdp`: FSDP2 forced on a one-process group: mixed-precision dtypes, fused AdamW on sharded parameters,
   checkpoint save and resume with equal losses, asynchronous save (`mm.app.gpu_check_train`).
4. `image_memory`: the image stage at the 11B per-sample shape; peak memory follows the micro-batch, not the
   per-process batch (`mm.app.gpu_check_stages`).
5. `stages`: every stage of the demo for a few steps in bf16 (`mm.app.gpu_check_stages`).

Each check runs in its own error handling (a failure is recorded with its traceback and the next check runs);
the JSON file is rewritten after each check, so a run stopped by its time limit keeps what it measured.
Exit status: 0 every check passed (or was skipped, saying why), 1 a check failed, 2 no CUDA device. `--cpu`
runs the same code at tiny shapes on the CPU (the assertions that need CUDA are skipped): what the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

CHECKS = ("attention", "lm_step", "fsdp", "image_memory", "stages")
NO_CUDA_EXIT = 2


@dataclass(frozen=True)
class Sizes:
    """The shapes each check runs at: the real ones on a GPU (`GPU_SIZES`), tiny ones on the CPU (`CPU_SIZES`)."""

    heads: int
    kv_heads: int
    head_dim: int
    attn_seq: int  # one document of this many tokens
    ragged: tuple[int, ...]  # document lengths of the ragged rows (two rows of attn_seq tokens)
    media_tokens: int  # cross-attention keys (4 tiles of 560 px: 4 x 1601)
    lm_preset: str
    lm_overrides: tuple[tuple[str, Any], ...]
    lm_layers: int
    lm_seq: int
    lm_steps: int
    image_config: str  # the image stage's preset (its encoder) for `image_memory`
    image_overrides: tuple[str, ...]
    stage_steps: int


GPU_SIZES = Sizes(
    heads=32, kv_heads=8, head_dim=128, attn_seq=4096, ragged=(1000, 3000, 96, 2048, 1024, 1024),
    media_tokens=4 * 1601, lm_preset="llama3-8b", lm_overrides=(("vocab_size", 128256),), lm_layers=2,
    lm_seq=8192, lm_steps=5, image_config="stages/image_pretrain_11b.yaml", image_overrides=(), stage_steps=10,
)  # fmt: skip
CPU_SIZES = Sizes(
    heads=4, kv_heads=2, head_dim=16, attn_seq=256, ragged=(100, 120, 36, 64, 128, 64),
    media_tokens=96, lm_preset="nano", lm_overrides=(("vocab_size", 512),), lm_layers=2, lm_seq=128,
    lm_steps=5, image_config="stages/image_pretrain_tiny.yaml", image_overrides=(), stage_steps=3,
)  # fmt: skip


@dataclass
class Assertion:
    """One asserted figure: what, whether it held, the measured value and the limit it was held to."""

    what: str
    ok: bool | None  # None: not assertable here (e.g. CUDA memory on the CPU)
    value: Any = None
    limit: Any = None


@dataclass
class CheckResult:
    """A check's outcome: passed | failed | error | skipped, its seconds, figures, assertions, traceback."""

    name: str
    status: str = "pending"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    assertions: list[Assertion] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None

    def expect(self, what: str, ok: bool | None, value: Any = None, limit: Any = None) -> bool:
        """Record an assertion (ok None: not assertable on this machine); returns ok."""
        self.assertions.append(
            Assertion(what, None if ok is None else bool(ok), _plain(value), _plain(limit))
        )
        return bool(ok)

    def figure(self, **kw: Any) -> None:
        """Record measured figures."""
        self.figures.update({k: _plain(v) for k, v in kw.items()})

    def skip(self, reason: str) -> None:
        """Mark the check skipped, saying why."""
        self.status, self.reason = "skipped", reason

    def settle(self) -> None:
        """passed, or failed if an assertion did not hold (error and skipped stay)."""
        if self.status == "pending":
            self.status = "failed" if any(a.ok is False for a in self.assertions) else "passed"


@dataclass
class CheckContext:
    """What every check gets: the device, the output folder, the shapes, and the run's switches."""

    device: torch.device
    out: Path
    sizes: Sizes
    cpu: bool
    speech: bool = True
    steps: int | None = None  # the stages' steps (None: the sizes')

    @property
    def cuda(self) -> bool:
        """Whether the check runs on a CUDA device."""
        return self.device.type == "cuda"


def _plain(v: Any) -> Any:
    """A JSON-friendly value (floats rounded to 6 significant digits, tensors to numbers)."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def machine() -> dict[str, Any]:
    """The machine and versions the figures were measured on."""
    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "espeak_ng": shutil.which("espeak-ng") is not None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the report as JSON atomically (a temporary file, then renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_check(name: str, fn: Callable[[CheckContext, CheckResult], None], ctx: CheckContext) -> CheckResult:
    """Run one check in its own error handling: an exception is recorded with its traceback (and printed)."""
    res = CheckResult(name)
    t0 = time.perf_counter()
    try:
        fn(ctx, res)
    except Exception:
        res.status, res.error = "error", traceback.format_exc()
        print(f"gpu_check: {name} raised:\n{res.error}", file=sys.stderr, flush=True)
    finally:
        res.seconds = round(time.perf_counter() - t0, 2)
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    res.settle()
    return res


def summary_line(res: CheckResult) -> str:
    """One line per check: status, seconds, the assertions that failed (or why it was skipped)."""
    failed = [a for a in res.assertions if a.ok is False]
    held = sum(a.ok is True for a in res.assertions)
    tail = res.reason or "; ".join(f"{a.what}: {a.value} (limit {a.limit})" for a in failed)
    if res.error:
        tail = res.error.strip().splitlines()[-1]
    return f"{res.name:13s} {res.status:8s} {res.seconds:7.1f} s  {held}/{len(res.assertions)} held  {tail}"


def registry() -> dict[str, Callable[[CheckContext, CheckResult], None]]:
    """The checks by name, in the order they run."""
    from mm.app.gpu_check_kernels import check_attention
    from mm.app.gpu_check_stages import check_image_memory, check_stages
    from mm.app.gpu_check_train import check_fsdp, check_lm_step

    return {
        "attention": check_attention,
        "lm_step": check_lm_step,
        "fsdp": check_fsdp,
        "image_memory": check_image_memory,
        "stages": check_stages,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(
        prog="python -m mm.app.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("out", type=Path, help="folder for gpu_check.json and the stages' runs")
    ap.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    ap.add_argument("--steps", type=int, help="steps per demo stage (default 10 on a GPU)")
    ap.add_argument("--no-speech", action="store_true", help="skip the speech stages (no espeak-ng)")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: checks the check itself")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 all passed, 1 a check failed, 2 no CUDA device."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False): run it on a machine with an NVIDIA "
            "GPU (README, 'On a GPU'); --cpu checks the script itself at tiny shapes",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    speech = not args.no_speech and shutil.which("espeak-ng") is not None
    if not speech:
        print("gpu_check: espeak-ng is absent (or --no-speech): the speech stages are skipped", flush=True)
    ctx = CheckContext(
        device=torch.device("cpu") if args.cpu else torch.device("cuda", 0),
        out=args.out,
        sizes=CPU_SIZES if args.cpu else GPU_SIZES,
        cpu=args.cpu,
        speech=speech,
        steps=args.steps,
    )
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    report: dict[str, Any] = {"machine": machine(), "sizes": asdict(ctx.sizes), "checks": {}, "ok": None}
    path = args.out / "gpu_check.json"
    print(f"gpu_check: {report['machine']}", flush=True)
    checks = registry()
    for name in args.only or CHECKS:
        res = run_check(name, checks[name], ctx)
        report["checks"][name] = asdict(res)
        write_report(path, report)
        print(summary_line(res), flush=True)
    ok = all(c["status"] in ("passed", "skipped") for c in report["checks"].values())
    report["ok"] = ok
    write_report(path, report)
    print(f"gpu_check: {'all passed' if ok else 'FAILED'}; figures in {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
