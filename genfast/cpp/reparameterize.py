"""C++ CPU kernels of the VAE ops (``csrc/cpu/reparameterize.cpp``), with the signatures and returns of
``genfast.reference.vae``: z = μ + exp(½·logvar)·ε and kl_b = ½·Σ(μ² + e^logvar − 1 − logvar), ε from ``noise`` or
the Philox stream of ``seed``."""
from . import ops

DEVICES = ("cpu",)


def reparameterize_kl(mu, logvar, noise, seed, want_z, want_kl):
    """(z, kl); an output not wanted is an empty tensor."""
    return ops().cpp_reparameterize_kl(mu, logvar, noise, seed, want_z, want_kl)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed):
    """(dμ, dlogvar); ``grad_z`` / ``grad_kl`` may be None."""
    return ops().cpp_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed)
