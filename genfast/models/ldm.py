"""Latent diffusion (Rombach et al. 2022): a DDPM trained on the spatial latents of a frozen VAE, scaled to unit
variance; samples are denoised in latent space and decoded once."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.reparameterize import reparameterize
from ._common import check_positive_int
from .ddpm import DDPM
from .vae import ConvVAE


class LatentDiffusion(nn.Module):
    """``vae`` (a :class:`ConvVAE` with a spatial latent, frozen: no gradients, eval mode) and ``ddpm`` (a
    :class:`DDPM` whose U-Net takes the VAE's latent shape), with the latent scale factor s as a buffer.

    Training: z = μ(x) + σ(x)·ε (genfast's fused :func:`genfast.reparameterize`, ε from the generator), then the
    DDPM loss on s·z. Sampling: s·z from the DDPM, decoded as ``vae.decode(z)``. s = 1/std(z) over training images
    (:meth:`measure_scale`) makes the diffused latent unit-variance, as the noise schedule assumes."""

    def __init__(self, *, vae: ConvVAE, ddpm: DDPM):
        super().__init__()
        if not isinstance(vae, ConvVAE) or vae.latent_channels is None:
            raise ValueError("vae must be a ConvVAE with a spatial latent (latent_channels set)")
        unet = ddpm.unet
        if (unet.in_channels, unet.image_size, unet.image_size) != vae.latent_shape:
            raise ValueError(f"the U-Net takes {unet.in_channels}×{unet.image_size}×{unet.image_size} inputs, the "
                             f"VAE's latent is {'×'.join(map(str, vae.latent_shape))}")
        self.vae = vae.eval().requires_grad_(False)
        self.ddpm = ddpm
        self.register_buffer("latent_scale", torch.ones((), dtype=torch.float32))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode
        return self

    @property
    def image_size(self) -> int:
        return self.vae.image_size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.vae.latent_shape

    @torch.no_grad()
    def encode(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """s·z with z = μ(x) + σ(x)·ε drawn from q(z | x), for images x in [0, 1]."""
        mu, logvar = self.vae.encode(x)
        return reparameterize(mu, logvar, generator=generator) * self.latent_scale.to(mu.dtype)

    @torch.no_grad()
    def measure_scale(self, images: Tensor, *, generator: Optional[torch.Generator] = None,
                      batch_size: int = 256) -> float:
        """Set and return s = 1/std(z) over the posterior samples z of ``images`` (N, C, S, S) in [0, 1]."""
        check_positive_int(batch_size, "batch_size")
        self.latent_scale.fill_(1.0)
        z = torch.cat([self.encode(chunk, generator=generator).double() for chunk in images.split(batch_size)])
        std = float(z.std())
        if not std > 0:
            raise ValueError(f"the VAE's latents have standard deviation {std} over {len(images)} images")
        self.latent_scale.fill_(1.0 / std)
        return 1.0 / std

    def loss(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """The DDPM loss (:meth:`DDPM.loss`) on the scaled latents of images x in [0, 1]."""
        return self.ddpm.loss(self.encode(x, generator=generator), generator=generator)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [0, 1] of scaled latents s·z."""
        return self.vae.decode(latents / self.latent_scale.to(latents.dtype))

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str = "ddim", steps: Optional[int] = None, eta: float = 0.0,
               generator: Optional[torch.Generator] = None, progress: bool = False, cuda_graph: bool = False,
               noise: Optional[Tensor] = None) -> Tensor:
        """``n`` images (n, C, S, S) in [0, 1]: latents from :meth:`DDPM.sample` (the same arguments; ``noise`` is
        the latent x_T), decoded. The latents' x̂₀ is neither clipped nor thresholded (``clip_sample=False``, as
        Stable Diffusion's schedulers): the scaled latents are unit-variance, not images in [-1, 1]."""
        latents = self.ddpm.sample(n, sampler=sampler, steps=steps, eta=eta, generator=generator, progress=progress,
                                   cuda_graph=cuda_graph, noise=noise, clip_sample=False)
        return self.decode(latents)
