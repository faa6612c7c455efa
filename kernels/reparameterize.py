"""Fused VAE reparameterization and KL: z = μ + exp(½·logvar)·ε and kl_b = ½·Σ(μ² + e^logvar − 1 − logvar).

Grid (cdiv(D, BLOCK), B) over tensors of shape (B, ...) with D = numel / B elements per sample, batch outermost in
memory. ε comes from memory (HAS_NOISE) or from the in-kernel Philox stream, which the backward regenerates.
The KL of a sample is summed by the programs of its row into partials (B, n_chunks), summed in a fixed order.
"""
import torch
import triton
import triton.language as tl

from .random import load_philox_key, philox_normal_block

# ---- heuristics: the one place block sizes and warps are chosen ---------------------------------------------
BLOCKS = (256, 1024)


def _config(sample_numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for D elements per sample."""
    return (256, 2) if sample_numel <= 256 else (1024, 4)


@triton.jit
def _reparameterize_kl_fwd_kernel(
    mu_ptr, logvar_ptr, noise_ptr, seed_ptr, z_ptr, kl_ptr, sample_numel, n_chunks,
    HAS_NOISE: tl.constexpr, WANT_Z: tl.constexpr, WANT_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    cols = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < sample_numel
    offs = sample.to(tl.int64) * sample_numel + cols
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WANT_Z:
        if HAS_NOISE:
            eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            key, off_lo, off_hi = load_philox_key(seed_ptr)
            eps = philox_normal_block(key, off_lo, off_hi, sample, chunk * BLOCK, BLOCK)
        z = mu + tl.exp(0.5 * logvar) * eps
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
    if WANT_KL:
        terms = tl.where(mask, mu * mu + tl.exp(logvar) - 1.0 - logvar, 0.0)
        tl.store(kl_ptr + sample.to(tl.int64) * n_chunks + chunk, 0.5 * tl.sum(terms, axis=0))


@triton.jit
def _reparameterize_kl_bwd_kernel(
    mu_ptr, logvar_ptr, noise_ptr, seed_ptr, grad_z_ptr, grad_kl_ptr, grad_mu_ptr, grad_logvar_ptr, sample_numel,
    HAS_NOISE: tl.constexpr, HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    cols = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < sample_numel
    offs = sample.to(tl.int64) * sample_numel + cols
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_mu = tl.zeros([BLOCK], dtype=tl.float32)
    grad_logvar = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GRAD_Z:
        if HAS_NOISE:
            eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            key, off_lo, off_hi = load_philox_key(seed_ptr)
            eps = philox_normal_block(key, off_lo, off_hi, sample, chunk * BLOCK, BLOCK)
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
    """Launcher of the forward: (z, kl) like ``genfast.reference.vae.reparameterize_kl``."""
    batch = mu.shape[0]
    sample_numel = mu.numel() // batch if batch else 0
    block, num_warps = _config(sample_numel)
    n_chunks = triton.cdiv(sample_numel, block)
    z = torch.empty_like(mu) if want_z else mu.new_empty(0)
    partials = torch.empty((batch, n_chunks), dtype=torch.float32, device=mu.device)
    if mu.numel():
        _reparameterize_kl_fwd_kernel[(n_chunks, batch)](
            mu, logvar, noise if noise is not None else mu, seed, z, partials, sample_numel, n_chunks,
            HAS_NOISE=noise is not None, WANT_Z=want_z, WANT_KL=want_kl, BLOCK=block, num_warps=num_warps,
        )
    if not want_kl:
        return z, mu.new_empty(0, dtype=torch.float32)
    if sample_numel == 0:
        return z, torch.zeros(batch, dtype=torch.float32, device=mu.device)
    return z, partials[:, 0].clone() if n_chunks == 1 else partials.sum(1)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed):
    """Launcher of the backward: (dμ, dlogvar); ``grad_z`` / ``grad_kl`` may be None."""
    batch = mu.shape[0]
    sample_numel = mu.numel() // batch if batch else 0
    block, num_warps = _config(sample_numel)
    grad_mu = torch.empty_like(mu)
    grad_logvar = torch.empty_like(logvar)
    if mu.numel():
        _reparameterize_kl_bwd_kernel[(triton.cdiv(sample_numel, block), batch)](
            mu, logvar, noise if noise is not None else mu, seed,
            grad_z if grad_z is not None else mu, grad_kl if grad_kl is not None else mu,
            grad_mu, grad_logvar, sample_numel,
            HAS_NOISE=noise is not None, HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None,
            BLOCK=block, num_warps=num_warps,
        )
    return grad_mu, grad_logvar


def aot_variants():
    """Every (kernel, signature, constexprs, num_warps) the launchers can pick, for the ahead-of-time compile test."""
    num_warps = {block: _config(block)[1] for block in BLOCKS}
    for dtype in ("fp32", "bf16", "fp16"):
        for block in BLOCKS:
            for has_noise, want_z, want_kl in ((0, 1, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)):
                sig = {"mu_ptr": f"*{dtype}", "logvar_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}",
                       "seed_ptr": "*i64", "z_ptr": f"*{dtype}", "kl_ptr": "*fp32", "sample_numel": "i32",
                       "n_chunks": "i32"}
                consts = dict(HAS_NOISE=has_noise, WANT_Z=want_z, WANT_KL=want_kl, BLOCK=block)
                yield _reparameterize_kl_fwd_kernel, sig, consts, num_warps[block]
            for has_noise, has_dz, has_dkl in ((0, 1, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1)):
                sig = {"mu_ptr": f"*{dtype}", "logvar_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}",
                       "seed_ptr": "*i64", "grad_z_ptr": f"*{dtype}", "grad_kl_ptr": "*fp32",
                       "grad_mu_ptr": f"*{dtype}", "grad_logvar_ptr": f"*{dtype}", "sample_numel": "i32"}
                consts = dict(HAS_NOISE=has_noise, HAS_GRAD_Z=has_dz, HAS_GRAD_KL=has_dkl, BLOCK=block)
                yield _reparameterize_kl_bwd_kernel, sig, consts, num_warps[block]
