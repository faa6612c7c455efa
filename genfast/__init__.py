"""genfast: fused kernels for training and sampling VAEs, WGAN-GP and DDPM diffusion models.

Every op has a pure-PyTorch reference (``genfast.reference``) that is the fallback on any device and the oracle
the Triton kernels (``genfast.kernels``) are tested against. Select the implementation with
:func:`set_backend` / :func:`use_backend` or ``$GENFAST_BACKEND``.
"""
from ._backend import get_backend, set_backend, use_backend
from .ops.vae import gaussian_kl, reparameterize, reparameterize_kl

__version__ = "0.1.0"

__all__ = [
    "get_backend", "set_backend", "use_backend",
    "reparameterize", "gaussian_kl", "reparameterize_kl",
]
