"""nn.Module wrappers of genfast's fused ops."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init

from .ops.group_norm_silu import check_eps, check_groups, group_norm_silu


GROUP_NORM_TAKES_BIAS = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


class GroupNormSiLU(Module):
    """Drop-in for ``nn.Sequential(nn.GroupNorm(num_groups, num_channels, eps, affine), nn.SiLU())`` in one fused
    op (:func:`genfast.group_norm_silu`), with nn.GroupNorm's arguments (``bias=False`` included), parameters,
    state_dict keys (``weight``, ``bias``) and init (ones, zeros). ``forward`` optionally takes the time-embedding
    ``add`` (before the norm) and the ``scale`` / ``shift`` modulation (after it), each of shape (B, C):
    y = silu(GroupNorm(x + add) · (1 + scale) + shift)."""

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        check_groups(num_groups, num_channels, "num_channels")
        check_eps(eps)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        factory = dict(device=device, dtype=dtype)
        self.register_parameter("weight", Parameter(torch.empty(num_channels, **factory)) if affine else None)
        self.register_parameter("bias", Parameter(torch.empty(num_channels, **factory)) if affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor, *, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, add=add, scale=scale,
                               shift=shift)

    def extra_repr(self) -> str:
        """As the installed torch's nn.GroupNorm prints itself: ``bias=`` where its GroupNorm takes one (torch 2.14,
        not 2.11), else only for an affine module without bias, which that GroupNorm cannot be."""
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        if GROUP_NORM_TAKES_BIAS or (self.affine and self.bias is None):
            text += f", bias={self.bias is not None}"
        return text
