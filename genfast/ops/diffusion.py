"""Diffusion ops: forward noising q(x_t | x_0), the DDPM ε-prediction loss with the noise never stored, and the
DDPM and DDIM sampler steps. Schedules are :class:`genfast.NoiseSchedule` (float64 tables indexed by timestep)."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._backend import FusedOp, resolve_backend, run
from .._rng import draw, draw_seed
from .._shared import compute_dtype
from .._validation import (
    INTEGER_DTYPES, batch_major, check_float_tensor, check_generator, check_like, check_noise,
    check_timesteps_not_after, check_timesteps_range, match_layout,
)
from ..composite import diffusion as composite
from ..schedule import NoiseSchedule, _check_real

OP = "diffusion"  # its module's name in every layer: kernels/, genfast/reference/, csrc/cpu/, ...
Timesteps = Union[int, Tensor]
# the schedule tables each op reads, in its registered op's order
Q_SAMPLE_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
DDPM_TABLES = Q_SAMPLE_TABLES + ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance")
DDIM_TABLES = ("alphas_cumprod",) + Q_SAMPLE_TABLES
# backends whose kernels refuse a timestep outside the tables as they read it (csrc/cpu/diffusion.cpp): there a
# tensor's timesteps are checked only once a kernel has refused one, to raise the ValueError naming the argument
SELF_CHECKING = ("cpp",)


# ---- q_sample: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε ------------------------------------------------------------------


@torch.library.custom_op("genfast::q_sample", mutates_args=())
def _q_sample_op(
    x0: Tensor, t: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, backend: str,
) -> Tensor:
    return run(OP, "q_sample", x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, backend)


@_q_sample_op.register_fake
def _(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, backend):
    return torch.empty_like(x0)


@torch.library.custom_op("genfast::q_sample_backward", mutates_args=())
def _q_sample_backward_op(
    grad: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor, backend: str,
) -> Tensor:
    return run(OP, "q_sample_backward", grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, backend)


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
        grad_x0 = _q_sample_grad(batch_major(grad), *ctx.saved_tensors, ctx.backend)
    return grad_x0, None, None, None, None, None, None


_q_sample = FusedOp(_q_sample_op, OP, "q_sample", setup_context=_q_sample_setup, backward=_q_sample_backward)
_q_sample_grad = FusedOp(_q_sample_backward_op, OP, "q_sample_backward")


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
    return run(OP, "ddpm_step", model_output, t, x_t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
               posterior_mean_coef1, posterior_mean_coef2, posterior_variance, backend)


@_ddpm_step_op.register_fake
def _(model_output, t, x_t, *args):
    return torch.empty_like(x_t)


@torch.library.custom_op("genfast::ddpm_step_backward", mutates_args=())
def _ddpm_step_backward_op(
    grad: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
    posterior_mean_coef1: Tensor, posterior_mean_coef2: Tensor, posterior_variance: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    return run(OP, "ddpm_step_backward", grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
               posterior_mean_coef1, posterior_mean_coef2, posterior_variance, backend)


_ddpm_step_backward_op.register_fake(_step_fake_backward)


def _ddpm_setup(ctx, inputs, output):
    model_output, t, x_t, noise, seed, *tables, backend = inputs
    ctx.save_for_backward(t, *tables)
    ctx.backend = backend


def _ddpm_backward(ctx, grad):
    grad_model_output, grad_x = _step_grads(ctx, grad, 2, _ddpm_step_grad, *ctx.saved_tensors)
    return (grad_model_output, None, grad_x) + (None,) * 8


_ddpm_step = FusedOp(_ddpm_step_op, OP, "ddpm_step", setup_context=_ddpm_setup, backward=_ddpm_backward)
_ddpm_step_grad = FusedOp(_ddpm_step_backward_op, OP, "ddpm_step_backward")


@torch.library.custom_op("genfast::ddim_step", mutates_args=())
def _ddim_step_op(
    model_output: Tensor, t: Tensor, t_prev: Tensor, x_t: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
    eta: float, alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
    backend: str,
) -> Tensor:
    return run(OP, "ddim_step", model_output, t, t_prev, x_t, noise, seed, eta, alphas_cumprod, sqrt_alphas_cumprod,
               sqrt_one_minus_alphas_cumprod, backend)


@_ddim_step_op.register_fake
def _(model_output, t, t_prev, x_t, *args):
    return torch.empty_like(x_t)


@torch.library.custom_op("genfast::ddim_step_backward", mutates_args=())
def _ddim_step_backward_op(
    grad: Tensor, t: Tensor, t_prev: Tensor, eta: float, alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    return run(OP, "ddim_step_backward", grad, t, t_prev, eta, alphas_cumprod, sqrt_alphas_cumprod,
               sqrt_one_minus_alphas_cumprod, backend)


_ddim_step_backward_op.register_fake(_step_fake_backward)


def _ddim_setup(ctx, inputs, output):
    model_output, t, t_prev, x_t, noise, seed, eta, *tables, backend = inputs
    ctx.save_for_backward(t, t_prev, *tables)
    ctx.eta, ctx.backend = eta, backend


def _ddim_backward(ctx, grad):
    t, t_prev, *tables = ctx.saved_tensors
    grad_model_output, grad_x = _step_grads(ctx, grad, 3, _ddim_step_grad, t, t_prev, ctx.eta, *tables)
    return (grad_model_output, None, None, grad_x) + (None,) * 7


_ddim_step = FusedOp(_ddim_step_op, OP, "ddim_step", setup_context=_ddim_setup, backward=_ddim_backward)
_ddim_step_grad = FusedOp(_ddim_step_backward_op, OP, "ddim_step_backward")


# ---- the ε-prediction loss: mean((ε̂ − ε)²) with ε regenerated from the seed ----------------------------------


@torch.library.custom_op("genfast::noise_mse", mutates_args=())
def _noise_mse_op(eps_hat: Tensor, seed: Tensor, backend: str) -> Tensor:
    return run(OP, "noise_mse", eps_hat, seed, backend)


@_noise_mse_op.register_fake
def _(eps_hat, seed, backend):
    return eps_hat.new_empty((), dtype=compute_dtype(eps_hat))


@torch.library.custom_op("genfast::noise_mse_backward", mutates_args=())
def _noise_mse_backward_op(grad_loss: Tensor, eps_hat: Tensor, seed: Tensor, backend: str) -> Tensor:
    return run(OP, "noise_mse_backward", grad_loss, eps_hat, seed, backend)


@_noise_mse_backward_op.register_fake
def _(grad_loss, eps_hat, seed, backend):
    return torch.empty_like(eps_hat)


def _noise_mse_setup(ctx, inputs, output):
    eps_hat, seed, backend = inputs
    ctx.save_for_backward(eps_hat, seed)
    ctx.backend = backend


def _noise_mse_backward(ctx, grad_loss):
    eps_hat, seed = ctx.saved_tensors
    return _noise_mse_grad(grad_loss, eps_hat, seed, ctx.backend), None, None


_noise_mse = FusedOp(_noise_mse_op, OP, "noise_mse", setup_context=_noise_mse_setup, backward=_noise_mse_backward)
_noise_mse_grad = FusedOp(_noise_mse_backward_op, OP, "noise_mse_backward")


# ---- argument checks and the public functions ------------------------------------------------------------------


def _timesteps(t, name: str, x: Tensor, num_steps: int, backend: str, *, allow_negative: bool = False) -> Tensor:
    """``t`` as a (B,) int64 tensor on x's device, range-checked without reading a tensor back: an int on the host,
    a tensor with ``torch._assert_async`` (no sync, and no graph break under torch.compile) — on a SELF_CHECKING
    backend by :func:`_call`, after its kernel refused a timestep."""
    batch = x.shape[0]
    if isinstance(t, Tensor):
        if t.dtype not in INTEGER_DTYPES:
            raise TypeError(f"{name} must have an integer dtype (int64, int32, int16, int8 or uint8), got {t.dtype}")
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the samples are on {x.device}: they must be on one "
                             "device")
        if backend not in SELF_CHECKING:
            check_timesteps_range(t, num_steps, name, allow_negative=allow_negative)
        return (t if t.dtype == torch.int64 else t.to(torch.int64)).contiguous()
    if isinstance(t, numbers.Integral) and not isinstance(t, bool):
        check_timesteps_range(t, num_steps, name, allow_negative=allow_negative)
        return torch.full((batch,), int(t), dtype=torch.int64, device=x.device)
    raise TypeError(f"{name} must be an int or an integer tensor of shape ({batch},), got {type(t).__name__}")


def _tables(schedule: NoiseSchedule, names: tuple) -> tuple:
    """The schedule's tables ``names``, read from its buffer dict (nn.Module's attribute lookup costs ~1 µs)."""
    buffers = schedule._buffers
    return tuple(buffers[name] for name in names)


def _call(fused, args: tuple, schedule: NoiseSchedule, timesteps: tuple):
    """``fused(*args)``; on a SELF_CHECKING backend, when its kernel refuses a timestep, the ValueError the other
    backends raise before the launch: ``timesteps`` are the op's (t, name, allow_negative), checked then."""
    if args[-1] not in SELF_CHECKING:
        return fused(*args)
    try:
        return fused(*args)
    except RuntimeError:
        for t, name, allow_negative in timesteps:
            check_timesteps_range(t, schedule.num_steps, name, allow_negative=allow_negative)
        raise


