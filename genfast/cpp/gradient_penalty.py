"""C++ CPU kernels of the WGAN-GP ops (``csrc/cpu/gradient_penalty.cpp``), with the signatures and returns of
``genfast.reference.gradient_penalty``."""
from . import ops

DEVICES = ("cpu",)


def interpolate(real, fake, alpha):
    """x̂ = fake + α_b·(real − fake)."""
    return ops().cpp_interpolate(real, fake, alpha)


def interpolate_backward(grad, alpha, want_real, want_fake):
    """(d real, d fake) = (α_b·g, (1 − α_b)·g); a gradient not wanted is an empty tensor."""
    return ops().cpp_interpolate_backward(grad, alpha, want_real, want_fake)


def gradient_norm_penalty(grad, weight):
    """(p, norms): norms_b = ‖g_b‖₂ and p = weight·mean_b(norms_b − 1)², fp32."""
    return ops().cpp_gradient_norm_penalty(grad, weight)


def gradient_norm_penalty_backward(grad_penalty, grad, norms, weight):
    """dg_b = dp·weight·(2/B)·(‖g_b‖ − 1)·g_b/‖g_b‖, and 0 where ‖g_b‖ = 0."""
    return ops().cpp_gradient_norm_penalty_backward(grad_penalty, grad, norms, weight)
