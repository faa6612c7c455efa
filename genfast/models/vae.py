"""A convolutional (β-)VAE whose sampling step and KL term are genfast's fused :func:`genfast.reparameterize_kl`."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import GroupNormSiLU
from ..ops.reparameterize import reparameterize_kl
from ._common import check_images, check_positive_int, down_conv, ladder, level_channels, up_conv

RECON_LOSSES = ("bce", "mse")
SPATIAL_LEVELS = 2  # halvings before a spatial latent: f = 4


class ConvVAE(nn.Module):
    """Conv encoder → (μ, log σ²) → z = μ + σ·ε (fused with the KL term) → ConvTranspose decoder → sigmoid.

    The encoder halves the image down to 4×4 (64 → 32 → 16 → 8 → 4; 32 → …; 28 → 14 → 7 → 4) with stride-2
    convolutions of base_channels·2^level channels, each followed by GroupNorm+SiLU (genfast's fused op); a linear
    layer maps the 4×4 features to μ and log σ². The decoder mirrors it.

    With ``latent_channels`` the latent is spatial, as latent diffusion wants it (Rombach et al. 2022): the encoder
    stops after two halvings (64 → 16, 32 → 8, 28 → 7: a downsampling factor f = 4), a 3×3 convolution + GroupNorm
    +SiLU refines the features there and a 1×1 convolution gives μ and log σ² of shape (latent_channels, S/4, S/4);
    the decoder starts with a 3×3 convolution from the latent and mirrors the rest.

    Args (keyword-only):
        image_size: 64, 32 or 28 (default 64).
        in_channels: image channels (default 3).
        latent_dim: size of z (default 128); ignored with ``latent_channels``.
        latent_channels: None (default: a flat latent of latent_dim) or the channels of a spatial latent
            (latent_channels, S/4, S/4), e.g. 4 → 4×16×16 for 64×64 images.
        base_channels: channels of the first conv (default 32); must be divisible by ``num_groups``.
        beta: weight of the KL term, β-VAE style (default 1.0; 1 is the plain VAE).
        recon_loss: "bce" (Bernoulli likelihood on logits, default) or "mse" (squared error of the sigmoid output),
            summed over each image's pixels and averaged over the batch.
        num_groups: GroupNorm groups (default 8).
    """

    def __init__(self, *, image_size: int = 64, in_channels: int = 3, latent_dim: int = 128, base_channels: int = 32,
                 beta: float = 1.0, recon_loss: str = "bce", num_groups: int = 8,
                 latent_channels: Optional[int] = None):
        super().__init__()
        sizes = ladder(image_size)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(latent_dim, "latent_dim")
        check_positive_int(base_channels, "base_channels")
        check_positive_int(num_groups, "num_groups")
        if base_channels % num_groups:
            raise ValueError(f"base_channels ({base_channels}) must be divisible by num_groups ({num_groups})")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
            raise ValueError(f"beta must be a real number >= 0, got {beta!r}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        if latent_channels is not None:
            check_positive_int(latent_channels, "latent_channels")
        self.image_size, self.in_channels, self.latent_channels = image_size, in_channels, latent_channels
        self.beta, self.recon_loss = float(beta), recon_loss
        levels = len(sizes) - 1 if latent_channels is None else SPATIAL_LEVELS
        channels = [in_channels] + [level_channels(base_channels, j) for j in range(1, levels + 1)]
        self._bottom = (channels[-1], sizes[levels], sizes[levels])
        self.latent_shape = (latent_dim,) if latent_channels is None else (latent_channels, *self._bottom[1:])
        self.latent_dim = math.prod(self.latent_shape)

        # modules in the order of the flat VAE's first version: parameters() (and so an optimiser's saved state
        # and the initialisation a seed gives) keep their order
        self.encoder = nn.ModuleList()
        for j in range(1, levels + 1):
            self.encoder.append(down_conv(channels[j - 1], channels[j], sizes[j - 1]))
            self.encoder.append(GroupNormSiLU(num_groups, channels[j]))
        if latent_channels is None:
            self.to_posterior = nn.Linear(channels[-1] * sizes[-1] ** 2, 2 * latent_dim)
            self.from_latent = nn.Linear(latent_dim, channels[-1] * sizes[-1] ** 2)
        else:
            self.to_posterior = nn.Sequential(nn.Conv2d(channels[-1], channels[-1], 3, padding=1),
                                              GroupNormSiLU(num_groups, channels[-1]),
                                              nn.Conv2d(channels[-1], 2 * latent_channels, 1))
            self.from_latent = nn.Conv2d(latent_channels, channels[-1], 3, padding=1)
        self.decoder = nn.ModuleList([GroupNormSiLU(num_groups, channels[-1])])
        for j in range(levels, 1, -1):
            self.decoder.append(up_conv(channels[j], channels[j - 1], sizes[j - 1]))
            self.decoder.append(GroupNormSiLU(num_groups, channels[j - 1]))
        self.decoder.append(up_conv(channels[1], in_channels, sizes[0]))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z | x), each (B, *latent_shape), for images x (B, C, S, S) in [0, 1]."""
        check_images(x, "x", channels=self.in_channels, image_size=self.image_size)
        h = x
        for layer in self.encoder:
            h = layer(h)
        mu, logvar = self.to_posterior(h if self.latent_channels else h.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: Tensor) -> Tensor:
        """The decoder's pre-sigmoid output (B, C, S, S) for latents z (B, *latent_shape)."""
        if not isinstance(z, Tensor) or z.dim() != 1 + len(self.latent_shape) or z.shape[1:] != self.latent_shape:
            raise ValueError(f"z must be a tensor of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        h = self.from_latent(z).view(z.shape[0], *self._bottom)
        for layer in self.decoder:
            h = layer(h)
        return h

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1]: sigmoid of :meth:`decode_logits`."""
        return torch.sigmoid(self.decode_logits(z))

    def loss(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """The negative ELBO with a β-weighted KL: ``loss = recon + beta·kl`` (0-dim tensors), with ``recon`` the
        reconstruction loss summed over each image and averaged over the batch and ``kl`` = mean over the batch of
        KL(q(z|x) ‖ N(0, I)), both from one fused :func:`genfast.reparameterize_kl` (ε drawn from ``generator``)."""
        mu, logvar = self.encode(x)
        z, kl = reparameterize_kl(mu, logvar, generator=generator)
        logits = self.decode_logits(z)
        if self.recon_loss == "bce":
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        else:
            recon = F.mse_loss(torch.sigmoid(logits), x, reduction="sum")
        recon = recon / x.shape[0]
        kl = kl.mean()
        return dict(loss=recon + self.beta * kl, recon=recon, kl=kl)

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images decoded from z ~ N(0, I) drawn with ``generator``."""
        check_positive_int(n, "n")
        weight = self.from_latent.weight
        z = torch.randn(n, *self.latent_shape, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(μ(x)): the deterministic reconstruction of x."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 8) -> Tensor:
        """Images (N, steps, C, S, S) decoded along the straight line from μ(x1) to μ(x2) (both ends included) for
        x1, x2 of shape (N, C, S, S)."""
        check_positive_int(steps, "steps")
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (both endpoints), got {steps}")
        if isinstance(x1, Tensor) and isinstance(x2, Tensor) and x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        mu1, mu2 = self.encode(x1)[0], self.encode(x2)[0]
        w = torch.linspace(0.0, 1.0, steps, device=mu1.device, dtype=mu1.dtype).view(1, steps, *[1] * (mu1.dim() - 1))
        z = torch.lerp(mu1[:, None], mu2[:, None], w)
        return self.decode(z.flatten(0, 1)).unflatten(0, (x1.shape[0], steps))

