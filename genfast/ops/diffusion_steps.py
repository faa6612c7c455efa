"""The DDPM and DDIM sampler steps as one fused op each, with everything diffusers' ``DDPMScheduler.step`` and
``DDIMScheduler.step`` do to x̂₀ — three prediction types, clipping, dynamic thresholding — computed in the same
pass, and the per-sample dynamic threshold as one small reduction before it. The maths is stated once, in
:mod:`genfast.reference.diffusion`; the argument checks the diffusion ops share are in :mod:`genfast.ops.diffusion`."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .._backend import FusedOp, run
from .._shared import PREDICTION_TYPES, VARIANCE_TYPES, compute_dtype
from .._validation import (
    assert_all, batch_major, check_choice, check_float_tensor, check_like, check_timesteps_before,
    check_timesteps_not_after, match_layout,
)
from ..composite import diffusion as composite
from ..schedule import NoiseSchedule, _check_real
from .diffusion import (
    OP, Q_SAMPLE_TABLES, STEP_TABLES, Timesteps, _call, _noise_and_seed, _prepare, _tables, _timesteps,
)

# ---- the sampler steps: x_prev = A·x_t + B·y + C·x̂₀' + σ·z, one backward launch for (dy, dx_t) ------------------
# Their settings (prediction type, variance type / use_clipped_model_output, clip) are plain arguments; a thresholded
# step takes the per-sample threshold s of dynamic_threshold as a tensor, a constant of its backward.


def _step_grads(ctx, grad, x_index: int, backward_op):
    """(dy, dx_t) of a sampler step from ``backward_op``, or Nones when neither input needs a gradient. The model
    output and x_t are saved (and read by the backward) only when x̂₀ is clipped or thresholded; grad is then put
    in x_t's layout, which the kernels index all three by."""
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[x_index]):
        return None, None
    model_output, x_t, *rest = ctx.saved_tensors
    grad = batch_major(grad) if x_t is None else match_layout(grad, x_t)
    return backward_op(grad, model_output, x_t, *rest, *ctx.settings, ctx.backend)


def _save_step(ctx, model_output, x_t, threshold, clip, *rest):
    clipped = clip is not None or threshold is not None
    ctx.save_for_backward(model_output if clipped else None, x_t if clipped else None, threshold, *rest)


def _step_fake_backward(grad, *args):
    return torch.empty_like(grad), torch.empty_like(grad)


@torch.library.custom_op("genfast::ddpm_step", mutates_args=())
def _ddpm_step_op(
    model_output: Tensor, t: Tensor, t_prev: Optional[Tensor], x_t: Tensor, noise: Optional[Tensor],
    seed: Optional[Tensor], threshold: Optional[Tensor], alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, prediction_type: str, variance_type: str, clip: Optional[float],
    backend: str,
) -> Tensor:
    return run(OP, "ddpm_step", model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod,
               sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type, variance_type, clip, backend)


@_ddpm_step_op.register_fake
def _(model_output, t, t_prev, x_t, *args):
    return torch.empty_like(x_t)


