"""DDPM (Ho et al. 2020): an ε-prediction network and a noise schedule, trained with the fused
:func:`genfast.diffusion_loss` and sampled with :func:`genfast.ddpm_step` or :func:`genfast.ddim_step`."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.diffusion import ddim_step, ddpm_step, diffusion_loss
from ..schedule import NoiseSchedule
from ._common import check_positive_int
from .unet import UNet

SAMPLERS = ("ddpm", "ddim")


class DDPM(nn.Module):
    """``unet`` (a :class:`UNet`, or any module with ``forward(x_t, t) -> ε̂`` and attributes ``in_channels`` and
    ``image_size``) and ``schedule``, a :class:`genfast.NoiseSchedule` (default ``NoiseSchedule.linear(1000, 1e-4,
    0.02)``, Ho et al.'s), registered as submodules so that ``.to(device)`` moves both. Images live in [-1, 1]."""

    def __init__(self, *, unet: UNet, schedule: Optional[NoiseSchedule] = None):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module, got {type(unet).__name__}")
        if schedule is None:
            schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a genfast.NoiseSchedule, got {type(schedule).__name__}")
        self.unet = unet
        self.schedule = schedule

    def loss(self, x0: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """mean((ε̂ − ε)²) at timesteps drawn uniformly from [0, T) (:func:`genfast.diffusion_loss`), a 0-dim fp32
        tensor; t and ε are drawn from ``generator``."""
        return diffusion_loss(self.unet, x0, self.schedule, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str = "ddpm", steps: Optional[int] = None, eta: float = 0.0,
               generator: Optional[torch.Generator] = None, progress: bool = False) -> Tensor:
        """``n`` images (n, C, S, S) in [-1, 1] (clamped) from x_T ~ N(0, I) drawn with ``generator``.

        ``sampler="ddpm"``: ancestral sampling through all T timesteps (``steps`` must be None or T).
        ``sampler="ddim"``: ``steps`` (default 50, at most T) timesteps evenly spaced over [0, T−1] (rounded), from
        the last down to 0, with noise scale ``eta`` (0: deterministic). ``progress`` shows a tqdm bar."""
        check_positive_int(n, "n")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        num_steps = self.schedule.num_steps
        if sampler == "ddpm":
            if steps is not None and steps != num_steps:
                raise ValueError(f"the ddpm sampler runs all T={num_steps} steps: steps must be None or {num_steps}, "
                                 f"got {steps!r} (use sampler='ddim' for fewer)")
            timesteps = list(range(num_steps - 1, -1, -1))
        else:
            steps = 50 if steps is None else steps
            check_positive_int(steps, "steps")
            if steps > num_steps:
                raise ValueError(f"steps must be <= T={num_steps}, got {steps}")
            timesteps = torch.linspace(0, num_steps - 1, steps, dtype=torch.float64).round().long().tolist()[::-1]
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or eta < 0:
            raise ValueError(f"eta must be a real number >= 0, got {eta!r}")
        parameter = next(self.unet.parameters())
        shape = (n, self.unet.in_channels, self.unet.image_size, self.unet.image_size)
        x = torch.randn(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(range(len(timesteps)), desc=f"{sampler} sampling", unit="step")
        else:
            iterator = range(len(timesteps))
        for i in iterator:
            t = timesteps[i]
            eps_hat = self.unet(x, torch.full((n,), t, dtype=torch.long, device=x.device))
            if sampler == "ddpm":
                x = ddpm_step(eps_hat, t, x, self.schedule, generator=generator)
            else:
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                x = ddim_step(eps_hat, t, t_prev, x, self.schedule, eta=eta, generator=generator)
        return x.clamp(-1.0, 1.0)
