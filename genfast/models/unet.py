"""The denoising U-Net of Ho et al. (2020), with every GroupNorm+SiLU one fused :func:`genfast.group_norm_silu` (the
time embedding applied inside it as ADM's scale-shift, or added before the norm as Ho et al.)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import GroupNormSiLU
from ..ops.group_norm_silu import group_norm_silu
from ._common import check_images, check_positive_int


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of timesteps t (B,): [cos(t·f_i), sin(t·f_i)] with f_i = max_period^(−i/half),
    i = 0 .. half−1, half = dim // 2 (a zero column pads an odd dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """y = skip(x) + conv2(dropout(GNSiLU₂(conv1(GNSiLU₁(x)), emb))), where the time embedding enters GNSiLU₂ with
    ``scale_shift`` as (scale, shift) = Linear(emb) applied after the norm, n·(1 + scale) + shift (Dhariwal &
    Nichol's ADM), or else as ``add`` = Linear(emb) before the norm (Ho et al.: h + temb_proj(emb), then norm). Both
    fused into the one op. Added before a norm whose groups hold one channel each, the embedding is a per-channel
    constant that the norm subtracts again: such a block cannot see t. ``skip`` is a 1×1 conv when the channels
    change; conv2 starts at zero so the block starts as the identity."""

    def __init__(self, in_channels: int, out_channels: int, *, emb_channels: int, num_groups: int, dropout: float,
                 scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNormSiLU(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = GroupNormSiLU(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        e = self.emb_proj(emb).to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h, scale=scale, shift=shift)
        else:
            h = self.norm2(h, add=e)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions: x + proj(softmax(q·kᵀ/√C)·v) with q, k, v = 1×1 conv of
    GroupNorm(x) (the fused op without SiLU); proj starts at zero."""

    def __init__(self, channels: int, *, num_groups: int):
        super().__init__()
        self.num_groups = num_groups
        self.norm_weight = nn.Parameter(torch.ones(channels))
        self.norm_bias = nn.Parameter(torch.zeros(channels))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = group_norm_silu(x, self.num_groups, self.norm_weight, self.norm_bias, activation=None)
        q, k, v = self.qkv(h).reshape(b, 3, c, height * width).transpose(2, 3).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, height, width))


