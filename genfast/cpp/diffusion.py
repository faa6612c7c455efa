"""C++ CPU kernels of the diffusion ops (``csrc/cpu/diffusion.cpp``), with the signatures and returns of
``genfast.reference.diffusion``: the per-sample affine maps out = a_b·x + b_b·y + c_b·ε of q_sample, ddpm_step and
ddim_step (coefficients combined in float64 from the schedule tables), their backwards, and the ε-prediction MSE
with ε regenerated from the seed."""
from . import ops

DEVICES = ("cpu",)


def q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
    return ops().cpp_q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


def q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """dx_0 = √ᾱ_t·dx_t."""
    return ops().cpp_q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)


def ddpm_step(model_output, t, x_t, noise, seed, *tables):
    """x_{t−1} = a·x_t + b·ε̂ + c·z; ``tables`` are those of ``genfast.reference.diffusion.ddpm_coefficients``."""
    return ops().cpp_ddpm_step(model_output, t, x_t, noise, seed, *tables)


def ddpm_step_backward(grad, t, *tables):
    """(dε̂, dx_t) = (b·g, a·g)."""
    return ops().cpp_ddpm_step_backward(grad, t, *tables)


def ddim_step(model_output, t, t_prev, x_t, noise, seed, eta, *tables):
    """x_prev = a·x_t + b·ε̂ + σ·z; ``tables`` are those of ``genfast.reference.diffusion.ddim_coefficients``."""
    return ops().cpp_ddim_step(model_output, t, t_prev, x_t, noise, seed, eta, *tables)


def ddim_step_backward(grad, t, t_prev, eta, *tables):
    """(dε̂, dx_t) = (b·g, a·g)."""
    return ops().cpp_ddim_step_backward(grad, t, t_prev, eta, *tables)


def noise_mse(eps_hat, seed):
    """mean((ε̂ − ε)²) with ε the Philox noise of ``seed``: a 0-dim fp32 tensor."""
    return ops().cpp_noise_mse(eps_hat, seed)


def noise_mse_backward(grad_loss, eps_hat, seed):
    """dε̂ = 2(ε̂ − ε)/N·dloss."""
    return ops().cpp_noise_mse_backward(grad_loss, eps_hat, seed)