def _prepare(x, x_name: str, schedule, t, noise, generator, *, draw_t: bool = False):
    """Checks the arguments every op shares; returns (x, t, noise, backend): x batch-major, noise in its layout and
    dtype, t a (B,) int64 tensor (drawn uniformly in [0, T) from ``generator`` when None and ``draw_t``), the
    backend resolved for x."""
    check_float_tensor(x, x_name, min_dim=1)
    check_noise(noise, x, x_name)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a genfast.NoiseSchedule, got {type(schedule).__name__}")
    betas = _tables(schedule, ("betas",))[0]
    if betas.device != x.device:
        raise ValueError(f"schedule is on {betas.device} but {x_name} is on {x.device}: "
                         f"call schedule.to({str(x.device)!r}) once")
    check_generator(generator, x.device)
    backend = resolve_backend(x.device, x.dtype, OP)
    if t is None and draw_t:  # in range by construction
        t = draw(torch.randint, 0, betas.shape[0], (x.shape[0],), device=x.device, generator=generator)
    else:
        t = _timesteps(t, "t", x, betas.shape[0], backend)
    x = batch_major(x)
    if noise is not None:
        noise = match_layout(noise, x, dtype=x.dtype)
    return x, t, noise, backend


def _prepare_step(model_output, t, x_t, schedule, noise, generator):
    """:func:`_prepare` for a sampler step, with ``model_output`` (ε̂) checked against x_t and put in its layout."""
    check_float_tensor(x_t, "x_t", min_dim=1)
    check_like(model_output, "model_output", x_t, "x_t", same_dtype=True)
    x_t, t, noise, backend = _prepare(x_t, "x_t", schedule, t, noise, generator)
    return match_layout(model_output, x_t), t, x_t, noise, backend


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
    x0, t, noise, backend = _prepare(x0, "x0", schedule, t, noise, generator)
    if backend == "torch":
        return composite.q_sample(x0, t, schedule, noise, generator=generator)
    noise, seed = _noise_and_seed(noise, x0, generator, True)
    return _call(_q_sample, (x0, t, noise, seed, *_tables(schedule, Q_SAMPLE_TABLES), backend), schedule,
                 ((t, "t", False),))


