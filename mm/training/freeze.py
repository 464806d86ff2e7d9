"""The freeze policy and its proof: the LM fingerprint (sha256 over every LM tensor in a fixed order) taken at
stage start and end, a check that no LM parameter is in the optimizer, and a guard that adapter checkpoints
never hold LM weights. The video stage fingerprints the frozen image path (image encoder, image cross-attention)
the same way (`fingerprint_tensors`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

LM_PREFIX = "lm."


def fingerprint(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of `module`'s state dict, sorted by name."""
    return fingerprint_tensors(module.state_dict())


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of named tensors, sorted by name (`fingerprint` of a dict).

    Half-precision tensors are hashed as their (exact) float32 values: an LM kept in bf16 on GPUs fingerprints
    as the float32 load of the same bf16 checkpoint."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        if hasattr(t, "full_tensor"):  # FSDP-sharded: hash the whole tensor (a collective)
            t = t.full_tensor()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def freeze(module: nn.Module) -> None:
    """requires_grad False on every parameter, and eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def assert_not_in_optimizer(frozen: nn.Module, optimizer: torch.optim.Optimizer, what: str = "LM") -> None:
    """Raise if any parameter of `frozen` is held by `optimizer`."""
    frozen_ids = {id(p) for p in frozen.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in frozen_ids:
                raise RuntimeError(f"a frozen {what} parameter is in the optimizer")


def assert_no_lm_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Adapter checkpoints never carry LM weights: refuse any `lm.` tensor."""
    bad = sorted(k for k in tensors if k.startswith(LM_PREFIX))
    if bad:
        raise ValueError(
            f"{where} holds LM tensors ({bad[:3]}...); adapter checkpoints must not carry LM weights"
        )


class FrozenLMChanged(RuntimeError):
    """The LM's fingerprint differs from the one recorded."""
