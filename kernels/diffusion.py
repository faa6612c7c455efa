"""Fused diffusion ops: q_sample, the DDPM and DDIM steps (per-sample affine maps) and the ε-prediction MSE.

q_sample, ddpm_step and ddim_step compute out = a_b·x + b_b·y + c_b·ε, as in ``genfast.reference.diffusion``.
Grid (cdiv(D, BLOCK), B) over tensors of shape (B, ...) with D = numel / B elements per sample, batch outermost in
memory: each program loads its sample's timestep and the float64 schedule entries at it once, combines them into
a, b, c in fp64 scalars and runs the elementwise math in fp32. ε comes from memory (NOISE_LOADED), from the
in-kernel Philox stream (NOISE_PHILOX), or is absent (NOISE_NONE). The MSE regenerates ε from the seed in its
forward and its backward and sums per-program partials (B, n_chunks) in a fixed order.
"""
import torch
import triton
import triton.language as tl

from . import per_sample
from .per_sample import block_noise, dims, launch, sample_block

# where the forward kernels take ε from (the constexpr NOISE)
NOISE_NONE, NOISE_LOADED, NOISE_PHILOX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# the pointers of (B, ...) tensors, whose traffic is the op's bytes (read by `genfast bench --static`)
STREAMED = ("x0_ptr", "x_ptr", "y_ptr", "noise_ptr", "out_ptr", "grad_ptr", "grad_x0_ptr", "grad_x_ptr", "grad_y_ptr",
            "model_output_ptr", "grad_model_output_ptr", "eps_hat_ptr")


