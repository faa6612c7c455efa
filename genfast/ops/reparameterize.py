"""VAE ops: reparameterization with in-kernel noise, the Gaussian KL term, and both fused in one pass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import FusedOp, resolve_backend, run
from .._rng import draw_seed, unused_seed
from .._shared import compute_dtype
from .._validation import batch_major, check_float_tensor, check_generator, check_like, check_noise, match_layout
from ..composite import reparameterize as composite

OP = "reparameterize"  # its module's name in every layer: kernels/, genfast/reference/, csrc/cpu/, ...


@torch.library.custom_op("genfast::reparameterize_kl", mutates_args=())
def _reparameterize_kl_op(
    mu: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Tensor, want_z: bool, want_kl: bool, backend: str
) -> tuple[Tensor, Tensor]:
    return run(OP, "reparameterize_kl", mu, logvar, noise, seed, want_z, want_kl, backend)


@_reparameterize_kl_op.register_fake
def _(mu, logvar, noise, seed, want_z, want_kl, backend):
    z = torch.empty_like(mu) if want_z else mu.new_empty(0)
    kl_dtype = compute_dtype(mu)
    kl = mu.new_empty(mu.shape[0] if want_kl else 0, dtype=kl_dtype)
    return z, kl


@torch.library.custom_op("genfast::reparameterize_kl_backward", mutates_args=())
def _reparameterize_kl_backward_op(
    grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, noise: Optional[Tensor],
    seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    return run(OP, "reparameterize_kl_backward", grad_z, grad_kl, mu, logvar, noise, seed, backend)


@_reparameterize_kl_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, noise, seed, backend):
    return torch.empty_like(mu), torch.empty_like(logvar)


def _setup_context(ctx, inputs, output):
    mu, logvar, noise, seed, want_z, want_kl, backend = inputs
    ctx.save_for_backward(mu, logvar, noise, seed)
    ctx.set_materialize_grads(False)  # an unused z or KL sends None, not a zero-filled gradient
    ctx.want_z, ctx.want_kl, ctx.backend = want_z, want_kl, backend


def _backward(ctx, grad_z, grad_kl):
    mu, logvar, noise, seed = ctx.saved_tensors
    # the kernels index the incoming gradient by memory position, like mu
    grad_z = match_layout(grad_z, mu) if ctx.want_z and grad_z is not None else None
    grad_kl = grad_kl.contiguous() if ctx.want_kl and grad_kl is not None else None
    if grad_z is None and grad_kl is None:
        return None, None, None, None, None, None, None
    grad_mu, grad_logvar = _reparameterize_kl_grad(grad_z, grad_kl, mu, logvar, noise, seed, ctx.backend)
    return grad_mu, grad_logvar, None, None, None, None, None


_reparameterize_kl = FusedOp(_reparameterize_kl_op, OP, "reparameterize_kl", setup_context=_setup_context,
                             backward=_backward)
_reparameterize_kl_grad = FusedOp(_reparameterize_kl_backward_op, OP, "reparameterize_kl_backward")


def _check(mu, logvar, noise, generator) -> str:
    """Checks the arguments; returns the backend."""
    check_float_tensor(mu, "mu", min_dim=1)
    check_like(logvar, "logvar", mu, "mu", same_dtype=True)
    check_noise(noise, mu, "mu")
    check_generator(generator, mu.device)
    return resolve_backend(mu.device, mu.dtype, OP)


def _fused(mu, logvar, noise, generator, backend, want_z: bool, want_kl: bool):
    """The registered op on batch-major tensors, with a fresh Philox seed when z needs noise."""
    mu = batch_major(mu)
    logvar = match_layout(logvar, mu)
    if noise is not None:
        noise = match_layout(noise, mu, dtype=mu.dtype)
    seed = draw_seed(mu.device, generator) if want_z and noise is None else unused_seed(mu.device)
    return _reparameterize_kl(mu, logvar, noise, seed, want_z, want_kl, backend)


def reparameterize_kl(mu: Tensor, logvar: Tensor, noise: Optional[Tensor] = None, *,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """(z, kl) in one pass: z = μ + exp(½·logvar)·ε and kl = ½·Σ(μ² + e^logvar − 1 − logvar) over all dims but the
    first, shape (B,), fp32. ε is ``noise`` when given (a constant: one that requires grad is refused), else Philox
    noise drawn in the kernel from a seed taken from ``generator`` (torch's default when None) and regenerated in
    the backward, never stored."""
    backend = _check(mu, logvar, noise, generator)
    if backend == "torch":
        return composite.reparameterize_kl(mu, logvar, noise, generator=generator)
    return _fused(mu, logvar, noise, generator, backend, True, True)


def reparameterize(mu: Tensor, logvar: Tensor, noise: Optional[Tensor] = None, *,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """z = μ + exp(½·logvar)·ε, with ε as in :func:`reparameterize_kl`."""
    backend = _check(mu, logvar, noise, generator)
    if backend == "torch":
        return composite.reparameterize(mu, logvar, noise, generator=generator)
    return _fused(mu, logvar, noise, generator, backend, True, False)[0]


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½·Σ(μ² + e^logvar − 1 − logvar), summed over every dim but the first: shape (B,),
    fp32 (fp64 for fp64 inputs)."""
    backend = _check(mu, logvar, None, None)
    if backend == "torch":
        return composite.gaussian_kl(mu, logvar)
    return _fused(mu, logvar, None, None, backend, False, True)[1]
