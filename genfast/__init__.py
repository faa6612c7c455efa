"""genfast: fused kernels for training and sampling VAEs, WGAN-GP and DDPM diffusion models.

Every op has a pure-PyTorch reference (``genfast.reference``) that is the fallback on any device and the oracle
the Triton kernels (``genfast.kernels``) and the C++ kernels (``csrc/``) are tested against, and a plain PyTorch
composite (``genfast.composite``, the "torch" backend) that is the baseline of the benchmarks. Select the
implementation with :func:`set_backend` / :func:`use_backend` or ``$GENFAST_BACKEND``.
"""
from ._backend import get_backend, set_backend, use_backend
from .ops.reparameterize import gaussian_kl, reparameterize, reparameterize_kl
from .ops.diffusion import NoiseSchedule, diffusion_loss, q_sample
from .ops.diffusion_steps import ddim_step, ddpm_step, dynamic_threshold
from .ops.gradient_penalty import gradient_penalty
from .ops.group_norm_silu import group_norm_silu
from . import nn  # genfast.nn: the nn.Module wrappers
# The module is genfast.patching (not genfast.patch, which is the function).
from .patching import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "get_backend", "set_backend", "use_backend",
    "reparameterize", "gaussian_kl", "reparameterize_kl",
    "NoiseSchedule", "q_sample", "diffusion_loss", "ddpm_step", "ddim_step", "dynamic_threshold",
    "gradient_penalty",
    "group_norm_silu",
    "patch", "unpatch",
]


def __getattr__(name):
    # genfast.integrations is imported on first use: its submodules import optional packages (diffusers)
    if name == "integrations":
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