@torch.library.custom_op("genfast::ddpm_step_backward", mutates_args=())
def _ddpm_step_backward_op(
    grad: Tensor, model_output: Optional[Tensor], x_t: Optional[Tensor], threshold: Optional[Tensor], t: Tensor,
    t_prev: Optional[Tensor], alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, prediction_type: str, variance_type: str, clip: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run(OP, "ddpm_step_backward", grad, model_output, x_t, threshold, t, t_prev, alphas_cumprod,
               sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type, variance_type, clip, backend)


_ddpm_step_backward_op.register_fake(_step_fake_backward)


def _ddpm_setup(ctx, inputs, output):
    model_output, t, t_prev, x_t, noise, seed, threshold, *tables, prediction_type, variance_type, clip, backend = inputs
    _save_step(ctx, model_output, x_t, threshold, clip, t, t_prev, *tables)
    ctx.settings, ctx.backend = (prediction_type, variance_type, clip), backend


def _ddpm_backward(ctx, grad):
    grad_model_output, grad_x = _step_grads(ctx, grad, 3, _ddpm_step_grad)
    return (grad_model_output, None, None, grad_x) + (None,) * 10


_ddpm_step = FusedOp(_ddpm_step_op, OP, "ddpm_step", setup_context=_ddpm_setup, backward=_ddpm_backward)
_ddpm_step_grad = FusedOp(_ddpm_step_backward_op, OP, "ddpm_step_backward")


@torch.library.custom_op("genfast::ddim_step", mutates_args=())
def _ddim_step_op(
    model_output: Tensor, t: Tensor, t_prev: Tensor, x_t: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
    threshold: Optional[Tensor], alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor, eta: float, prediction_type: str, use_clipped_model_output: bool,
    clip: Optional[float], backend: str,
) -> Tensor:
    return run(OP, "ddim_step", model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod,
               sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, eta, prediction_type, use_clipped_model_output,
               clip, backend)


@_ddim_step_op.register_fake
def _(model_output, t, t_prev, x_t, *args):
    return torch.empty_like(x_t)


@torch.library.custom_op("genfast::ddim_step_backward", mutates_args=())
def _ddim_step_backward_op(
    grad: Tensor, model_output: Optional[Tensor], x_t: Optional[Tensor], threshold: Optional[Tensor], t: Tensor,
    t_prev: Tensor, alphas_cumprod: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
    eta: float, prediction_type: str, use_clipped_model_output: bool, clip: Optional[float], backend: str,
) -> tuple[Tensor, Tensor]:
    return run(OP, "ddim_step_backward", grad, model_output, x_t, threshold, t, t_prev, alphas_cumprod,
               sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, eta, prediction_type, use_clipped_model_output,
               clip, backend)


_ddim_step_backward_op.register_fake(_step_fake_backward)


def _ddim_setup(ctx, inputs, output):
    (model_output, t, t_prev, x_t, noise, seed, threshold, *tables, eta, prediction_type, use_clipped_model_output,
     clip, backend) = inputs
    _save_step(ctx, model_output, x_t, threshold, clip, t, t_prev, *tables)
    ctx.settings, ctx.backend = (eta, prediction_type, use_clipped_model_output, clip), backend


def _ddim_backward(ctx, grad):
    grad_model_output, grad_x = _step_grads(ctx, grad, 3, _ddim_step_grad)
    return (grad_model_output, None, None, grad_x) + (None,) * 11


_ddim_step = FusedOp(_ddim_step_op, OP, "ddim_step", setup_context=_ddim_setup, backward=_ddim_backward)
_ddim_step_grad = FusedOp(_ddim_step_backward_op, OP, "ddim_step_backward")


# ---- the dynamic threshold of x̂₀: s_b = clamp(quantile(|x̂₀_b|, ratio), 1, max_value), no gradient --------------


@torch.library.custom_op("genfast::dynamic_threshold", mutates_args=())
def _dynamic_threshold_op(
    model_output: Tensor, t: Tensor, x_t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
    prediction_type: str, ratio: float, max_value: float, backend: str,
) -> Tensor:
    return run(OP, "dynamic_threshold", model_output, t, x_t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
               prediction_type, ratio, max_value, backend)


@_dynamic_threshold_op.register_fake
def _(model_output, t, x_t, *args):
    return x_t.new_empty((x_t.shape[0],), dtype=compute_dtype(x_t))


_dynamic_threshold = FusedOp(_dynamic_threshold_op, OP, "dynamic_threshold")


# ---- argument checks and the public functions ------------------------------------------------------------------


def _prepare_step(model_output, t, x_t, schedule, noise, generator):
    """The shared checks (:func:`genfast.ops.diffusion._prepare`) for a sampler step, with ``model_output`` checked
    against x_t and put in its layout."""
    check_float_tensor(x_t, "x_t", min_dim=1)
    check_like(model_output, "model_output", x_t, "x_t", same_dtype=True)
    x_t, t, noise, backend = _prepare(x_t, "x_t", schedule, t, noise, generator)
    return match_layout(model_output, x_t), t, x_t, noise, backend


def _x0_settings(prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                 sample_max_value):
    """(clip, threshold) of a step's x̂₀ handling, every argument checked: clip the float r of clamp(x̂₀, −r, r)
    or None, threshold (ratio, max_value) of dynamic thresholding or None; thresholding wins over clipping, as in
    diffusers."""
    check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    for flag, name in ((clip_sample, "clip_sample"), (thresholding, "thresholding")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    clip = _check_real(clip_sample_range, "clip_sample_range")
    if not clip > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip}")
    ratio = _check_real(dynamic_thresholding_ratio, "dynamic_thresholding_ratio")
    if not 0 <= ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1] (a quantile), got {ratio}")
    max_value = _check_real(sample_max_value, "sample_max_value")
    if not max_value > 0:
        raise ValueError(f"sample_max_value must be > 0, got {max_value}")
    if thresholding:
        return None, (ratio, max_value)
    return (clip if clip_sample else None), None