def diffusion_loss(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule: NoiseSchedule, *,
                   t: Optional[Timesteps] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """The DDPM ε-prediction loss mean((ε̂ − ε)²) with ε̂ = model(x_t, t), x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε: a 0-dim
    fp32 tensor (fp64 for an fp64 ε̂). ``t`` (B,) is drawn uniformly in [0, T) from ``generator`` when None, then
    the noise seed is drawn from it. ε is Philox noise that is never written to memory: the noising writes only
    x_t and the loss regenerates ε in its forward and backward. Gradients reach the model through ε̂ and x0
    through x_t when x0 requires grad."""
    x0, t, _, backend = _prepare(x0, "x0", schedule, t, None, generator, draw_t=True)
    if x0.numel() == 0:
        raise ValueError(f"x0 must have at least one element: the loss is a mean, got shape {tuple(x0.shape)}")
    if backend == "torch":
        return composite.diffusion_loss(_checked_model(model, x0), x0, schedule, t=t, generator=generator)
    seed = draw_seed(x0.device, generator)
    x_t = _call(_q_sample, (x0, t, None, seed, *_tables(schedule, Q_SAMPLE_TABLES), backend), schedule,
                ((t, "t", False),))
    eps_hat = _checked_model(model, x0)(x_t, t)
    # the noise stream is indexed by memory position: ε̂ must be laid out like x0
    eps_hat = match_layout(eps_hat, x_t)
    return _noise_mse(eps_hat, seed, resolve_backend(eps_hat.device, eps_hat.dtype, OP))


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
    model_output, t, x_t, noise, backend = _prepare_step(model_output, t, x_t, schedule, noise, generator)
    if backend == "torch":
        return composite.ddpm_step(model_output, t, x_t, schedule, noise, generator=generator)
    noise, seed = _noise_and_seed(noise, x_t, generator, noisy)
    return _call(_ddpm_step, (model_output, t, x_t, noise, seed, *_tables(schedule, DDPM_TABLES), backend),
                 schedule, ((t, "t", False),))


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
    on_host = all(isinstance(v, numbers.Integral) for v in (t, t_prev))
    if eta > 0 and on_host:
        check_timesteps_not_after(t_prev, t)
    model_output, t, x_t, noise, backend = _prepare_step(model_output, t, x_t, schedule, noise, generator)
    t_prev = _timesteps(t_prev, "t_prev", x_t, schedule.num_steps, backend, allow_negative=True)
    if eta > 0 and not on_host:  # the kernels do not check this one
        check_timesteps_not_after(t_prev, t)
    if backend == "torch":
        return composite.ddim_step(model_output, t, t_prev, x_t, schedule, eta, noise, generator=generator)
    noise, seed = _noise_and_seed(noise, x_t, generator, eta > 0)
    args = (model_output, t, t_prev, x_t, noise, seed, eta, *_tables(schedule, DDIM_TABLES), backend)
    return _call(_ddim_step, args, schedule, ((t, "t", False), (t_prev, "t_prev", True)))
