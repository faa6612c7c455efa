"""genfast inside diffusers models and schedulers, without changing their weights, state_dict or results.

- :func:`apply_genfast` / :func:`revert_genfast` for ``UNet2DModel``, ``UNet2DConditionModel`` and ``AutoencoderKL``
  (and any model built from the same blocks): every ``ResnetBlock2D`` whose norms are ``nn.GroupNorm`` and whose
  nonlinearity is ``nn.SiLU`` runs its two norm → SiLU pairs as :func:`genfast.group_norm_silu`, the second one
  with the time-embedding add (``time_embedding_norm="default"``) or the scale-shift (``"scale_shift"``) fused in;
  the final ``conv_norm_out`` → ``conv_act`` pair of the UNets and of the VAE encoder/decoder becomes a
  :class:`genfast.nn.GroupNormSiLU`; ``AutoencoderKL.encode`` returns a posterior whose ``sample`` is the fused
  :func:`genfast.reparameterize` with in-kernel noise.
- :class:`GenfastDDPMScheduler` / :class:`GenfastDDIMScheduler`: ``add_noise`` and ``step`` run the fused
  :func:`genfast.q_sample` / :func:`genfast.ddpm_step` / :func:`genfast.ddim_step` — diffusers' defaults included
  (ε-prediction with x̂₀ clipped), and v-prediction, sample prediction, dynamic thresholding — and fall back to
  diffusers' own code for the configurations those ops do not cover (each class's docstring lists them).

Needs the ``diffusers`` extra: ``pip install "genfast[diffusers]"``.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

try:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
except ImportError as exc:  # not installed, or an install without these classes
    raise ImportError(
        f'genfast.integrations.diffusers needs diffusers: pip install "genfast[diffusers]" ({exc})'
    ) from exc

from .._validation import check_timesteps_range
from ..composite import diffusion as composite
from ..ops.diffusion import q_sample
from ..ops.diffusion_steps import _x0_settings, ddim_step, ddpm_step, dynamic_threshold
from ..ops.group_norm_silu import group_norm_silu
from ..ops.reparameterize import reparameterize
from ..patching import fusable_pair, fuse_pair, unfuse_pair
from ..schedule import NoiseSchedule

__all__ = [
    "apply_genfast", "revert_genfast", "FusedResnetBlock2D", "FusedDiagonalGaussianDistribution",
    "GenfastDDPMScheduler", "GenfastDDIMScheduler",
]

# ---- ResnetBlock2D ---------------------------------------------------------------------------------------------


class FusedResnetBlock2D(ResnetBlock2D):
    """``ResnetBlock2D`` with diffusers' forward reproduced on genfast ops (same modules, parameters and
    state_dict). :func:`apply_genfast` switches a block's class to this one and :func:`revert_genfast` back:

        h = silu(GroupNorm₁(x));  up/downsample h and x;  h = conv1(h)
        e = time_emb_proj(silu(temb))                        (silu skipped when skip_time_act)
        h = silu(GroupNorm₂(h + e))                          time_embedding_norm="default"
        h = silu(GroupNorm₂(h)·(1 + e_scale) + e_shift)      "scale_shift", (e_scale, e_shift) = chunk(e, 2)
        out = (shortcut(x) + conv2(dropout(h))) / output_scale_factor

    Calls the fused ops cannot express (a temb whose batch differs from x's, a raw temb without time_emb_proj,
    a missing temb in scale_shift mode, the deprecated ``scale`` argument) run diffusers' own forward."""

    def _fusable_call(self, input_tensor: Tensor, temb: Optional[Tensor], args, kwargs) -> bool:
        if args or kwargs.get("scale") is not None:
            return False
        if self.time_embedding_norm not in ("default", "scale_shift"):
            return False
        if temb is None:  # diffusers fails on a missing temb when the block projects one
            return self.time_embedding_norm == "default" and self.time_emb_proj is None
        return self.time_emb_proj is not None and temb.shape[0] == input_tensor.shape[0]

    def forward(self, input_tensor: Tensor, temb: Optional[Tensor], *args, **kwargs) -> Tensor:
        if not self._fusable_call(input_tensor, temb, args, kwargs):
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden_states = _norm_silu(self.norm1, input_tensor)
        if self.upsample is not None:
            # as diffusers does: upsample_nearest_nhwc fails with large batch sizes (diffusers issue 984)
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        add = scale = shift = None
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb).to(hidden_states.dtype)
            if self.time_embedding_norm == "default":
                add = temb
            else:
                scale, shift = torch.chunk(temb, 2, dim=1)
        hidden_states = _norm_silu(self.norm2, hidden_states, add=add, scale=scale, shift=shift)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:  # as diffusers does, for DDP's gradient strides
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


