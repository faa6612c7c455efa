"""GroupNorm + SiLU fused with the DDPM time-embedding add and the ADM/EDM scale-shift (the U-Net block op)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._backend import FusedOp, resolve_backend, run
from .._shared import compute_dtype
from .._validation import check_float_tensor, check_like, match_layout
from ..composite import group_norm_silu as composite

OP = "group_norm_silu"  # its module's name in every layer: kernels/, genfast/reference/, csrc/cpu/, ...
ACTIVATIONS = ("silu", None)


@torch.library.custom_op("genfast::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], num_groups: int, eps: float, silu: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return run(OP, "group_norm_silu", x, weight, bias, add, scale, shift, num_groups, eps, silu, backend)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, add, scale, shift, num_groups, eps, silu, backend):
    stats_shape = (x.shape[0], num_groups)
    dtype = compute_dtype(x)
    return torch.empty_like(x), x.new_empty(stats_shape, dtype=dtype), x.new_empty(stats_shape, dtype=dtype)


@torch.library.custom_op("genfast::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(
    grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor],
    scale: Optional[Tensor], shift: Optional[Tensor], mean: Tensor, rstd: Tensor, num_groups: int, silu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return run(OP, "group_norm_silu_backward", grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups,
               silu, backend)


@_group_norm_silu_backward_op.register_fake
def _(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu, backend):
    def grad(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return torch.empty_like(x), grad(weight), grad(bias), grad(add), grad(scale), grad(shift)


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, scale, shift, num_groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of mean and rstd: no launches for them
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    if grad_y is None:
        return (None,) * 10
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    grad_y = match_layout(grad_y, x, dtype=x.dtype)  # the kernels index dy with x's strides
    grads = _group_norm_silu_grad(grad_y, x, weight, bias, add, scale, shift, mean, rstd, ctx.num_groups, ctx.silu,
                                  ctx.backend)
    inputs = (x, weight, bias, add, scale, shift)
    return (*[g if t is not None else None for g, t in zip(grads, inputs)], None, None, None, None)


_group_norm_silu = FusedOp(_group_norm_silu_op, OP, "group_norm_silu", setup_context=_setup_context,
                           backward=_backward, cpp_autograd=True)
_group_norm_silu_grad = FusedOp(_group_norm_silu_backward_op, OP, "group_norm_silu_backward")


def _kernel_ready(x: Tensor) -> bool:
    """x is dense and its spatial dims collapse to one stride, so the kernels index it as (B, C, S) in place."""
    if x.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    spatial = [(n, st) for n, st in zip(x.shape[2:], x.stride()[2:]) if n != 1]
    return all(outer == inner * n for (_, outer), (n, inner) in zip(spatial, spatial[1:]))


def _kernel_layout(x: Tensor) -> Tensor:
    """x itself when the kernels can read it in place (NCHW, NHWC, (B, C, L) in either order, ...); otherwise a
    dense copy in x's suggested memory format (a sliced channels_last image stays channels_last), or contiguous."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or _kernel_ready(x):
        return x
    dense = torch.empty_like(x)
    return dense.copy_(x) if _kernel_ready(dense) else x.contiguous()


def check_groups(num_groups, channels: int, channels_name: str) -> None:
    """``num_groups`` is an int dividing ``channels`` (TypeError / ValueError naming both otherwise)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of {channels_name}={channels}, "
                         f"got num_groups={num_groups}")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")


def _check_args(x, num_groups, weight, bias, eps, add, scale, shift, activation) -> None:
    check_float_tensor(x, "x", min_dim=2)
    channels = x.shape[1]
    check_groups(num_groups, channels, "the number of channels of x, C")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_like(t, name, x, "x", shape=(channels,))
    if add is not None or scale is not None or shift is not None:
        for name, t in (("add", add), ("scale", scale), ("shift", shift)):
            if t is not None:
                check_like(t, name, x, "x", shape=x.shape[:2])
    check_eps(eps)
    if not (activation is None or (isinstance(activation, str) and activation == "silu")):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def group_norm_silu(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5, *, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, activation: Optional[str] = "silu") -> Tensor:
    """Fused GroupNorm + SiLU for x of shape (B, C, *spatial) (any number of spatial dims, none included):

        h = x + add[:, :, None, …]                                      (time-embedding add, before the norm)
        n = (h − mean_g(h)) / sqrt(var_g(h) + eps) · weight + bias       (GroupNorm over num_groups groups)
        n = n · (1 + scale) + shift                                      (scale-shift, after the norm)
        y = silu(n) = n · σ(n),  or y = n with ``activation=None``

    ``weight``/``bias`` have shape (C,) and ``add``/``scale``/``shift`` shape (B, C); each is optional and gets a
    gradient. Statistics in fp32 (fp64 for fp64 inputs); y in x's dtype and memory format: NCHW and channels_last
    are read in place, other strided inputs are copied first."""
    _check_args(x, num_groups, weight, bias, eps, add, scale, shift, activation)
    backend = resolve_backend(x.device, x.dtype, OP)
    if backend == "torch":
        return composite.group_norm_silu(x, num_groups, weight, bias, eps, add=add, scale=scale, shift=shift,
                                         activation=activation)
    x = _kernel_layout(x)
    return _group_norm_silu(x, weight, bias, add, scale, shift, num_groups, float(eps), activation == "silu",
                            backend)[0]
