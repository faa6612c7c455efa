"""Diffusion ops: forward noising q(x_t | x_0), the DDPM ε-prediction loss with the noise never stored, and the
DDPM and DDIM sampler steps. Schedules are :class:`genfast.NoiseSchedule` (float64 tables indexed by timestep)."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._backend import implementation, resolve_backend
from .._rng import draw, draw_seed
from .._shared import compute_dtype
from .._validation import (
    batch_major, check_float_tensor, check_generator, check_like, check_noise, check_timesteps_not_after,
    check_timesteps_range, match_layout,
)
from ..composite import diffusion as composite
from ..schedule import NoiseSchedule, _check_real

OP = "diffusion"  # its module's name in every layer: kernels/, genfast/reference/, csrc/cpu/, ...
Timesteps = Union[int, Tensor]


def _impl(backend: str):
    return implementation(backend, OP)


# ---- q_sample: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε ------------------------------------------------------------------


@torch.library.custom_op("genfast::q_sample", mutates_args=())
def _q_sample_op(
    x0: Tensor, t: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, backend: str,
) -> Tensor:
    check_timesteps_range(t, sqrt_alphas_cumprod.shape[0])
    return _impl(backend).q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


@_q_sample_op.register_fake
def _(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, backend):
    return torch.empty_like(x0)


@torch.library.custom_op("genfast::q_sample_backward", mutates_args=())
def _q_sample_backward_op(
    grad: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor, backend: str,
) -> Tensor:
    return _impl(backend).q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


@_q_sample_backward_op.register_fake
def _(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, backend):
    return torch.empty_like(grad)


def _q_sample_setup(ctx, inputs, output):
    x0, t, noise, seed, sqrt_ac, sqrt_1m_ac, backend = inputs
    ctx.save_for_backward(t, sqrt_ac, sqrt_1m_ac)
    ctx.backend = backend


def _q_sample_backward(ctx, grad):
    grad_x0 = None
    if ctx.needs_input_grad[0]:
        grad_x0 = _q_sample_backward_op(batch_major(grad), *ctx.saved_tensors, ctx.backend)
    return grad_x0, None, None, None, None, None, None


_q_sample_op.register_autograd(_q_sample_backward, setup_context=_q_sample_setup)


# ---- the sampler steps: x_prev = a·x_t + b·ε̂ + c·z, one backward launch for (dε̂, dx_t) ---------------------


def _step_grads(ctx, grad, x_index: int, backward_op, *args):
    """(dε̂, dx_t) of a sampler step from ``backward_op``, or Nones when neither input needs a gradient."""
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[x_index]):
        return None, None
    return backward_op(batch_major(grad), *args, ctx.backend)


def _step_fake_backward(grad, *args):
    return torch.empty_like(grad), torch.empty_like(grad)


@torch.library.custom_op("genfast::ddpm_step", mutates_args=())
def _ddpm_step_op(
    model_output: Tensor, t: Tensor, x_t: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
    sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor, posterior_mean_coef1: Tensor,
    posterior_mean_coef2: Tensor, posterior_variance: Tensor, backend: str,
) -> Tensor:
    check_timesteps_range(t, sqrt_alphas_cumprod.shape[0])
    return _impl(backend).ddpm_step(model_output, t, x_t, noise, seed, sqrt_alphas_cumprod,
                                    sqrt_one_minus_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
                                    posterior_variance)


@_ddpm_step_op.register_fake
def _(model_output, t, x_t, *args):
    return torch.empty_like(x_t)


@torch.library.custom_op("genfast::ddpm_step_backward", mutates_args=())
def _ddpm_step_backward_op(
    grad: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
    posterior_mean_coef1: Tensor, posterior_mean_coef2: Tensor, posterior_variance: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    return _impl(backend).ddpm_step_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                             posterior_mean_coef1, posterior_mean_coef2, posterior_variance)


_ddpm_step_backward_op.register_fake(_step_fake_backward)


def _ddpm_setup(ctx, inputs, output):
    model_output, t, x_t, noise, seed, *tables, backend = inputs
    ctx.save_for_backward(t, *tables)
    ctx.backend = backend


def _ddpm_backward(ctx, grad):
    grad_model_output, grad_x = _step_grads(ctx, grad, 2, _ddpm_step_backward_op, *ctx.saved_tensors)
    return (grad_model_output, None, grad_x) + (None,) * 8


_ddpm_step_op.register_autograd(_ddpm_backward, setup_context=_ddpm_setup)


@torch.library.custom_op("genfast::ddim_step", mutates_args=())
def _ddim_step_op(
    model_output: Tensor, t: Tensor, t_prev: Tensor, x_t: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
    eta: float, alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
    backend: str,
) -> Tensor:
    check_timesteps_range(t, alphas_cumprod.shape[0])
    check_timesteps_range(t_prev, alphas_cumprod.shape[0], "t_prev", allow_negative=True)
    if eta > 0:
        check_timesteps_not_after(t_prev, t)
    return _impl(backend).ddim_step(model_output, t, t_prev, x_t, noise, seed, eta, alphas_cumprod,
                                    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


@_ddim_step_op.register_fake
def _(model_output, t, t_prev, x_t, *args):
    return torch.empty_like(x_t)


@torch.library.custom_op("genfast::ddim_step_backward", mutates_args=())
def _ddim_step_backward_op(
    grad: Tensor, t: Tensor, t_prev: Tensor, eta: float, alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    return _impl(backend).ddim_step_backward(grad, t, t_prev, eta, alphas_cumprod, sqrt_alphas_cumprod,
                                             sqrt_one_minus_alphas_cumprod)


_ddim_step_backward_op.register_fake(_step_fake_backward)


def _ddim_setup(ctx, inputs, output):
    model_output, t, t_prev, x_t, noise, seed, eta, *tables, backend = inputs
    ctx.save_for_backward(t, t_prev, *tables)
    ctx.eta, ctx.backend = eta, backend


def _ddim_backward(ctx, grad):
    t, t_prev, *tables = ctx.saved_tensors
    grad_model_output, grad_x = _step_grads(ctx, grad, 3, _ddim_step_backward_op, t, t_prev, ctx.eta, *tables)
    return (grad_model_output, None, None, grad_x) + (None,) * 7


_ddim_step_op.register_autograd(_ddim_backward, setup_context=_ddim_setup)


# ---- the ε-prediction loss: mean((ε̂ − ε)²) with ε regenerated from the seed ----------------------------------


@torch.library.custom_op("genfast::noise_mse", mutates_args=())
def _noise_mse_op(eps_hat: Tensor, seed: Tensor, backend: str) -> Tensor:
    return _impl(backend).noise_mse(eps_hat, seed)


@_noise_mse_op.register_fake
def _(eps_hat, seed, backend):
    return eps_hat.new_empty((), dtype=compute_dtype(eps_hat))


@torch.library.custom_op("genfast::noise_mse_backward", mutates_args=())
def _noise_mse_backward_op(grad_loss: Tensor, eps_hat: Tensor, seed: Tensor, backend: str) -> Tensor:
    return _impl(backend).noise_mse_backward(grad_loss, eps_hat, seed)


@_noise_mse_backward_op.register_fake
def _(grad_loss, eps_hat, seed, backend):
    return torch.empty_like(eps_hat)


def _noise_mse_setup(ctx, inputs, output):
    eps_hat, seed, backend = inputs
    ctx.save_for_backward(eps_hat, seed)
    ctx.backend = backend


def _noise_mse_backward(ctx, grad_loss):
    eps_hat, seed = ctx.saved_tensors
    return _noise_mse_backward_op(grad_loss, eps_hat, seed, ctx.backend), None, None


_noise_mse_op.register_autograd(_noise_mse_backward, setup_context=_noise_mse_setup)


# ---- argument checks and the public functions ------------------------------------------------------------------


def _timesteps(t, name: str, x: Tensor, num_steps: int, *, allow_negative: bool = False) -> Tensor:
    """``t`` as a (B,) int64 tensor on x's device. An int is range-checked here; a tensor's values are checked by
    the op (so torch.compile does not break the graph on a data-dependent check)."""
    batch = x.shape[0]
    if isinstance(t, numbers.Integral) and not isinstance(t, bool):
        if t >= num_steps or (t < 0 and not allow_negative):
            bounds = f"< {num_steps}" if allow_negative else f"in [0, {num_steps})"
            raise ValueError(f"{name} must be {bounds}, got {t}")
        return torch.full((batch,), int(t), dtype=torch.int64, device=x.device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor of shape ({batch},), got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the samples are on {x.device}: they must be on one device")
    return t.to(torch.int64).contiguous()


def _prepare(x, x_name: str, schedule, t, noise, generator, *, draw_t: bool = False):
    """Checks the arguments every op shares; returns (x, t, noise): x batch-major, noise in its layout and dtype,
    t a (B,) int64 tensor (drawn uniformly in [0, T) from ``generator`` when None and ``draw_t``)."""
    check_float_tensor(x, x_name, min_dim=1)
    check_noise(noise, x, x_name)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a genfast.NoiseSchedule, got {type(schedule).__name__}")
    if schedule.betas.device != x.device:
        raise ValueError(f"schedule is on {schedule.betas.device} but {x_name} is on {x.device}: "
                         f"call schedule.to({str(x.device)!r}) once")
    check_generator(generator, x.device)
    if t is None and draw_t:
        t = draw(torch.randint, 0, schedule.num_steps, (x.shape[0],), device=x.device, generator=generator)
    t = _timesteps(t, "t", x, schedule.num_steps)
    x = batch_major(x)
    if noise is not None:
        noise = match_layout(noise, x, dtype=x.dtype)
    return x, t, noise


def _prepare_step(model_output, t, x_t, schedule, noise, generator):
    """:func:`_prepare` for a sampler step, with ``model_output`` (ε̂) checked against x_t and put in its layout."""
    check_float_tensor(x_t, "x_t", min_dim=1)
    check_like(model_output, "model_output", x_t, "x_t", same_dtype=True)
    x_t, t, noise = _prepare(x_t, "x_t", schedule, t, noise, generator)
    return match_layout(model_output, x_t), t, x_t, noise


def _noise_and_seed(noise, x, generator, needed: bool):
    """(noise, seed) for an op: no noise term when not ``needed``, else ``noise`` or a fresh Philox seed."""
    if not needed:
        return None, None
    if noise is not None:
        return noise, None
    return None, draw_seed(x.device, generator)


def q_sample(x0: Tensor, t: Timesteps, schedule: NoiseSchedule, noise: Optional[Tensor] = None, *,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Forward noising x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, per sample: ``t`` is an int or an integer tensor of shape
    (B,) in [0, T). ε is ``noise`` when given (cast to x0's dtype; a constant, so one that requires grad is
    refused), else Philox noise drawn in the kernel from a seed taken from ``generator`` (torch's default when
    None): the stream of ``genfast.reference.random.noise_like(x0, seed)``. Differentiable in x0."""
    x0, t, noise = _prepare(x0, "x0", schedule, t, noise, generator)
    backend = resolve_backend(x0.device, x0.dtype, OP)
    if backend == "torch":
        return composite.q_sample(x0, t, schedule, noise, generator=generator)
    noise, seed = _noise_and_seed(noise, x0, generator, True)
    return _q_sample_op(x0, t, noise, seed, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod,
                        backend)


