"""Fused VAE reparameterization and KL: z = μ + exp(½·logvar)·ε and kl_b = ½·Σ(μ² + e^logvar − 1 − logvar).

Per-sample grid (``kernels/per_sample.py``) over tensors of shape (B, ...). ε comes from memory (HAS_NOISE) or from
the in-kernel Philox stream, which the backward regenerates. Each program writes the KL sum of its chunk to
partials (B, n_chunks), summed in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from . import per_sample
from .per_sample import block_noise, dims, launch, sample_block

# the pointers of (B, ...) tensors, whose traffic is the op's bytes (read by `genfast bench --static`)
STREAMED = ("mu_ptr", "logvar_ptr", "noise_ptr", "z_ptr", "grad_z_ptr", "grad_mu_ptr", "grad_logvar_ptr")


@triton.jit
def _reparameterize_kl_fwd_kernel(
    mu_ptr, logvar_ptr, noise_ptr, seed_ptr, z_ptr, kl_ptr, n_chunks, sample_base, sample_numel,
    HAS_NOISE: tl.constexpr, WANT_Z: tl.constexpr, WANT_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WANT_Z:
        eps = block_noise(noise_ptr, seed_ptr, sample, start, offs, mask, HAS_NOISE, BLOCK)
        z = mu + tl.exp(0.5 * logvar) * eps
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
    if WANT_KL:
        terms = tl.where(mask, mu * mu + tl.exp(logvar) - 1.0 - logvar, 0.0)
        tl.store(kl_ptr + sample.to(tl.int64) * n_chunks + tl.program_id(0), 0.5 * tl.sum(terms, axis=0))


@triton.jit
def _reparameterize_kl_bwd_kernel(
    mu_ptr, logvar_ptr, noise_ptr, seed_ptr, grad_z_ptr, grad_kl_ptr, grad_mu_ptr, grad_logvar_ptr,
    sample_base, sample_numel,
    HAS_NOISE: tl.constexpr, HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    """dμ = dz + dkl·μ and dlogvar = dz·ε·½σ + dkl·½(σ² − 1), with σ = exp(½·logvar)."""
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_mu = tl.zeros([BLOCK], dtype=tl.float32)
    grad_logvar = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GRAD_Z:
        eps = block_noise(noise_ptr, seed_ptr, sample, start, offs, mask, HAS_NOISE, BLOCK)
        dz = tl.load(grad_z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_mu += dz
        grad_logvar += dz * eps * (0.5 * tl.exp(0.5 * logvar))
    if HAS_GRAD_KL:
        dkl = tl.load(grad_kl_ptr + sample).to(tl.float32)
        grad_mu += dkl * mu
        grad_logvar += dkl * (0.5 * (tl.exp(logvar) - 1.0))
    tl.store(grad_mu_ptr + offs, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_logvar_ptr + offs, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def reparameterize_kl(mu, logvar, noise, seed, want_z, want_kl):
    """Launcher of the forward: (z, kl) like ``genfast.reference.reparameterize.reparameterize_kl``."""
    batch, sample_numel = dims(mu)
    n_chunks = per_sample.num_chunks(sample_numel)
    z = torch.empty_like(mu) if want_z else mu.new_empty(0)
    # every partial is written (a sample without elements has none: its KL is 0); one chunk per sample is the KL
    new_partials = torch.empty if n_chunks else torch.zeros
    partials = new_partials((batch, max(n_chunks, 1)), dtype=torch.float32, device=mu.device) if want_kl else mu
    launch(_reparameterize_kl_fwd_kernel, mu, mu, logvar, noise if noise is not None else mu, seed, z, partials,
           n_chunks, HAS_NOISE=noise is not None, WANT_Z=want_z, WANT_KL=want_kl)
    if not want_kl:
        return z, mu.new_empty(0, dtype=torch.float32)
    return z, partials.view(batch) if n_chunks <= 1 else partials.sum(1)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed):
    """Launcher of the backward: (dμ, dlogvar); ``grad_z`` / ``grad_kl`` may be None."""
    grad_mu = torch.empty_like(mu)
    grad_logvar = torch.empty_like(logvar)
    launch(_reparameterize_kl_bwd_kernel, mu, mu, logvar, noise if noise is not None else mu, seed,
           grad_z if grad_z is not None else mu, grad_kl if grad_kl is not None else mu, grad_mu, grad_logvar,
           HAS_NOISE=noise is not None, HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None)
    return grad_mu, grad_logvar
