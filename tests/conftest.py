"""Shared test set-up: deterministic, two CPU threads, a small text corpus, and the fault-suite tally.

Fault tests take the `faults` fixture and record what they exercised (`faults.record("corrupt", 7)`) and what
was lost (`faults.lost(n)`, n = runs or checkpoints that lost data, normally 0). Records of a test count once it
passes; losses count at once. `make test` ends with a summary per fault class and the line
`faults: interruptions=N corrupt=N hostile=N configs=N lost=0`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from mm.datasets.text import read_documents
from mm.lm import Tokenizer
from mm.world import synth_text

torch.set_num_threads(2)

FAULT_CLASSES = ("interruptions", "corrupt", "hostile", "configs")


class FaultLog:
    """What one test exercised, per fault class (committed to the session tally when the test passes)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.details: dict[str, Counter[str]] = defaultdict(Counter)

    def record(self, kind: str, n: int = 1, what: str = "") -> None:
        """Count n exercised faults of a class (interruptions, corrupt, hostile, configs)."""
        if kind not in FAULT_CLASSES:
            raise ValueError(f"unknown fault class {kind!r}; allowed: {FAULT_CLASSES}")
        self.counts[kind] += n
        if what:
            self.details[kind][what] += n

    def lost(self, n: int) -> None:
        """Count runs or checkpoints that lost data (counted even if the test then fails)."""
        _SESSION["lost"] += n


_SESSION: dict = {"counts": Counter(), "details": defaultdict(Counter), "lost": 0, "tests": Counter()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small shapes-world text corpus and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    train = synth_text(root, n=1500, seed=0, split="train")
    heldout = synth_text(root, n=120, seed=0, split="heldout")
    tok = Tokenizer.train(read_documents(train, doc_split="line"), 400)
    tok_path = tok.save(root / "tok")
    return {"train": train, "heldout": heldout, "tokenizer": tok_path, "root": root}


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> FaultLog:
    """A per-test fault log (see the module docstring)."""
    log = FaultLog()
    request.node._fault_log = log
    return log


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Commit a passing test's fault records to the session tally."""
    outcome = yield
    report = outcome.get_result()
    log = getattr(item, "_fault_log", None)
    if log is not None and report.when == "call" and report.passed:
        _SESSION["counts"].update(log.counts)
        for kind, c in log.details.items():
            _SESSION["details"][kind].update(c)
            _SESSION["tests"][kind] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault-suite summary: each class with its counts, then the one-line tally."""
    counts = _SESSION["counts"]
    if not counts and not _SESSION["lost"]:
        return
    tr = terminalreporter
    tr.section("fault suite")
    for kind in FAULT_CLASSES:
        parts = ", ".join(f"{what} {n}" for what, n in sorted(_SESSION["details"][kind].items()))
        tr.write_line(f"{kind:>13}: {counts[kind]:4d} in {_SESSION['tests'][kind]} tests ({parts})")
    tally = " ".join(f"{k}={counts[k]}" for k in FAULT_CLASSES)
    tr.write_line(f"faults: {tally} lost={_SESSION['lost']}")


@pytest.fixture(scope="module")
def meta_parallel():
    """Meta's reference code (llama-models) runs with fairscale at model-parallel size 1: a gloo process group
    of one (unless one exists) for the module's tests, torn down after them."""
    import socket

    import torch.distributed as dist

    fs_init = pytest.importorskip("fairscale.nn.model_parallel.initialize")
    started = not dist.is_initialized()
    if started:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    if started:
        dist.destroy_process_group()
