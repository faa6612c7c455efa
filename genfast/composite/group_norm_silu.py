"""GroupNorm + SiLU as the unfused PyTorch ops it replaces: y = silu(GroupNorm(x + add)·(1 + scale) + shift)."""
from __future__ import annotations

import torch.nn.functional as F


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, *, add=None, scale=None, shift=None,
                    activation="silu"):
    """F.group_norm → scale-shift → F.silu, with (B, C) ``add`` / ``scale`` / ``shift`` broadcast over space."""
    expand = (...,) + (None,) * (x.dim() - 2)
    h = x if add is None else x + add[expand].to(x.dtype)
    n = F.group_norm(h, num_groups, weight, bias, eps)
    if scale is not None:
        n = n * (1 + scale[expand].to(x.dtype))
    if shift is not None:
        n = n + shift[expand].to(x.dtype)
    return F.silu(n) if activation == "silu" else n
