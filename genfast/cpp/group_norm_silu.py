"""GroupNorm + SiLU on the C++ kernels (csrc/cpu/group_norm_silu.cpp, csrc/cuda/group_norm_silu.cu): the
functions and returns of ``genfast.reference.group_norm``."""
from . import ops

DEVICES = ("cpu", "cuda")


def group_norm_silu(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    """(y, mean, rstd): y in x's dtype and layout, mean and rstd (B, G) in fp32."""
    return ops().cpp_group_norm_silu(x, weight, bias, add, scale, shift, num_groups, eps, silu)


def group_norm_silu_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    """(dx, dweight, dbias, dadd, dscale, dshift), an absent input's gradient empty."""
    return ops().cpp_group_norm_silu_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups,
                                              silu)
