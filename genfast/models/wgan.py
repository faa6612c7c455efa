"""DCGAN-style generator and critic for WGAN-GP (Gulrajani et al. 2017), trained with the fused
:func:`genfast.gradient_penalty`."""
from __future__ import annotations

from torch import Tensor, nn

from ._common import check_images, check_positive_int, down_conv, ladder, level_channels, up_conv


class Generator(nn.Module):
    """z (B, latent_dim) → images (B, C, S, S) in [-1, 1]: a 4×4 ConvTranspose from z, then stride-2
    ConvTransposes up the ladder (4 → 8 → 16 → 32 → 64; 4 → 7 → 14 → 28 for 28) with BatchNorm + ReLU between them
    (DCGAN, Radford et al. 2016), tanh at the end. Channels halve from base_channels·2^(levels−1) at 4×4.

    Args (keyword-only): latent_dim (default 128), image_size 64, 32 or 28 (default 64), out_channels (default 3),
    base_channels (channels of the last hidden layer, default 64)."""

    def __init__(self, *, latent_dim: int = 128, image_size: int = 64, out_channels: int = 3, base_channels: int = 64):
        super().__init__()
        sizes = ladder(image_size)
        check_positive_int(latent_dim, "latent_dim")
        check_positive_int(out_channels, "out_channels")
        check_positive_int(base_channels, "base_channels")
        self.latent_dim, self.image_size, self.out_channels = latent_dim, image_size, out_channels
        levels = len(sizes) - 1
        top = level_channels(base_channels, levels)
        layers = [nn.ConvTranspose2d(latent_dim, top, sizes[-1], bias=False), nn.BatchNorm2d(top), nn.ReLU()]
        for j in range(levels, 1, -1):
            out = level_channels(base_channels, j - 1)
            # no conv bias before a BatchNorm: the norm removes it (its gradient is rounding noise that Adam amplifies)
            layers += [up_conv(level_channels(base_channels, j), out, sizes[j - 1], bias=False), nn.BatchNorm2d(out),
                       nn.ReLU()]
        layers += [up_conv(base_channels, out_channels, sizes[0]), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be a tensor of shape (B, {self.latent_dim}), "
                             f"got {tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        return self.net(z[:, :, None, None])


class Critic(nn.Module):
    """Images (B, C, S, S) in [-1, 1] → scores (B,): stride-2 convolutions down the ladder to 4×4 with LeakyReLU(0.2)
    and a per-sample layer norm (GroupNorm with one group) after all but the first, then a 4×4 convolution to one
    score. No batch norm: the gradient penalty is taken per sample, so samples must not interact. The norm is torch's
GroupNorm, as the penalty differentiates the critic twice and genfast's fused GroupNorm has no double backward.

    Args (keyword-only): image_size 64, 32 or 28 (default 64), in_channels (default 3), base_channels (channels of
    the first layer, default 64)."""

    def __init__(self, *, image_size: int = 64, in_channels: int = 3, base_channels: int = 64):
        super().__init__()
        sizes = ladder(image_size)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_channels, "base_channels")
        self.image_size, self.in_channels = image_size, in_channels
        layers = [down_conv(in_channels, base_channels, sizes[0]), nn.LeakyReLU(0.2)]
        for j in range(2, len(sizes)):
            out = level_channels(base_channels, j)
            layers += [down_conv(level_channels(base_channels, j - 1), out, sizes[j - 1]), nn.GroupNorm(1, out),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(level_channels(base_channels, len(sizes) - 1), 1, sizes[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "x", channels=self.in_channels, image_size=self.image_size)
        return self.net(x).flatten()
