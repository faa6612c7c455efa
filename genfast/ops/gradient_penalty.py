"""WGAN-GP gradient penalty (Gulrajani et al. 2017) from two fused ops: the interpolation between real and fake
samples, and the penalty on the per-sample norms of the critic's gradient."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
from torch import Tensor

from .._backend import FusedOp, resolve_backend, run
from .._rng import draw
from .._shared import compute_dtype
from .._validation import batch_major, check_float_tensor, check_generator, check_like, match_layout
from ..composite import gradient_penalty as composite

OP = "gradient_penalty"  # its module's name in every layer: kernels/, genfast/reference/, csrc/cpu/, ...


# ---- interpolation: x̂ = fake + α_b·(real − fake) ------------------------------------------------------------
# real and fake share one batch-major layout (the kernels index them by memory position); alpha is (B,) in the
# compute dtype (fp32, fp64 for fp64 inputs). α is a constant: it gets no gradient.

@torch.library.custom_op("genfast::interpolate", mutates_args=())
def _interpolate_op(real: Tensor, fake: Tensor, alpha: Tensor, backend: str) -> Tensor:
    return run(OP, "interpolate", real, fake, alpha, backend)


@_interpolate_op.register_fake
def _(real, fake, alpha, backend):
    return torch.empty_like(real)


@torch.library.custom_op("genfast::interpolate_backward", mutates_args=())
def _interpolate_backward_op(
    grad: Tensor, alpha: Tensor, want_real: bool, want_fake: bool, backend: str
) -> tuple[Tensor, Tensor]:
    return run(OP, "interpolate_backward", grad, alpha, want_real, want_fake, backend)


@_interpolate_backward_op.register_fake
def _(grad, alpha, want_real, want_fake, backend):
    return (torch.empty_like(grad) if want_real else grad.new_empty(0),
            torch.empty_like(grad) if want_fake else grad.new_empty(0))


def _interpolate_setup_context(ctx, inputs, output):
    real, fake, alpha, backend = inputs
    ctx.save_for_backward(alpha)
    ctx.backend = backend


def _interpolate_backward(ctx, grad):
    (alpha,) = ctx.saved_tensors
    want_real, want_fake = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # d real and d fake take the incoming gradient's layout: the kernel only needs the three to share one
    grad_real, grad_fake = _interpolate_grad(batch_major(grad), alpha, want_real, want_fake, ctx.backend)
    return grad_real if want_real else None, grad_fake if want_fake else None, None, None


_interpolate = FusedOp(_interpolate_op, OP, "interpolate", setup_context=_interpolate_setup_context,
                       backward=_interpolate_backward)
_interpolate_grad = FusedOp(_interpolate_backward_op, OP, "interpolate_backward")


# ---- penalty: norms_b = ‖g_b‖₂, p = weight·mean_b(norms_b − 1)² ------------------------------------------------
# g is batch-major; p (0-dim) and norms (B,) are fp32 (fp64 for fp64 g). norms is saved for the backward, which so
# reads g once; it is not differentiable.

@torch.library.custom_op("genfast::gradient_norm_penalty", mutates_args=())
def _penalty_op(grad: Tensor, weight: float, backend: str) -> tuple[Tensor, Tensor]:
    return run(OP, "gradient_norm_penalty", grad, weight, backend)


@_penalty_op.register_fake
def _(grad, weight, backend):
    dtype = compute_dtype(grad)
    return grad.new_empty((), dtype=dtype), grad.new_empty(grad.shape[0], dtype=dtype)


@torch.library.custom_op("genfast::gradient_norm_penalty_backward", mutates_args=())
def _penalty_backward_op(grad_penalty: Tensor, grad: Tensor, norms: Tensor, weight: float, backend: str) -> Tensor:
    return run(OP, "gradient_norm_penalty_backward", grad_penalty, grad, norms, weight, backend)


@_penalty_backward_op.register_fake
def _(grad_penalty, grad, norms, weight, backend):
    return torch.empty_like(grad)


def _penalty_setup_context(ctx, inputs, output):
    grad, weight, backend = inputs
    ctx.save_for_backward(grad, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient of the norms
    ctx.weight, ctx.backend = weight, backend


def _penalty_backward(ctx, grad_penalty, _grad_norms):
    # A first-order backward is all the penalty needs. p depends on the critic's parameters θ only through
    # g = ∇_x̂ critic(x̂; θ), so dp/dθ = (∂g/∂θ)ᵀ·(∂p/∂g): this op supplies ∂p/∂g, and autograd carries it on
    # through g's own graph, recorded by autograd.grad(..., create_graph=True), which holds the second-order
    # part (the mixed derivatives ∂²critic/∂x̂∂θ). Only a third derivative would differentiate this backward op.
    if grad_penalty is None:  # only the (non-differentiable) norms were used
        return None, None, None
    grad, norms = ctx.saved_tensors
    return _penalty_grad(grad_penalty, grad, norms, ctx.weight, ctx.backend), None, None


_penalty = FusedOp(_penalty_op, OP, "gradient_norm_penalty", setup_context=_penalty_setup_context,
                   backward=_penalty_backward)
_penalty_grad = FusedOp(_penalty_backward_op, OP, "gradient_norm_penalty_backward")


# ---- public function ---------------------------------------------------------------------------------------

def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"weight must be a real number, got {type(weight).__name__}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite non-negative number, got {weight}")
    return float(weight)


def _check_alpha(alpha, real: Tensor) -> None:
    if alpha is not None:
        check_like(alpha, "alpha", real, "real", shape=(real.shape[0],))
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad: the penalty is not differentiated with respect to α")


def _alpha(alpha, real: Tensor, generator) -> Tensor:
    """α of shape (B,) in the compute dtype, contiguous: the given one, else U(0, 1) drawn from ``generator``."""
    dtype = compute_dtype(real)
    if alpha is None:
        return draw(torch.rand, real.shape[0], dtype=dtype, device=real.device, generator=generator)
    return alpha.to(dtype).contiguous()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, *, weight: float = 10.0,
                     alpha: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """WGAN-GP penalty weight·mean_b(‖g_b‖₂ − 1)², with g = ∇_x̂ Σ critic(x̂) and x̂ = α_b·real + (1 − α_b)·fake.

    ``real`` and ``fake`` have shape (B, ...) on one device (mixed dtypes are promoted to the common one); α has
    shape (B,), drawn from U(0, 1) with ``generator`` (torch's default when None) unless given, and is not
    differentiated (its values are not checked: α outside [0, 1] extrapolates). The critic sees x̂ in ``real``'s
    memory layout (channels_last stays channels_last) and must treat samples independently (no batch statistics).
    The norms and the penalty are computed in fp32 (fp64 for fp64 inputs); the result is a 0-dim tensor of that
    dtype. With grad mode on, g is built with ``create_graph=True`` so that ``penalty.backward()`` reaches the
    critic's parameters (and ``real`` / ``fake`` where they require grad). An empty batch gives 0.
    """
    if not callable(critic):
        raise TypeError(f"critic must be callable, got {type(critic).__name__}")
    check_float_tensor(real, "real", min_dim=1)
    check_like(fake, "fake", real, "real")
    weight = _check_weight(weight)
    check_generator(generator, real.device)
    _check_alpha(alpha, real)
    dtype = torch.promote_types(real.dtype, fake.dtype)
    backend = resolve_backend(real.device, dtype, OP)
    if backend == "torch":
        return composite.gradient_penalty(critic, real.to(dtype), fake, weight=weight, alpha=alpha,
                                          generator=generator)
    real = batch_major(real.to(dtype))
    fake = match_layout(fake, real, dtype=dtype)
    alpha = _alpha(alpha, real, generator)
    x_hat = _interpolate(real, fake, alpha, backend)
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():  # under no_grad the value is still wanted, and it needs g
        if not x_hat.requires_grad:
            x_hat.requires_grad_(True)
        scores = critic(x_hat)
        check_float_tensor(scores, "the critic's output")
        (grad,) = torch.autograd.grad(scores, x_hat, torch.ones_like(scores), create_graph=create_graph)
    return _penalty(batch_major(grad), weight, backend)[0]