def _threshold(model_output, t, x_t, schedule, prediction_type, threshold, backend):
    """The per-sample s (B,) of dynamic thresholding (a constant of the step's backward: computed from detached
    inputs), or None without thresholding. s = clamp(quantile, 1, max_value) is max_value whatever the quantile
    when max_value ≤ 1 (diffusers' default 1.0: thresholding is then clipping to ±max_value, scaled): no reduction
    runs."""
    if threshold is None:
        return None
    if threshold[1] <= 1:
        return torch.full((x_t.shape[0],), threshold[1], dtype=compute_dtype(x_t), device=x_t.device)
    args = (model_output.detach(), t, x_t.detach(), *_tables(schedule, Q_SAMPLE_TABLES), prediction_type, *threshold,
            backend)
    return _call(_dynamic_threshold, args, schedule, ((t, "t", False),))


def dynamic_threshold(model_output: Tensor, t: Timesteps, x_t: Tensor, schedule: NoiseSchedule, *,
                      prediction_type: str = "epsilon", dynamic_thresholding_ratio: float = 0.995,
                      sample_max_value: float = 1.0) -> Tensor:
    """The per-sample threshold s (B,) of Imagen's dynamic thresholding (Saharia et al. 2022), as the steps use it
    with ``thresholding=True``: s = clamp(quantile(|x̂₀|, ratio), 1, ``sample_max_value``) over each sample's
    elements, the quantile as torch.quantile computes it, x̂₀ from the model output by ``prediction_type``. fp32
    (fp64 for fp64 inputs); nothing is read back to the host; not differentiable (a constant of the steps'
    backward)."""
    _, threshold = _x0_settings(prediction_type, False, 1.0, True, dynamic_thresholding_ratio, sample_max_value)
    model_output, t, x_t, _, backend = _prepare_step(model_output, t, x_t, schedule, None, None)
    if backend == "torch":
        return composite.dynamic_threshold(model_output.detach(), t, x_t.detach(), schedule, prediction_type,
                                           *threshold)
    return _threshold(model_output, t, x_t, schedule, prediction_type, threshold, backend)


X0_HANDLING_DOC = """
    How x̂₀ is formed and handled before the update, with diffusers' names and defaults:

    - ``prediction_type``: what ``model_output`` is — "epsilon" (ε̂, default), "v_prediction" (v̂ = √ᾱ_t·ε̂ −
      √(1−ᾱ_t)·x̂₀) or "sample" (x̂₀).
    - ``clip_sample`` (default True) clamps x̂₀ to [−``clip_sample_range``, ``clip_sample_range``] (default 1.0), as
      diffusers and Ho et al. do: pixel-space models need it, latent models pass ``clip_sample=False``.
    - ``thresholding`` (default False; wins over clip_sample) is Imagen's dynamic thresholding: per sample, s =
      clamp(quantile(|x̂₀|, ``dynamic_thresholding_ratio``), 1, ``sample_max_value``) (defaults 0.995, 1.0; the
      quantile as torch.quantile computes it), and x̂₀ becomes clamp(x̂₀, −s, s)/s. s comes from one extra
      reduction over x_t and the model output before the step (no value is read back to the host).

    Gradients: a clipped or thresholded x̂₀ passes no gradient where it was clamped (outside the range), and the
    threshold s is a constant of the backward (as if computed under ``torch.no_grad``; autograd through diffusers'
    ``torch.quantile`` would also pass a gradient through s, where 1 < s < sample_max_value).
"""


