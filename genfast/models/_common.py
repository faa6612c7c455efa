"""What the models share: the spatial ladder of the convolutional models, 64 → 32 → 16 → 8 → 4 (also 32 → … and
28 → 14 → 7 → 4), the strided convolutions that walk it down and up, and argument checks."""
from __future__ import annotations

import numbers

import torch
from torch import nn

IMAGE_SIZES = (64, 32, 28)
_LADDERS = {64: (64, 32, 16, 8, 4), 32: (32, 16, 8, 4), 28: (28, 14, 7, 4)}


def ladder(image_size) -> tuple[int, ...]:
    """The spatial sizes from ``image_size`` down to 4."""
    if isinstance(image_size, bool) or image_size not in _LADDERS:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    return _LADDERS[image_size]


def level_channels(base_channels: int, level: int) -> int:
    """Feature channels at ladder level ≥ 1 (level 1 = half the image size): base_channels·2^(level−1)."""
    return base_channels * 2 ** (level - 1)


def down_conv(in_channels: int, out_channels: int, size: int) -> nn.Conv2d:
    """Conv2d from size×size to the next ladder size ⌈size/2⌉: kernel 4 (3 for an odd size), stride 2, padding 1."""
    return nn.Conv2d(in_channels, out_channels, 4 if size % 2 == 0 else 3, stride=2, padding=1)


def up_conv(in_channels: int, out_channels: int, size: int, *, bias: bool = True) -> nn.ConvTranspose2d:
    """ConvTranspose2d from the ladder size below ``size`` up to size×size, the inverse of :func:`down_conv`."""
    return nn.ConvTranspose2d(in_channels, out_channels, 4 if size % 2 == 0 else 3, stride=2, padding=1, bias=bias)


def check_images(x, name: str, *, channels: int, image_size: int) -> None:
    """ValueError unless x is a float tensor (B, channels, image_size, image_size)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(f"{name} must have shape (B, {channels}, {image_size}, {image_size}), "
                         f"got {tuple(x.shape)}")


def check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
