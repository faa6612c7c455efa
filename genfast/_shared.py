"""Helpers that the references (``genfast/reference``) and the Triton kernels (``kernels/``) both need. It imports
neither, so the oracle stays independent of the code it checks."""
from __future__ import annotations

import os
import struct

import torch

# the model outputs the sampler steps and the training loss take (diffusers' ``prediction_type``)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# the DDPM step's variances (diffusers' ``variance_type``): the posterior's β̃ or β
VARIANCE_TYPES = ("fixed_small", "fixed_large")


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


def quantile_position(numel: int, ratio: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """(lo, hi, weight) of the ``ratio`` quantile of ``numel`` values as the installed torch.quantile computes it in
    ``dtype`` (fp32 or fp64): the order statistics v_lo ≤ v_hi (0-based, ascending) and quantile =
    torch.lerp(v_lo, v_hi, weight). The rank h = ratio·(numel − 1) is formed from ``ratio`` rounded to ``dtype``
    (as torch's scalar tensor of the input's dtype is) in float64, or, for fp32 where torch forms fp32 ranks
    (:data:`TORCH_RANKS_IN_FLOAT64`), rounded to fp32; lo = ⌊h⌋, hi = ⌈h⌉, weight = h − lo rounded to ``dtype``."""
    rank = _rounded(ratio, dtype) * (numel - 1)
    if not TORCH_RANKS_IN_FLOAT64:
        rank = _rounded(rank, dtype)
    lo = min(int(rank), numel - 1)
    hi = min(lo + (rank > lo), numel - 1)
    return lo, hi, _rounded(rank - lo, dtype)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to fp32 (to nearest, as a cast does) for fp32, as it is for fp64; on the host."""
    return struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 else value


QUANTILE_PROBE = (70, 0.995)  # values 0, …, 0, 1: the quantile is the weight, which the two precisions round apart


def _torch_ranks_in_float64() -> bool:
    """Whether the installed torch.quantile forms a float32 input's ranks in float64 (torch 2.14; pytorch#187574)
    rather than in float32 (torch 2.11): asked of torch itself, by one quantile whose two answers differ
    (csrc/cpu/diffusion_steps.cpp asks the same). Asked at import, so that no op call runs it."""
    numel, ratio = QUANTILE_PROBE
    values = torch.zeros(numel)
    values[-1] = 1.0
    rank = _rounded(ratio, torch.float32) * (numel - 1)
    return torch.quantile(values, ratio).item() == _rounded(rank - int(rank), torch.float32)


TORCH_RANKS_IN_FLOAT64 = _torch_ranks_in_float64()
