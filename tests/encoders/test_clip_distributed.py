"""CLIP loss across processes: two gloo processes on CPU, each holding part of a global batch, give the
one-process summed loss and (after the trainer's scaling and gradient averaging) the one-process gradients.

The workers run in processes started by `torch.multiprocessing.spawn`, which find them by module name: pytest
imports this file under a generated name (importlib mode), so the test puts this folder on `sys.path` and
spawns the workers of a plain `import test_clip_distributed`.
"""

from __future__ import annotations

import importlib
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mm.encoders.clip import clip_loss, gather_rows, same_caption

WORLD = 2
FEATURES, EMBED = 6, 5


class TinyPair(nn.Module):
    """Linear image and text 'towers' over fixed features and CLIP's learnable log inverse temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(FEATURES, EMBED)
        self.text = nn.Linear(FEATURES, EMBED)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def loss(
        self,
        image_x: torch.Tensor,
        text_x: torch.Tensor,
        positives: torch.Tensor | None,
        gather: bool,
    ) -> torch.Tensor:
        """Summed CLIP loss of this call's pairs."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        return clip_loss(
            F.normalize(self.image(image_x), dim=-1),
            F.normalize(self.text(text_x), dim=-1),
            scale,
            positives,
            reduction="sum",
            gather=gather,
        )


def make_case(seed: int, captions: list[list[int]]) -> dict[str, torch.Tensor]:
    """Features of len(captions) pairs; pairs with the same caption share their text features."""
    g = torch.Generator().manual_seed(seed)
    n, length = len(captions), max(len(c) for c in captions)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    text_by_caption = {tuple(c): torch.randn(FEATURES, generator=g) for c in captions}
    return {
        "image_x": torch.randn(n, FEATURES, generator=g),
        "text_x": torch.stack([text_by_caption[tuple(c)] for c in captions]),
        "ids": ids,
        "mask": mask,
    }


def check_case(
    rank: int,
    seed: int,
    captions: list[list[int]],
    rows: list[int],
    multi: bool,
    extra: tuple[int, int] | None = None,
) -> None:
    """One process: the reference (whole batch, one process) against this process's share (`rows[rank]`);
    `extra` = (image, text) also marked as a match (one way only: positives need not be symmetric)."""
    case = make_case(seed, captions)
    n = len(captions)
    torch.manual_seed(seed)
    model = TinyPair()
    # one process, the whole batch: summed loss / pairs, as the trainer normalises
    pos = same_caption(case["ids"], case["mask"]) if multi else None
    if extra is not None:
        pos[extra] = True
    want = model.loss(case["image_x"], case["text_x"], pos, gather=False)
    (want / n).backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # this process's rows; captions padded only to this process's longest, as a batcher would
    lo, hi = sum(rows[:rank]), sum(rows[: rank + 1])
    local_mask = case["mask"][lo:hi]
    width = int(local_mask.sum(1).max())
    local_ids, local_mask = case["ids"][lo:hi, :width], local_mask[:, :width]
    assert torch.equal(gather_rows(case["image_x"][lo:hi]), case["image_x"])
    pos = None
    if multi:
        pos = same_caption(local_ids, local_mask, gather=True)
        assert torch.equal(pos, same_caption(case["ids"], case["mask"]))
        if extra is not None:
            pos[extra] = True
    got = model.loss(case["image_x"][lo:hi], case["text_x"][lo:hi], pos, gather=True)
    # the trainer: backward of loss * world / global pairs, then gradients averaged over processes
    (got * WORLD / n).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    total = got.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, want.detach())
    for p, g in zip(model.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def worker(rank: int) -> None:
    """A gloo process running every case (MASTER_ADDR / MASTER_PORT come from the parent's environment)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        distinct = [[1 + i, 9] for i in range(8)]
        check_case(rank, seed=1, captions=distinct, rows=[4, 4], multi=False)
        # duplicate captions within and across processes, captions of different lengths
        dup = [[3, 9], [4, 4, 9], [3, 9], [5, 9], [4, 4, 9], [6, 7, 8, 9], [3, 9], [2, 9]]
        check_case(rank, seed=2, captions=dup, rows=[4, 4], multi=True)
        # processes holding different numbers of rows
        check_case(rank, seed=3, captions=dup[:7], rows=[3, 4], multi=True)
        # a match marked one way, from an image of process 0 to a text of process 1
        check_case(rank, seed=4, captions=dup, rows=[4, 4], multi=True, extra=(1, 6))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_loss_and_gradients(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    workers = importlib.import_module("test_clip_distributed")
    ctx = mp.spawn(workers.worker, nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed
            assert time.monotonic() < deadline, "the CLIP workers did not finish in 120 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