def diffusion_loss(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule: NoiseSchedule, *,
                   t: Optional[Timesteps] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """The DDPM ε-prediction loss mean((ε̂ − ε)²) with ε̂ = model(x_t, t), x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε: a 0-dim
    fp32 tensor (fp64 for an fp64 ε̂). ``t`` (B,) is drawn uniformly in [0, T) from ``generator`` when None, then
    the noise seed is drawn from it. ε is Philox noise that is never written to memory: the noising writes only
    x_t and the loss regenerates ε in its forward and backward. Gradients reach the model through ε̂ and x0
    through x_t when x0 requires grad."""
    x0, t, _ = _prepare(x0, "x0", schedule, t, None, generator, draw_t=True)
    if x0.numel() == 0:
        raise ValueError(f"x0 must have at least one element: the loss is a mean, got shape {tuple(x0.shape)}")
    backend = resolve_backend(x0.device, x0.dtype, OP)
    if backend == "torch":
        return composite.diffusion_loss(_checked_model(model, x0), x0, schedule, t=t, generator=generator)
    seed = draw_seed(x0.device, generator)
    x_t = _q_sample_op(x0, t, None, seed, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod,
                       backend)
    eps_hat = _checked_model(model, x0)(x_t, t)
    # the noise stream is indexed by memory position: ε̂ must be laid out like x0
    eps_hat = match_layout(eps_hat, x_t)
    return _noise_mse_op(eps_hat, seed, resolve_backend(eps_hat.device, eps_hat.dtype, OP))


def _checked_model(model, x0: Tensor):
    """``model`` whose output ε̂ is checked to be a float tensor of x0's shape on its device."""
    def run(x_t, t):
        eps_hat = model(x_t, t)
        check_like(eps_hat, "model(x_t, t)", x0, "x0")
        return eps_hat

    return run


def ddpm_step(model_output: Tensor, t: Timesteps, x_t: Tensor, schedule: NoiseSchedule,
              noise: Optional[Tensor] = None, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """One DDPM ancestral step for ε-prediction with the "fixed small" variance (Ho et al. 2020, Algorithm 2):

        x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t,   x_{t−1} = c1_t·x̂_0 + c2_t·x_t + √β̃_t·z

    with c1, c2, β̃ the posterior tables of ``schedule`` (β̃_0 = 0: no noise at t = 0). ``model_output`` is ε̂;
    ``t`` an int or an integer tensor (B,) in [0, T). z is ``noise`` when given (a constant: one that requires grad
    is refused), else Philox noise from ``generator`` as in :func:`q_sample`. Differentiable in model_output and
    x_t."""
    noisy = not (isinstance(t, numbers.Integral) and t == 0)
    model_output, t, x_t, noise = _prepare_step(model_output, t, x_t, schedule, noise, generator)
    backend = resolve_backend(x_t.device, x_t.dtype, OP)
    if backend == "torch":
        return composite.ddpm_step(model_output, t, x_t, schedule, noise, generator=generator)
    noise, seed = _noise_and_seed(noise, x_t, generator, noisy)
    return _ddpm_step_op(model_output, t, x_t, noise, seed, schedule.sqrt_alphas_cumprod,
                         schedule.sqrt_one_minus_alphas_cumprod, schedule.posterior_mean_coef1,
                         schedule.posterior_mean_coef2, schedule.posterior_variance, backend)


def ddim_step(model_output: Tensor, t: Timesteps, t_prev: Timesteps, x_t: Tensor, schedule: NoiseSchedule,
              eta: float = 0.0, noise: Optional[Tensor] = None, *,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """One DDIM step from t to t_prev for ε-prediction (Song et al. 2021):

        x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t,   σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p),
        x_prev = √ᾱ_p·x̂_0 + √(1−ᾱ_p−σ²)·ε̂ + σ·z

    with ᾱ_p = ᾱ_{t_prev}, and ᾱ_p = 1 when t_prev < 0 (the last step). ``t`` in [0, T) and ``t_prev`` < T are ints
    or integer tensors (B,). ``eta`` in [0, 1]; with eta = 0 the step is deterministic and ``noise`` is unused (then
    t_prev > t, DDIM inversion, is allowed too); eta > 0 needs t_prev ≤ t. z is ``noise`` when given (a constant:
    one that requires grad is refused), else Philox noise from ``generator`` as in :func:`q_sample`. Differentiable
    in model_output and x_t."""
    eta = _check_real(eta, "eta")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (1: the DDPM posterior variance), got {eta}")
    if eta > 0 and all(isinstance(v, numbers.Integral) for v in (t, t_prev)):  # on the host, for every backend
        check_timesteps_not_after(t_prev, t)
    model_output, t, x_t, noise = _prepare_step(model_output, t, x_t, schedule, noise, generator)
    t_prev = _timesteps(t_prev, "t_prev", x_t, schedule.num_steps, allow_negative=True)
    backend = resolve_backend(x_t.device, x_t.dtype, OP)
    if backend == "torch":
        return composite.ddim_step(model_output, t, t_prev, x_t, schedule, eta, noise, generator=generator)
    noise, seed = _noise_and_seed(noise, x_t, generator, eta > 0)
    return _ddim_step_op(model_output, t, t_prev, x_t, noise, seed, eta, schedule.alphas_cumprod,
                         schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod, backend)