def _norm_silu(norm: nn.GroupNorm, x: Tensor, **modulation) -> Tensor:
    """silu(norm(x [+ add]) [·(1 + scale) + shift]) in one op, with ``norm``'s groups, eps and parameters."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, **modulation)


def _fusable_resnet(block: nn.Module) -> bool:
    """A plain ResnetBlock2D (not a subclass, no instance-level forward such as accelerate's hooks) with
    GroupNorm norms and a SiLU nonlinearity, none of them hooked."""
    return (type(block) is ResnetBlock2D and "forward" not in block.__dict__
            and fusable_pair(block.norm1, block.nonlinearity) and fusable_pair(block.norm2, block.nonlinearity))


# ---- the conv_norm_out → conv_act pairs ------------------------------------------------------------------------

# Models whose forward runs ``conv_act(conv_norm_out(x))`` and uses conv_act nowhere else.
_FINAL_NORM_ACT_OWNERS = (UNet2DModel, UNet2DConditionModel, Encoder, Decoder)


def _owns_final_pair(module: nn.Module) -> bool:
    return (type(module) in _FINAL_NORM_ACT_OWNERS
            and fusable_pair(module._modules.get("conv_norm_out"), module._modules.get("conv_act")))


# ---- AutoencoderKL's posterior ---------------------------------------------------------------------------------


class FusedDiagonalGaussianDistribution(DiagonalGaussianDistribution):
    """diffusers' posterior with ``sample`` = μ + exp(½·logvar)·ε in one op (:func:`genfast.reparameterize`), ε
    Philox noise drawn in the kernel from a seed taken from ``generator`` (torch's default when None), never
    stored. The values differ from diffusers' ``torch.randn`` draws (another stream of N(0, 1) noise); a
    deterministic posterior and a list of per-sample generators use diffusers' own ``sample``."""

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.deterministic or not (generator is None or isinstance(generator, torch.Generator)):
            return super().sample(generator)
        return reparameterize(self.mean, self.logvar, generator=generator)


def _encode_with_fused_posterior(vae: AutoencoderKL, x: Tensor, return_dict: bool = True):
    """``AutoencoderKL.encode`` whose posterior is a :class:`FusedDiagonalGaussianDistribution`."""
    output = type(vae).encode(vae, x, return_dict=return_dict)
    posterior = output.latent_dist if return_dict else output[0]
    # the same object, its class switched: nothing recomputed
    posterior.__class__ = FusedDiagonalGaussianDistribution
    return output


def _is_fused_encode(vae: nn.Module) -> bool:
    encode = vae.__dict__.get("encode")
    return isinstance(encode, functools.partial) and encode.func is _encode_with_fused_posterior


def _fusable_vae(module: nn.Module) -> bool:
    return (isinstance(module, AutoencoderKL) and type(module).encode is AutoencoderKL.encode
            and "encode" not in module.__dict__)


# ---- apply / revert --------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers UNet2DModel, UNet2DConditionModel or "
                        f"AutoencoderKL), got {type(model).__name__}")


def apply_genfast(model: nn.Module) -> nn.Module:
    """Run ``model``'s GroupNorm → SiLU pairs, time-embedding adds / scale-shifts and (AutoencoderKL) posterior
    sampling on genfast's fused ops, in place; returns ``model``. Made for ``UNet2DModel``,
    ``UNet2DConditionModel`` and ``AutoencoderKL``; in any other model the same blocks (``ResnetBlock2D``, the VAE
    ``Encoder`` / ``Decoder``) are fused too, and everything else is left alone: GroupNorms followed by something
    other than SiLU (attention norms), other activations, subclasses, hooked modules.

    Modules, Parameters and state_dict keys are unchanged (a fused final pair keeps ``conv_norm_out.weight`` /
    ``.bias``); outputs and gradients match diffusers up to kernel rounding, except the posterior's ``sample``,
    which draws its noise from genfast's Philox stream. Applying twice is a no-op; undo with
    :func:`revert_genfast`. The ops run on the current genfast backend; ``torch.compile`` traces through them."""
    _check_model(model)
    for module in list(model.modules()):
        if _fusable_resnet(module):
            module.__class__ = FusedResnetBlock2D
        elif _owns_final_pair(module):
            fuse_pair(module, "conv_norm_out", "conv_act")
        if _fusable_vae(module):
            module.encode = functools.partial(_encode_with_fused_posterior, module)
    return model


def revert_genfast(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_genfast`: blocks get diffusers' forward back, the original ``conv_norm_out`` /
    ``conv_act`` module objects return, ``encode`` is diffusers' again; returns ``model``."""
    _check_model(model)
    for module in list(model.modules()):
        if type(module) is FusedResnetBlock2D:
            module.__class__ = ResnetBlock2D
        elif type(module) in _FINAL_NORM_ACT_OWNERS:
            unfuse_pair(module, "conv_norm_out", "conv_act")
        if _is_fused_encode(module):
            del module.encode
    return model


# ---- schedulers ------------------------------------------------------------------------------------------------

# diffusers' DDPM variance types and the fused step's: "fixed_small_log" is fixed_small's σ computed as
# exp(½·log σ²), the same value; "fixed_large_log" (NaN in diffusers' step for β < 1) and the learned variances fall
# back to diffusers
_FUSED_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


class _FusedSchedulerMixin:
    """``add_noise`` on :func:`genfast.q_sample`, the NoiseSchedule the fused steps index (built in float64 from the
    scheduler's ``betas`` once per device), and the x̂₀ settings of the config as the steps' keyword arguments."""

    def genfast_schedule(self, device: torch.device) -> Optional[NoiseSchedule]:
        """The :class:`genfast.NoiseSchedule` of ``self.betas`` on ``device``, or None when a β lies outside
        (0, 1) (``rescale_betas_zero_snr`` makes the last β = 1), which the fused ops do not take."""
        cache = self.__dict__.setdefault("_genfast_schedules", {})
        device = torch.device(device)
        if device not in cache:
            betas = self.betas.to(torch.float64)
            valid = bool(((betas > 0) & (betas < 1)).all())
            cache[device] = NoiseSchedule(betas=betas).to(device) if valid else None
        return cache[device]

    def genfast_settings(self) -> Optional[dict]:
        """The fused steps' keyword arguments for the config's ``prediction_type``, ``clip_sample`` (+ range) and
        ``thresholding`` (+ ratio, max value), or None where the steps do not take them (an unknown prediction
        type, a non-positive range)."""
        config = self.config
        settings = dict(prediction_type=config.prediction_type, clip_sample=bool(config.clip_sample),
                        clip_sample_range=config.clip_sample_range, thresholding=bool(config.thresholding),
                        dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
                        sample_max_value=config.sample_max_value)
        try:
            _x0_settings(**settings)
        except (TypeError, ValueError):
            return None
        return settings

    def _pred_original_sample(self, schedule: NoiseSchedule, t, sample: Tensor, model_output: Tensor,
                              settings: dict) -> Tensor:
        """x̂₀ as diffusers returns it next to prev_sample — from the prediction type, clipped or thresholded —
        with the coefficients gathered on the device and the threshold from :func:`genfast.dynamic_threshold`
        (nothing is read back). Not fused: a few elementwise torch passes beside the step's one kernel, and with
        thresholding the threshold's reduction a second time (the step finds its own)."""
        x0 = composite.x0_and_eps(model_output, t, sample, schedule, settings["prediction_type"])[0]
        s = None
        if settings["thresholding"]:
            s = dynamic_threshold(model_output, t, sample, schedule, prediction_type=settings["prediction_type"],
                                  dynamic_thresholding_ratio=settings["dynamic_thresholding_ratio"],
                                  sample_max_value=settings["sample_max_value"])
        clip = settings["clip_sample_range"] if settings["clip_sample"] else None
        return composite.handled_x0(x0, clip, s)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """√ᾱ_t·x_0 + √(1−ᾱ_t)·noise with :func:`genfast.q_sample`; ``timesteps`` an integer tensor of one
        timestep or one per sample (B,). Other timestep shapes and schedules the fused op does not take use
        diffusers' code."""
        schedule = self.genfast_schedule(original_samples.device)
        fusable = (schedule is not None and original_samples.dim() >= 1 and isinstance(noise, Tensor)
                   and noise.shape == original_samples.shape and isinstance(timesteps, Tensor)
                   and not timesteps.is_floating_point() and timesteps.numel() in (1, original_samples.shape[0])
                   and timesteps.dim() <= 1)
        if not fusable:
            return super().add_noise(original_samples, noise, timesteps)
        t = timesteps.to(original_samples.device, torch.int64).reshape(-1).expand(original_samples.shape[0])
        return q_sample(original_samples, t, schedule, noise)


def _timestep_int(timestep) -> Optional[int]:
    """``timestep`` as an int when it is an int, else None."""
    if isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool):
        return int(timestep)
    return None


def _timestep_tensor(timestep) -> bool:
    return (isinstance(timestep, Tensor) and timestep.numel() == 1 and not timestep.is_floating_point()
            and not timestep.is_complex() and timestep.dtype != torch.bool)


def _timestep_batch(timestep: Tensor, sample: Tensor) -> Tensor:
    """A one-element integer tensor as the (B,) int64 timesteps of ``sample`` on its device, never read back: the
    fused ops check its range on the device, so a step with it can be captured in a CUDA graph."""
    return timestep.to(sample.device, torch.int64).reshape(1).expand(sample.shape[0])


def _single_generator(generator) -> bool:
    return generator is None or isinstance(generator, torch.Generator)


class GenfastDDPMScheduler(_FusedSchedulerMixin, DDPMScheduler):
    """``DDPMScheduler`` whose ``add_noise`` is :func:`genfast.q_sample` and whose ``step`` is
    :func:`genfast.ddpm_step` — one kernel for ``prev_sample``, x̂₀ handled inside it, the variance noise drawn in it
    from a seed taken from ``generator`` (``pred_original_sample`` beside it costs a few torch passes) — for every
    configuration the fused step computes: ``prediction_type`` "epsilon",
    "v_prediction" or "sample"; ``clip_sample`` (any range) or ``thresholding``; ``variance_type`` "fixed_small"
    (the default), "fixed_small_log" or "fixed_large"; all T steps or ``set_timesteps`` with fewer (any spacing,
    custom timesteps too). Build it like the original: ``GenfastDDPMScheduler.from_config(scheduler.config)``.

    Still diffusers' own ``step``: ``variance_type`` "learned", "learned_range" or "fixed_large_log", a model
    output of another shape than the sample (a learned variance's 2·C channels), a list of generators, betas
    outside (0, 1) (``rescale_betas_zero_snr``), a timestep that is neither an int nor a one-element integer
    tensor, and configuration values the step refuses (``tests/test_diffusers_integration.py`` counts both sides).

    The tables are float64 (diffusers' are float32), so results agree to ~1e-3 at the smallest β, closer
    elsewhere; the variance noise is genfast's Philox stream. A one-element tensor ``timestep`` is never read back
    (with ``set_timesteps``, t_prev comes from a device table of the timesteps): ``unet`` + ``step`` can be
    captured in a CUDA graph and replayed with a static timestep tensor (see ``DDPM.sample(cuda_graph=True)``)."""

    def set_timesteps(self, *args, **kwargs):
        """diffusers' ``set_timesteps``, then the table of previous timesteps on the timesteps' device (reading
        them here, so that a step reads nothing)."""
        result = super().set_timesteps(*args, **kwargs)
        self.__dict__.pop("_genfast_previous", None)
        self._previous_table(self.timesteps.device)
        return result

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        schedule = self.genfast_schedule(sample.device)
        settings = self.genfast_settings()
        fusable = (schedule is not None and settings is not None and self.variance_type in _FUSED_VARIANCES
                   and _single_generator(generator) and model_output.shape == sample.shape)
        timesteps = self._fused_timesteps(timestep, sample) if fusable else None
        if timesteps is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        t, t_prev = timesteps
        prev_sample = ddpm_step(model_output, t, sample, schedule, t_prev=t_prev,
                                variance_type=_FUSED_VARIANCES[self.variance_type], generator=generator, **settings)
        pred_original_sample = self._pred_original_sample(schedule, t, sample, model_output, settings)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _fused_timesteps(self, timestep, sample: Tensor):
        """(t, t_prev) for the fused step, or None for diffusers' step. t_prev is None (t − 1) without
        ``set_timesteps``; else the next entry of ``self.timesteps`` (−1 after the last): for an int from
        ``previous_timestep``, for a one-element tensor gathered on the device from a table of the timesteps
        (a timestep not in them gets T there, which the step refuses; one outside [0, T) is refused first, by a
        device-side check, and gathered clamped)."""
        stepping = self.custom_timesteps or self.num_inference_steps
        if _timestep_tensor(timestep):
            t = _timestep_batch(timestep, sample)
            if not stepping:
                return t, None
            check_timesteps_range(t, self.config.num_train_timesteps, "timestep")
            return t, self._previous_table(sample.device)[t.clamp(0, self.config.num_train_timesteps - 1)]
        t = _timestep_int(timestep)
        if t is None or not 0 <= t < self.config.num_train_timesteps:
            return None
        return t, (int(self.previous_timestep(t)) if stepping else None)

    def _previous_table(self, device: torch.device) -> Tensor:
        """previous[t] = the timestep after t in ``self.timesteps`` (−1 after the last), T for the others; made
        once per ``set_timesteps`` and device (a warm-up step makes it for another device before a capture)."""
        cache = self.__dict__.setdefault("_genfast_previous", {})
        device = torch.device(device)
        if device not in cache:
            steps = [int(t) for t in self.timesteps]
            previous = torch.full((self.config.num_train_timesteps,), self.config.num_train_timesteps,
                                  dtype=torch.int64)
            previous[steps] = torch.tensor(steps[1:] + [-1])
            cache[device] = previous.to(device)
        return cache[device]


class GenfastDDIMScheduler(_FusedSchedulerMixin, DDIMScheduler):
    """``DDIMScheduler`` whose ``add_noise`` is :func:`genfast.q_sample` and whose ``step`` is
    :func:`genfast.ddim_step` — one kernel for ``prev_sample``, x̂₀ handled inside it (``pred_original_sample``
    beside it costs a few torch passes); with eta > 0 the noise is ``variance_noise`` or
    drawn in the kernel from a seed taken from ``generator`` — for every configuration the fused step computes:
    ``prediction_type`` "epsilon", "v_prediction" or "sample"; ``clip_sample`` (any range) or ``thresholding``;
    ``use_clipped_model_output``; eta in [0, 1]; ``set_alpha_to_one`` either way (the last step uses ᾱ = 1, or ᾱ_0,
    as diffusers does). Build it with ``GenfastDDIMScheduler.from_config(scheduler.config)``.

    Still diffusers' own ``step``: eta outside [0, 1], a list of generators, both ``generator`` and
    ``variance_noise`` (diffusers raises), betas outside (0, 1), a timestep that is neither an int nor a one-element
    integer tensor, configuration values the step refuses, and ``set_timesteps`` not called (diffusers raises its
    own error). A one-element tensor ``timestep`` is never read back, so ``unet`` + ``step`` can be captured in a
    CUDA graph."""

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[Tensor] = None,
             return_dict: bool = True):
        schedule = self.genfast_schedule(sample.device)
        settings = self.genfast_settings()
        fusable = (schedule is not None and settings is not None and self.num_inference_steps is not None
                   and _single_generator(generator) and not (generator is not None and variance_noise is not None)
                   and isinstance(eta, numbers.Real) and 0 <= eta <= 1 and model_output.shape == sample.shape
                   and isinstance(use_clipped_model_output, bool))
        t = self._fused_timestep(timestep, sample) if fusable else None
        if t is None:
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        t_prev = t - self.config.num_train_timesteps // self.num_inference_steps
        if not self.config.set_alpha_to_one:  # diffusers' final ᾱ is then ᾱ_0
            t_prev = t_prev.clamp(min=0) if isinstance(t_prev, Tensor) else max(t_prev, 0)
        prev_sample = ddim_step(model_output, t, t_prev, sample, schedule, float(eta), variance_noise,
                                use_clipped_model_output=use_clipped_model_output, generator=generator, **settings)
        pred_original_sample = self._pred_original_sample(schedule, t, sample, model_output, settings)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _fused_timestep(self, timestep, sample: Tensor):
        """The timestep the fused step takes, or None for diffusers' step: a one-element integer tensor as (B,)
        timesteps on the device, never read back (its range is checked by the op); else an int in [0, T)."""
        if _timestep_tensor(timestep):
            return _timestep_batch(timestep, sample)
        t = _timestep_int(timestep)
        return t if t is not None and 0 <= t < self.config.num_train_timesteps else None
