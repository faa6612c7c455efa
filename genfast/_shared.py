"""Helpers that the references (``genfast/reference``) and the Triton kernels (``kernels/``) both need. It imports
neither, so the oracle stays independent of the code it checks."""
from __future__ import annotations

import os

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the references and the kernels compute in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triton_interpret() -> bool:
    """Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``, read before genfast is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def optional_grad(value: torch.Tensor, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The gradient ``value`` of the optional input ``t`` in t's dtype; an empty tensor where t is absent (a
    backward op returns tensors only)."""
    return x.new_empty(0) if t is None else value.to(t.dtype)


def penalty_scale(weight: float, batch: int) -> float:
    """weight / B, the factor of Σ_b(‖g_b‖ − 1)² in the WGAN-GP penalty (an empty batch divides by 1: its penalty
    is 0, not NaN)."""
    return weight / max(batch, 1)