def ddpm_step(model_output: Tensor, t: Timesteps, x_t: Tensor, schedule: NoiseSchedule,
              noise: Optional[Tensor] = None, *, t_prev: Optional[Timesteps] = None, prediction_type: str = "epsilon",
              variance_type: str = "fixed_small", clip_sample: bool = True, clip_sample_range: float = 1.0,
              thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """One DDPM ancestral step from t to ``t_prev`` (default t − 1; fewer sampling steps give a larger stride, as
    diffusers' ``DDPMScheduler.set_timesteps``), as ``DDPMScheduler.step`` computes it (Ho et al. 2020):

        x̂₀ from the model output (clipped or thresholded),  β' = 1 − ᾱ_t/ᾱ_p,
        x_prev = √ᾱ_p·β'/(1−ᾱ_t)·x̂₀ + √(ᾱ_t/ᾱ_p)·(1−ᾱ_p)/(1−ᾱ_t)·x_t + σ·z

    with ᾱ_p = ᾱ_{t_prev} (1 when t_prev < 0) and σ² = (1−ᾱ_p)/(1−ᾱ_t)·β' (``variance_type="fixed_small"``, the
    posterior variance β̃) or β' ("fixed_large"); no noise at t = 0. ``t`` is an int or an integer tensor (B,) in
    [0, T); ``t_prev`` likewise, < t. z is ``noise`` when given (a constant: one that requires grad is refused),
    else Philox noise drawn in the kernel from a seed taken from ``generator`` (torch's default when None).
    Differentiable in model_output and x_t.
    """
    check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    clip, threshold = _x0_settings(prediction_type, clip_sample, clip_sample_range, thresholding,
                                   dynamic_thresholding_ratio, sample_max_value)
    noisy = not (isinstance(t, numbers.Integral) and t == 0)
    on_host = all(isinstance(v, numbers.Integral) for v in (t, t_prev))
    if t_prev is not None and on_host:
        check_timesteps_before(t_prev, t)
    model_output, t, x_t, noise, backend = _prepare_step(model_output, t, x_t, schedule, noise, generator)
    checked = ((t, "t", False),)
    if t_prev is not None:
        t_prev = _timesteps(t_prev, "t_prev", x_t, schedule.num_steps, backend, allow_negative=True)
        checked += ((t_prev, "t_prev", True),)
        if not on_host:  # the kernels do not check this one
            check_timesteps_before(t_prev, t)
    if backend == "torch":
        return composite.ddpm_step(model_output, t, t_prev, x_t, schedule, noise, prediction_type=prediction_type,
                                   variance_type=variance_type, clip=clip, threshold=threshold, generator=generator)
    s = _threshold(model_output, t, x_t, schedule, prediction_type, threshold, backend)
    noise, seed = _noise_and_seed(noise, x_t, generator, noisy)
    args = (model_output, t, t_prev, x_t, noise, seed, s, *_tables(schedule, STEP_TABLES), prediction_type,
            variance_type, clip, backend)
    return _call(_ddpm_step, args, schedule, checked)


def ddim_step(model_output: Tensor, t: Timesteps, t_prev: Timesteps, x_t: Tensor, schedule: NoiseSchedule,
              eta: float = 0.0, noise: Optional[Tensor] = None, *, prediction_type: str = "epsilon",
              clip_sample: bool = True, clip_sample_range: float = 1.0, thresholding: bool = False,
              dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              use_clipped_model_output: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """One DDIM step from t to t_prev (Song et al. 2021), as ``DDIMScheduler.step`` computes it:

        x̂₀, ε̂ from the model output (x̂₀ clipped or thresholded),  σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p),
        x_prev = √ᾱ_p·x̂₀ + √(1−ᾱ_p−σ²)·ε̂ + σ·z

    with ᾱ_p = ᾱ_{t_prev}, and ᾱ_p = 1 when t_prev < 0 (the last step; diffusers' ``set_alpha_to_one``).
    ``use_clipped_model_output`` recomputes ε̂ from the clipped x̂₀, ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t). ``t`` in
    [0, T) and ``t_prev`` < T are ints or integer tensors (B,). ``eta`` in [0, 1]; with eta = 0 the step is
    deterministic and ``noise`` is unused (then t_prev > t, DDIM inversion, is allowed too); eta > 0 needs
    t_prev ≤ t. z is ``noise`` when given (a constant: one that requires grad is refused), else Philox noise from
    ``generator`` as in :func:`ddpm_step`. Differentiable in model_output and x_t.
    """
    eta = _check_real(eta, "eta")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (1: the DDPM posterior variance), got {eta}")
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError(f"use_clipped_model_output must be a bool, got {type(use_clipped_model_output).__name__}")
    clip, threshold = _x0_settings(prediction_type, clip_sample, clip_sample_range, thresholding,
                                   dynamic_thresholding_ratio, sample_max_value)
    on_host = all(isinstance(v, numbers.Integral) for v in (t, t_prev))
    if eta > 0 and on_host:
        check_timesteps_not_after(t_prev, t)
    model_output, t, x_t, noise, backend = _prepare_step(model_output, t, x_t, schedule, noise, generator)
    t_prev = _timesteps(t_prev, "t_prev", x_t, schedule.num_steps, backend, allow_negative=True)
    if eta > 0 and not on_host:  # the kernels do not check this one
        check_timesteps_not_after(t_prev, t)
    if backend == "torch":
        return composite.ddim_step(model_output, t, t_prev, x_t, schedule, eta, noise,
                                   prediction_type=prediction_type, use_clipped_model_output=use_clipped_model_output,
                                   clip=clip, threshold=threshold, generator=generator)
    s = _threshold(model_output, t, x_t, schedule, prediction_type, threshold, backend)
    noise, seed = _noise_and_seed(noise, x_t, generator, eta > 0)
    args = (model_output, t, t_prev, x_t, noise, seed, s, *_tables(schedule, STEP_TABLES), eta, prediction_type,
            use_clipped_model_output, clip, backend)
    return _call(_ddim_step, args, schedule, ((t, "t", False), (t_prev, "t_prev", True)))


ddpm_step.__doc__ += X0_HANDLING_DOC
ddim_step.__doc__ += X0_HANDLING_DOC
