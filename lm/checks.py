"""Input checks on tensors that do not stop a CUDA stream.

`bool(t)`, `.item()`, `.tolist()` and `torch.equal` on a CUDA tensor wait for every queued kernel: inside a
training forward that is one host sync per micro-step. `check_on_host_or_async` keeps the clear error on the CPU
(and on any device that is not CUDA) and on CUDA queues a device-side assertion instead
(`torch._assert_async`): the step goes on without waiting, and a failed check stops the process at a later
kernel launch ("device-side assert triggered"), naming the message in the CUDA error log.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def asserts_on_device(t: torch.Tensor) -> bool:
    """Whether a check on `t` is queued as a device-side assertion rather than read on the host (CUDA)."""
    return t.is_cuda


def check_on_host_or_async(
    cond: torch.Tensor,
    message: str,
    detail: Callable[[], str] | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Raise `error` when the one-element tensor `cond` is false, with `detail()` (a fuller text that may read
    tensor values) or else `message`; on CUDA, a device-side assertion with `message` that does not wait for the
    device (`detail` is not called there)."""
    if cond.numel() != 1:
        raise ValueError(
            f"check_on_host_or_async needs a one-element condition, got shape {tuple(cond.shape)}"
        )
    if torch.compiler.is_compiling():
        return  # inside a compiled decode step (`lm.decode`): its ids are the model's own, the prompt was checked
    if asserts_on_device(cond):
        torch._assert_async(cond.reshape(()), message)
        return
    if not bool(cond):
        raise error(detail() if detail is not None else message)


__all__ = ["asserts_on_device", "check_on_host_or_async"]