@triton.jit
def _affine_fwd(x_ptr, y_ptr, noise_ptr, seed_ptr, out_ptr, a, b, c, sample, start, offs, mask,
                HAS_Y: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """out = a·x + b·y + c·ε on this block."""
    out = a * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        out += b * tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE != NOISE_NONE:
        out += c * block_noise(noise_ptr, seed_ptr, sample, start, offs, mask, NOISE == NOISE_LOADED, BLOCK)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_bwd(grad_ptr, grad_x_ptr, grad_y_ptr, a, b, offs, mask, HAS_Y: tl.constexpr):
    """dx = a·g and dy = b·g on this block."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offs, (a * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if HAS_Y:
        tl.store(grad_y_ptr + offs, (b * g).to(grad_y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_coefficients(t, sqrt_ac_ptr, sqrt_1m_ac_ptr):
    """(√ᾱ_t, √(1−ᾱ_t)) in fp32."""
    return tl.load(sqrt_ac_ptr + t).to(tl.float32), tl.load(sqrt_1m_ac_ptr + t).to(tl.float32)


@triton.jit
def _ddpm_coefficients(t, sqrt_ac_ptr, sqrt_1m_ac_ptr, coef1_ptr, coef2_ptr, var_ptr):
    """(c2 + c1/√ᾱ_t, −c1·√(1−ᾱ_t)/√ᾱ_t, √β̃_t), combined in fp64, in fp32."""
    sqrt_ac = tl.load(sqrt_ac_ptr + t)
    coef1 = tl.load(coef1_ptr + t)
    a = tl.load(coef2_ptr + t) + coef1 / sqrt_ac
    b = -coef1 * tl.load(sqrt_1m_ac_ptr + t) / sqrt_ac
    c = tl.sqrt(tl.load(var_ptr + t))
    return a.to(tl.float32), b.to(tl.float32), c.to(tl.float32)


@triton.jit
def _ddim_coefficients(t, t_prev, eta, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr):
    """(√ᾱ_p/√ᾱ_t, √(1−ᾱ_p−σ²) − √ᾱ_p·√(1−ᾱ_t)/√ᾱ_t, σ), combined in fp64, in fp32; ᾱ_p = 1 for t_prev < 0."""
    has_prev = t_prev >= 0
    prev = tl.maximum(t_prev, 0)
    ac = tl.load(ac_ptr + t)
    ac_prev = tl.where(has_prev, tl.load(ac_ptr + prev), 1.0)
    sqrt_ac_prev = tl.where(has_prev, tl.load(sqrt_ac_ptr + prev), 1.0)
    variance = (1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)
    sigma = tl.where(eta > 0, eta * tl.sqrt(variance), 0.0)
    a = sqrt_ac_prev / tl.load(sqrt_ac_ptr + t)
    b = tl.sqrt(1.0 - ac_prev - sigma * sigma) - a * tl.load(sqrt_1m_ac_ptr + t)
    return a.to(tl.float32), b.to(tl.float32), sigma.to(tl.float32)


@triton.jit
def _q_sample_fwd_kernel(
    x0_ptr, t_ptr, noise_ptr, seed_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, out_ptr, sample_base, sample_numel,
    NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a, c = _q_sample_coefficients(tl.load(t_ptr + sample), sqrt_ac_ptr, sqrt_1m_ac_ptr)
    _affine_fwd(x0_ptr, x0_ptr, noise_ptr, seed_ptr, out_ptr, a, 0.0, c, sample, start, offs, mask,
                False, NOISE, BLOCK)


@triton.jit
def _q_sample_bwd_kernel(
    grad_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, grad_x0_ptr, sample_base, sample_numel, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a, _ = _q_sample_coefficients(tl.load(t_ptr + sample), sqrt_ac_ptr, sqrt_1m_ac_ptr)
    _affine_bwd(grad_ptr, grad_x0_ptr, grad_x0_ptr, a, 0.0, offs, mask, False)


@triton.jit
def _ddpm_fwd_kernel(
    model_output_ptr, t_ptr, x_ptr, noise_ptr, seed_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, coef1_ptr, coef2_ptr,
    var_ptr, out_ptr, sample_base, sample_numel, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a, b, c = _ddpm_coefficients(tl.load(t_ptr + sample), sqrt_ac_ptr, sqrt_1m_ac_ptr, coef1_ptr, coef2_ptr,
                                 var_ptr)
    _affine_fwd(x_ptr, model_output_ptr, noise_ptr, seed_ptr, out_ptr, a, b, c, sample, start, offs, mask,
                True, NOISE, BLOCK)


@triton.jit
def _ddpm_bwd_kernel(
    grad_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, coef1_ptr, coef2_ptr, var_ptr, grad_model_output_ptr,
    grad_x_ptr, sample_base, sample_numel, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a, b, _ = _ddpm_coefficients(tl.load(t_ptr + sample), sqrt_ac_ptr, sqrt_1m_ac_ptr, coef1_ptr, coef2_ptr,
                                 var_ptr)
    _affine_bwd(grad_ptr, grad_x_ptr, grad_model_output_ptr, a, b, offs, mask, True)


@triton.jit
def _ddim_fwd_kernel(
    model_output_ptr, t_ptr, t_prev_ptr, x_ptr, noise_ptr, seed_ptr, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr,
    out_ptr, eta, sample_base, sample_numel, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a, b, c = _ddim_coefficients(tl.load(t_ptr + sample), tl.load(t_prev_ptr + sample), eta, ac_ptr, sqrt_ac_ptr,
                                 sqrt_1m_ac_ptr)
    _affine_fwd(x_ptr, model_output_ptr, noise_ptr, seed_ptr, out_ptr, a, b, c, sample, start, offs, mask,
                True, NOISE, BLOCK)


@triton.jit
def _ddim_bwd_kernel(
    grad_ptr, t_ptr, t_prev_ptr, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, grad_model_output_ptr, grad_x_ptr, eta,
    sample_base, sample_numel, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a, b, _ = _ddim_coefficients(tl.load(t_ptr + sample), tl.load(t_prev_ptr + sample), eta, ac_ptr, sqrt_ac_ptr,
                                 sqrt_1m_ac_ptr)
    _affine_bwd(grad_ptr, grad_x_ptr, grad_model_output_ptr, a, b, offs, mask, True)


@triton.jit
def _noise_mse_fwd_kernel(
    eps_hat_ptr, seed_ptr, partial_ptr, n_chunks, inv_numel, sample_base, sample_numel, BLOCK: tl.constexpr,
):
    """partial[b, chunk] = Σ (ε̂ − ε)² / numel over this block: the loss is the (fixed-order) sum of the partials."""
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    eps_hat = tl.load(eps_hat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = block_noise(eps_hat_ptr, seed_ptr, sample, start, offs, mask, False, BLOCK)
    diff = tl.where(mask, eps_hat - eps, 0.0)
    tl.store(partial_ptr + sample.to(tl.int64) * n_chunks + tl.program_id(0),
             tl.sum(diff * diff, axis=0) * inv_numel)


@triton.jit
def _noise_mse_bwd_kernel(
    grad_loss_ptr, eps_hat_ptr, seed_ptr, grad_ptr, scale, sample_base, sample_numel, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    eps_hat = tl.load(eps_hat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    diff = eps_hat - block_noise(eps_hat_ptr, seed_ptr, sample, start, offs, mask, False, BLOCK)
    g = tl.load(grad_loss_ptr).to(tl.float32) * scale
    tl.store(grad_ptr + offs, (g * diff).to(grad_ptr.dtype.element_ty), mask=mask)


# ---- launchers: the same signatures as genfast.reference.diffusion -------------------------------------------


def _noise_args(noise, seed, x, t):
    """(noise pointer, seed pointer, NOISE) for the forward kernels; unused pointers get a tensor of their dtype."""
    if noise is not None:
        return noise, t, NOISE_LOADED.value
    if seed is not None:
        return x, seed, NOISE_PHILOX.value
    return x, t, NOISE_NONE.value


def q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    out = torch.empty_like(x0)
    noise, seed, mode = _noise_args(noise, seed, x0, t)
    launch(_q_sample_fwd_kernel, x0, x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out,
            NOISE=mode)
    return out


def q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    grad_x0 = torch.empty_like(grad)
    launch(_q_sample_bwd_kernel, grad, grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, grad_x0)
    return grad_x0


def ddpm_step(model_output, t, x_t, noise, seed, *tables):
    out = torch.empty_like(x_t)
    noise, seed, mode = _noise_args(noise, seed, x_t, t)
    launch(_ddpm_fwd_kernel, x_t, model_output, t, x_t, noise, seed, *tables, out, NOISE=mode)
    return out


def ddpm_step_backward(grad, t, *tables):
    grad_model_output, grad_x = torch.empty_like(grad), torch.empty_like(grad)
    launch(_ddpm_bwd_kernel, grad, grad, t, *tables, grad_model_output, grad_x)
    return grad_model_output, grad_x


def ddim_step(model_output, t, t_prev, x_t, noise, seed, eta, *tables):
    out = torch.empty_like(x_t)
    noise, seed, mode = _noise_args(noise, seed, x_t, t)
    launch(_ddim_fwd_kernel, x_t, model_output, t, t_prev, x_t, noise, seed, *tables, out, eta, NOISE=mode)
    return out


def ddim_step_backward(grad, t, t_prev, eta, *tables):
    grad_model_output, grad_x = torch.empty_like(grad), torch.empty_like(grad)
    launch(_ddim_bwd_kernel, grad, grad, t, t_prev, *tables, grad_model_output, grad_x, eta)
    return grad_model_output, grad_x


def noise_mse(eps_hat, seed):
    batch, sample_numel = dims(eps_hat)
    n_chunks = per_sample.num_chunks(sample_numel)
    partials = torch.empty((batch, n_chunks), dtype=torch.float32, device=eps_hat.device)
    launch(_noise_mse_fwd_kernel, eps_hat, eps_hat, seed, partials, n_chunks, 1.0 / max(eps_hat.numel(), 1))
    return partials.sum() if eps_hat.numel() else partials.sum() / 0.0  # the mean of nothing is NaN


def noise_mse_backward(grad_loss, eps_hat, seed):
    grad = torch.empty_like(eps_hat)
    scale = 2.0 / max(eps_hat.numel(), 1)  # an empty ε̂ has an empty gradient
    launch(_noise_mse_bwd_kernel, eps_hat, grad_loss, eps_hat, seed, grad, scale)
    return grad
