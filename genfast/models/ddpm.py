"""DDPM (Ho et al. 2020): a denoising network (predicting ε, v or x₀) and a noise schedule, trained with the fused
:func:`genfast.diffusion_loss` and sampled with :func:`genfast.ddpm_step` or :func:`genfast.ddim_step` — x̂₀ clipped
to the image range by default, as diffusers' schedulers do — step by step or with one denoising step captured in a
CUDA graph and replayed."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from .._shared import PREDICTION_TYPES
from ..ops.diffusion import diffusion_loss
from ..ops.diffusion_steps import ddim_step, ddpm_step
from ..schedule import NoiseSchedule
from ._common import check_images, check_positive_int
from .unet import UNet

SAMPLERS = ("ddpm", "ddim")
WARMUP_STEPS = 3  # real steps run uncaptured on a side stream before the capture, as the PyTorch docs warm up


class DDPM(nn.Module):
    """``unet`` (a :class:`UNet`, or any module with ``forward(x_t, t) -> y`` and attributes ``in_channels`` and
    ``image_size``) and ``schedule``, a :class:`genfast.NoiseSchedule` (default ``NoiseSchedule.linear(1000, 1e-4,
    0.02)``, Ho et al.'s), registered as submodules so that ``.to(device)`` moves both. Images live in [-1, 1].

    ``prediction_type`` (diffusers' names) is what the network predicts, used by :meth:`loss` and :meth:`sample`:
    "epsilon" (the noise ε, Ho et al.; the default), "v_prediction" (v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀, Salimans & Ho
    2022) or "sample" (x₀)."""

    def __init__(self, *, unet: UNet, schedule: Optional[NoiseSchedule] = None, prediction_type: str = "epsilon"):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module, got {type(unet).__name__}")
        if schedule is None:
            schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a genfast.NoiseSchedule, got {type(schedule).__name__}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    def extra_repr(self) -> str:
        return f"prediction_type={self.prediction_type!r}"

    def loss(self, x0: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """mean((y − target)²) at timesteps drawn uniformly from [0, T) (:func:`genfast.diffusion_loss`; the
        target ε, v or x₀ by ``prediction_type``), a 0-dim fp32 tensor; t and ε are drawn from ``generator``."""
        return diffusion_loss(self.unet, x0, self.schedule, prediction_type=self.prediction_type, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str = "ddpm", steps: Optional[int] = None, eta: float = 0.0,
               generator: Optional[torch.Generator] = None, progress: bool = False,
               cuda_graph: bool = False, noise: Optional[Tensor] = None, clip_sample: bool = True,
               clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
               sample_max_value: float = 1.0) -> Tensor:
        """``n`` images (n, C, S, S) from x_T ~ N(0, I) drawn with ``generator``, or from ``noise`` (n, C, S, S) when
        given (with the deterministic DDIM, eta = 0, the same x_T gives the same image).

        x̂₀, the clean image each step predicts, is handled as by diffusers' schedulers (same names and defaults):
        ``clip_sample`` clamps it to [−``clip_sample_range``, ``clip_sample_range``] (default on, range 1: images
        live in [-1, 1], and the last step returns x̂₀, so the samples do too); ``thresholding`` applies Imagen's
        dynamic thresholding instead (per sample s = clamp(``dynamic_thresholding_ratio``-quantile of |x̂₀|, 1,
        ``sample_max_value``), x̂₀ ← clamp(x̂₀, −s, s)/s). ``clip_sample=False`` without thresholding leaves x̂₀ and
        the samples unbounded: a latent diffusion model's latents are not images (:class:`LatentDiffusion` samples
        so).

        ``sampler="ddpm"``: ancestral sampling through all T timesteps (``steps`` must be None or T).
        ``sampler="ddim"``: ``steps`` (default 50, at most T) timesteps evenly spaced over [0, T−1] (rounded), from
        the last down to 0, with noise scale ``eta`` (0: deterministic). ``progress`` shows a tqdm bar.

        ``cuda_graph=True``: one denoising step (the U-Net and the fused step) runs on static buffers — x_t and a
        step counter that indexes a device table of the timesteps — and on CUDA, after WARMUP_STEPS real steps on
        a side stream, is captured once in a CUDA graph and replayed for every remaining step. The noise seeds are
        drawn inside the graph from ``generator`` (torch's CUDA generators are graph-safe: a replay draws what the
        eager step would), so the images are those of the plain loop. The capture costs about one step per call.
        On other devices the same static-buffer step runs uncaptured."""
        check_positive_int(n, "n")
        for flag, name in ((cuda_graph, "cuda_graph"), (clip_sample, "clip_sample"), (thresholding, "thresholding")):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        timesteps = self._timesteps(sampler, steps)
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or eta < 0:
            raise ValueError(f"eta must be a real number >= 0, got {eta!r}")
        settings = dict(prediction_type=self.prediction_type, clip_sample=clip_sample,
                        clip_sample_range=clip_sample_range, thresholding=thresholding,
                        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
        from tqdm.auto import tqdm

        parameter = next(self.unet.parameters())
        shape = (n, self.unet.in_channels, self.unet.image_size, self.unet.image_size)
        if noise is None:
            x = torch.randn(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
        else:
            check_images(noise, "noise", channels=shape[1], image_size=shape[2])
            if noise.shape[0] != n:
                raise ValueError(f"noise must hold n = {n} starting points, got {noise.shape[0]}")
            x = noise.to(parameter.device, parameter.dtype, copy=True)
        bar = tqdm(total=len(timesteps), desc=f"{sampler} sampling", unit="step", disable=not progress)
        prev = timesteps[1:] + [-1]
        if cuda_graph:
            x = self._sample_static(x, timesteps, prev, sampler, eta, generator, bar, settings)
        else:
            for t, t_prev in zip(timesteps, prev):
                x = self._step(x, t, t_prev, sampler, eta, generator, settings)
                bar.update()
        bar.close()
        return x

    def _timesteps(self, sampler: str, steps: Optional[int]) -> list[int]:
        """The timesteps ``sampler`` visits, from the last down to 0."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        num_steps = self.schedule.num_steps
        if sampler == "ddpm":
            if steps is not None and steps != num_steps:
                raise ValueError(f"the ddpm sampler runs all T={num_steps} steps: steps must be None or {num_steps}, "
                                 f"got {steps!r} (use sampler='ddim' for fewer)")
            return list(range(num_steps - 1, -1, -1))
        steps = 50 if steps is None else steps
        check_positive_int(steps, "steps")
        if steps > num_steps:
            raise ValueError(f"steps must be <= T={num_steps}, got {steps}")
        return torch.linspace(0, num_steps - 1, steps, dtype=torch.float64).round().long().tolist()[::-1]

    def _step(self, x: Tensor, t, t_prev, sampler: str, eta: float, generator, settings: dict) -> Tensor:
        """x_{t_prev} from x_t; ``t`` and ``t_prev`` (DDIM only) ints or (n,) tensors; ``settings`` the prediction
        type and x̂₀ handling of the steps."""
        t_batch = t if isinstance(t, Tensor) else torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        output = self.unet(x, t_batch)
        if sampler == "ddpm":
            return ddpm_step(output, t, x, self.schedule, generator=generator, **settings)
        return ddim_step(output, t, t_prev, x, self.schedule, eta=eta, generator=generator, **settings)

    def _sample_static(self, x: Tensor, timesteps: list[int], prev: list[int], sampler: str, eta: float,
                       generator, bar, settings: dict) -> Tensor:
        """The loop of :meth:`sample` on static buffers, graphed on CUDA. The DDPM step at t = 0 adds no noise, so
        the plain loop draws no seed for it: it runs after the others with t = 0 an int, as there."""
        graphed = len(timesteps) - (sampler == "ddpm")
        pairs = torch.tensor(list(zip(timesteps, prev))[:graphed], dtype=torch.long, device=x.device).view(graphed, 2)
        table = pairs[:, :, None].expand(graphed, 2, x.shape[0]).contiguous()  # (step, [t, t_prev], sample)
        index = torch.zeros(1, dtype=torch.long, device=x.device)

        def step():
            t, t_prev = table.index_select(0, index)[0].unbind(0)
            x.copy_(self._step(x, t, t_prev, sampler, eta, generator, settings))
            index.add_(1)

        _run_steps(step, graphed, x.device, generator, bar)
        for t, t_prev in zip(timesteps[graphed:], prev[graphed:]):
            x = self._step(x, t, t_prev, sampler, eta, generator, settings)
            bar.update()
        return x


def _run_steps(step, count: int, device: torch.device, generator, bar) -> None:
    """``step()`` ``count`` times. On CUDA: WARMUP_STEPS of them uncaptured on a side stream, then one captured in
    a CUDA graph (``generator`` registered with it, so that every replay advances the generator as an eager step
    does; torch's default generator always is) and replayed for the rest. Elsewhere: uncaptured."""
    if device.type != "cuda":
        for _ in range(count):
            step()
            bar.update()
        return
    with torch.cuda.device(device):
        warmup = min(WARMUP_STEPS, count)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
                bar.update()
        torch.cuda.current_stream().wait_stream(side)
        if warmup == count:
            return
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            step()
        for _ in range(count - warmup):
            graph.replay()
            bar.update()
