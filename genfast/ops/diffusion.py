"""Diffusion ops: forward noising q(x_t | x_0) and the training loss with the noise never stored, and the argument
checks the sampler steps (:mod:`genfast.ops.diffusion_steps`) share. Schedules are :class:`genfast.NoiseSchedule`
(float64 tables indexed by timestep)."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._backend import FusedOp, resolve_backend, run
from .._rng import draw, draw_seed
from .._shared import PREDICTION_TYPES, compute_dtype
from .._validation import (
    INTEGER_DTYPES, batch_major, check_choice, check_float_tensor, check_generator, check_like, check_noise,
    check_timesteps_range, match_layout,
)
from ..composite import diffusion as composite
from ..schedule import NoiseSchedule

OP = "diffusion"  # its module's name in every layer: kernels/, genfast/reference/, csrc/cpu/, ...
Timesteps = Union[int, Tensor]
# the schedule tables each op reads, in its registered op's order
Q_SAMPLE_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")  # also the loss's
STEP_TABLES = ("alphas_cumprod",) + Q_SAMPLE_TABLES  # the DDPM and DDIM steps

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


# ---- the training loss: mean((y − target)²), target = u·ε + w·x₀ with ε regenerated from the seed ----------------


@torch.library.custom_op("genfast::target_mse", mutates_args=())
def _target_mse_op(
    model_output: Tensor, seed: Tensor, x0: Optional[Tensor], t: Tensor, sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, prediction_type: str, backend: str,
) -> Tensor:
    return run(OP, "target_mse", model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
               prediction_type, backend)


@_target_mse_op.register_fake
def _(model_output, *args):
    return model_output.new_empty((), dtype=compute_dtype(model_output))


@torch.library.custom_op("genfast::target_mse_backward", mutates_args=())
def _target_mse_backward_op(
    grad_loss: Tensor, model_output: Tensor, seed: Tensor, x0: Optional[Tensor], t: Tensor,
    sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor, prediction_type: str, backend: str,
) -> Tensor:
    return run(OP, "target_mse_backward", grad_loss, model_output, seed, x0, t, sqrt_alphas_cumprod,
               sqrt_one_minus_alphas_cumprod, prediction_type, backend)


@_target_mse_backward_op.register_fake
def _(grad_loss, model_output, *args):
    return torch.empty_like(model_output)


def _target_mse_setup(ctx, inputs, output):
    model_output, seed, x0, t, sqrt_ac, sqrt_1m_ac, prediction_type, backend = inputs
    ctx.save_for_backward(model_output, seed, x0, t, sqrt_ac, sqrt_1m_ac)
    ctx.prediction_type, ctx.backend = prediction_type, backend


def _target_mse_backward(ctx, grad_loss):
    model_output, seed, x0, t, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
    grad = _target_mse_grad(grad_loss, model_output, seed, x0, t, sqrt_ac, sqrt_1m_ac, ctx.prediction_type,
                            ctx.backend)
    grad_x0 = None
    if ctx.needs_input_grad[2]:  # the target's w·x₀: dx₀ = −w·dy, w = −√(1−ᾱ_t) (v) or 1 (x₀)
        w = -sqrt_1m_ac[t] if ctx.prediction_type == "v_prediction" else torch.ones_like(sqrt_1m_ac[t])
        grad_x0 = (-w.to(compute_dtype(grad)).view((-1,) + (1,) * (grad.dim() - 1)) * grad).to(x0.dtype)
    return grad if ctx.needs_input_grad[0] else None, None, grad_x0, None, None, None, None, None


_target_mse = FusedOp(_target_mse_op, OP, "target_mse", setup_context=_target_mse_setup,
                      backward=_target_mse_backward)
_target_mse_grad = FusedOp(_target_mse_backward_op, OP, "target_mse_backward")


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
                   t: Optional[Timesteps] = None, prediction_type: str = "epsilon",
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """The DDPM loss mean((y − target)²) with y = model(x_t, t), x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε: a 0-dim fp32 tensor
    (fp64 for an fp64 y). The target follows ``prediction_type`` (diffusers' names): ε for "epsilon" (Ho et al.),
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 for "v_prediction" (Salimans & Ho 2022), x_0 for "sample". ``t`` (B,) is drawn
    uniformly in [0, T) from ``generator`` when None, then the noise seed is drawn from it. ε is Philox noise that
    is never written to memory: the noising writes only x_t and the loss regenerates ε in its forward and
    backward. Gradients reach the model through y, and x0 (when it requires grad) through x_t and the target."""
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    x0, t, _, backend = _prepare(x0, "x0", schedule, t, None, generator, draw_t=True)
    if x0.numel() == 0:
        raise ValueError(f"x0 must have at least one element: the loss is a mean, got shape {tuple(x0.shape)}")
    if backend == "torch":
        return composite.diffusion_loss(_checked_model(model, x0), x0, schedule, t=t, prediction_type=prediction_type,
                                        generator=generator)
    seed = draw_seed(x0.device, generator)
    tables = _tables(schedule, Q_SAMPLE_TABLES)
    x_t = _call(_q_sample, (x0, t, None, seed, *tables, backend), schedule, ((t, "t", False),))
    output = _checked_model(model, x0)(x_t, t)
    # the noise stream is indexed by memory position: y (and x0, for a target that reads it) must be laid out like x_t
    output = match_layout(output, x_t)
    target_x0 = None if prediction_type == "epsilon" else match_layout(x0, output, dtype=x0.dtype)
    return _target_mse(output, seed, target_x0, t, *tables, prediction_type,
                       resolve_backend(output.device, output.dtype, OP))


def _checked_model(model, x0: Tensor):
    """``model`` whose output is checked to be a float tensor of x0's shape on its device."""
    def run(x_t, t):
        output = model(x_t, t)
        check_like(output, "model(x_t, t)", x0, "x0")
        return output

    return run
