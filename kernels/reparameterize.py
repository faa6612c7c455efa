"""Fused VAE reparameterization and KL: z = μ + exp(½·logvar)·ε and kl_b = ½·Σ(μ² + e^logvar − 1 − logvar).

Per-sample grid (``kernels/per_sample.py``) over tensors of shape (B, ...). ε comes from memory (HAS_NOISE) or from
the in-kernel Philox stream, which the backward regenerates. Each program writes the KL sum of its chunk to
partials (B, n_chunks), summed in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from . import aot, per_sample
from .per_sample import block_noise, dims, launch, sample_block


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
    partials = torch.zeros((batch, max(n_chunks, 1)), dtype=torch.float32, device=mu.device)
    launch(_reparameterize_kl_fwd_kernel, mu, mu, logvar, noise if noise is not None else mu, seed, z, partials,
           n_chunks, HAS_NOISE=noise is not None, WANT_Z=want_z, WANT_KL=want_kl)
    if not want_kl:
        return z, mu.new_empty(0, dtype=torch.float32)
    return z, partials[:, 0].clone() if n_chunks <= 1 else partials.sum(1)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed):
    """Launcher of the backward: (dμ, dlogvar); ``grad_z`` / ``grad_kl`` may be None."""
    grad_mu = torch.empty_like(mu)
    grad_logvar = torch.empty_like(logvar)
    launch(_reparameterize_kl_bwd_kernel, mu, mu, logvar, noise if noise is not None else mu, seed,
           grad_z if grad_z is not None else mu, grad_kl if grad_kl is not None else mu, grad_mu, grad_logvar,
           HAS_NOISE=noise is not None, HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None)
    return grad_mu, grad_logvar


# argument types other than the defaults of kernels/aot.py (*dtype for a pointer, i32 for an int)
_ARG_TYPES = {"seed_ptr": "*i64", "kl_ptr": "*fp32", "grad_kl_ptr": "*fp32"}


def aot_variants():
    """Every (kernel, signature, constexprs, num_warps) the launchers can pick, for the ahead-of-time compile test."""
    for dtype in ("fp32", "bf16", "fp16"):
        for block, num_warps in per_sample.block_warps().items():
            for has_noise, want_z, want_kl in ((0, 1, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)):
                consts = dict(HAS_NOISE=has_noise, WANT_Z=want_z, WANT_KL=want_kl, BLOCK=block)
                yield from aot.variants(_reparameterize_kl_fwd_kernel, dtype, consts, num_warps, _ARG_TYPES)
            for has_noise, has_dz, has_dkl in ((0, 1, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)):
                consts = dict(HAS_NOISE=has_noise, HAS_GRAD_Z=has_dz, HAS_GRAD_KL=has_dkl, BLOCK=block)
                yield from aot.variants(_reparameterize_kl_bwd_kernel, dtype, consts, num_warps, _ARG_TYPES)