class Downsample(nn.Module):
    """3×3 convolution with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """y = UNet(x_t, t), the prediction (ε, v or x₀: :class:`genfast.models.DDPM`'s ``prediction_type``) for x_t
    (B, C, S, S) and integer timesteps t (B,) (Ho et al. 2020).

    Levels i = 0 .. L−1 at resolution S/2^i with base_channels·channel_mult[i] channels, each ``num_res_blocks``
    :class:`ResBlock` (plus :class:`AttentionBlock` at the resolutions in ``attention_resolutions``) and a stride-2
    downsample except the last; a middle ResBlock–Attention–ResBlock; the mirrored up path with one more ResBlock per
    level, each taking the matching down-path activation concatenated on channels; GroupNorm+SiLU and a 3×3 conv
    (zero-initialised) to C channels. The time embedding is sinusoidal(t, base_channels) → Linear → SiLU → Linear
    (4·base_channels), then SiLU once before the blocks' projections.

    Args (keyword-only): image_size (default 64; divisible by 2^(L−1)), in_channels (default 3), base_channels
    (default 64), channel_mult (default (1, 2, 2, 2)), num_res_blocks (default 2), attention_resolutions (default
    (16,)), num_groups (GroupNorm groups, default 32; must divide every level's channels), dropout (default 0.0),
    scale_shift (default True: the time embedding scales and shifts the normalised features of each ResBlock, as
    ADM, so every block sees t whatever its group size; False: it is added before the second norm, as Ho et al.,
    which a norm of one-channel groups cancels — 32 groups of a 32-channel block; the default before issue 22).
    At equal steps on the faces the scale-shift U-Net had a 6–15% lower held-out loss than the add (bench/NOTES.md,
    2026-12-07)."""

    def __init__(self, *, image_size: int = 64, in_channels: int = 3, base_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (16,), num_groups: int = 32, dropout: float = 0.0,
                 scale_shift: bool = True):
        super().__init__()
        channel_mult = tuple(channel_mult)
        _check_arguments(image_size, in_channels, base_channels, channel_mult, num_res_blocks, num_groups, dropout)
        self.image_size, self.in_channels, self.base_channels = image_size, in_channels, base_channels
        emb_channels = 4 * base_channels
        block = dict(emb_channels=emb_channels, num_groups=num_groups, dropout=float(dropout),
                     scale_shift=bool(scale_shift))
        widths = [base_channels * m for m in channel_mult]  # channels of each level
        attention_resolutions = set(attention_resolutions)
        attention = [image_size // 2 ** level in attention_resolutions for level in range(len(widths))]

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(),
                                      nn.Linear(emb_channels, emb_channels), nn.SiLU())
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skip_channels = self._down_path(base_channels, widths, attention, num_res_blocks, block)
        ch = widths[-1]
        self.middle = nn.ModuleList([ResBlock(ch, ch, **block), AttentionBlock(ch, num_groups=num_groups),
                                     ResBlock(ch, ch, **block)])
        self.up = self._up_path(ch, skip_channels, widths, attention, num_res_blocks, block)
        self.norm_out = GroupNormSiLU(num_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def _down_path(cls, ch: int, widths: list[int], attention: list[bool], num_res_blocks: int,
                   block: dict) -> tuple[nn.ModuleList, list[int]]:
        """The down path from ``ch`` channels: per level ``num_res_blocks`` stages, then a Downsample except after
        the last level; and the channels of each activation it hands to the up path, conv_in's first."""
        down, skip_channels = nn.ModuleList(), [ch]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(cls._stage(ch, width, attention[level], block))
                ch = width
                skip_channels.append(ch)
            if level != len(widths) - 1:
                down.append(Downsample(ch))
                skip_channels.append(ch)
        return down, skip_channels

    @classmethod
    def _up_path(cls, ch: int, skip_channels: list[int], widths: list[int], attention: list[bool],
                 num_res_blocks: int, block: dict) -> nn.ModuleList:
        """The up path from ``ch`` channels: per level, deepest first, ``num_res_blocks + 1`` stages, each on the
        concatenation with the last down-path activation not yet taken (``skip_channels`` is consumed), then an
        Upsample except after level 0."""
        up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                up.append(cls._stage(ch + skip_channels.pop(), widths[level], attention[level], block))
                ch = widths[level]
            if level != 0:
                up.append(Upsample(ch))
        return up

    @staticmethod
    def _stage(in_channels: int, out_channels: int, attention: bool, block: dict) -> nn.ModuleList:
        """A ResBlock, followed by self-attention at the attention resolutions."""
        layers = [ResBlock(in_channels, out_channels, **block)]
        if attention:
            layers.append(AttentionBlock(out_channels, num_groups=block["num_groups"]))
        return nn.ModuleList(layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        check_images(x, "x", channels=self.in_channels, image_size=self.image_size)
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be a tensor of shape ({x.shape[0]},), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(self.conv_in.weight.dtype))
        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = self._run(module, h, emb)
            skips.append(h)
        for module in self.middle:
            h = self._run(module, h, emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = self._run(module, torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(self.norm_out(h))

    @staticmethod
    def _run(module: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if isinstance(module, nn.ModuleList):
            for layer in module:
                h = UNet._run(layer, h, emb)
            return h
        return module(h, emb) if isinstance(module, ResBlock) else module(h)


def _check_arguments(image_size, in_channels, base_channels, channel_mult, num_res_blocks, num_groups, dropout):
    """Raise ValueError for UNet arguments it cannot build (see :class:`UNet`)."""
    for value, name in ((image_size, "image_size"), (in_channels, "in_channels"), (base_channels, "base_channels"),
                        (num_res_blocks, "num_res_blocks"), (num_groups, "num_groups")):
        check_positive_int(value, name)
    if not channel_mult:
        raise ValueError("channel_mult must name at least one level, got ()")
    for m in channel_mult:
        check_positive_int(m, "every entry of channel_mult")
    if image_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"image_size ({image_size}) must be divisible by 2^(len(channel_mult) - 1) = "
                         f"{2 ** (len(channel_mult) - 1)}")
    widths = [base_channels * m for m in (1,) + channel_mult]
    if any(w % num_groups for w in widths):
        raise ValueError(f"num_groups ({num_groups}) must divide every level's channels {sorted(set(widths))}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
