"""Fused WGAN-GP kernels: the interpolation x̂ = fake + α_b·(real − fake) with its backward, and the penalty
p = weight·mean_b(‖g_b‖₂ − 1)² on the critic's gradient g with its backward.

The elementwise kernels use the per-sample grid of ``kernels/per_sample.py``. The penalty: each program of the
grid writes the fp32 sum of squares of its chunk to partials (B, n_chunks); one program then sums every sample's
partials in a fixed order, takes the norms and sums (‖g_b‖ − 1)² in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from genfast._shared import penalty_scale

from . import per_sample
from .per_sample import dims, launch, sample_block

# the pointers of (B, ...) tensors, whose traffic is the op's bytes (read by `genfast bench --static`)
STREAMED = ("real_ptr", "fake_ptr", "out_ptr", "grad_ptr", "grad_real_ptr", "grad_fake_ptr")

# ---- heuristics: the single program that finishes the penalty walks partials (B, n_chunks) in tiles
# (FINISH_B, FINISH_CHUNKS) ------------------------------------------------------------------------------------
FINISH_B = 64
FINISH_CHUNKS = 16
FINISH_WARPS = 4


@triton.jit
def _interpolate_fwd_kernel(real_ptr, fake_ptr, alpha_ptr, out_ptr, sample_base, sample_numel, BLOCK: tl.constexpr):
    sample, _, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    alpha = tl.load(alpha_ptr + sample)
    real = tl.load(real_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    fake = tl.load(fake_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (fake + alpha * (real - fake)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interpolate_bwd_kernel(
    grad_ptr, alpha_ptr, grad_real_ptr, grad_fake_ptr, sample_base, sample_numel,
    WANT_REAL: tl.constexpr, WANT_FAKE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, _, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    alpha = tl.load(alpha_ptr + sample)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WANT_REAL:
        tl.store(grad_real_ptr + offs, (alpha * grad).to(grad_real_ptr.dtype.element_ty), mask=mask)
    if WANT_FAKE:
        tl.store(grad_fake_ptr + offs, ((1.0 - alpha) * grad).to(grad_fake_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_squares_kernel(grad_ptr, partials_ptr, n_chunks, sample_base, sample_numel, BLOCK: tl.constexpr):
    sample, _, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partials_ptr + sample.to(tl.int64) * n_chunks + tl.program_id(0), tl.sum(grad * grad, axis=0))


@triton.jit
def _penalty_finish_kernel(
    partials_ptr, norms_ptr, penalty_ptr, batch, n_chunks, scale,
    BLOCK_B: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    """One program: norms_b = √Σ_c partials[b, c] and penalty = scale·Σ_b(norms_b − 1)², both in a fixed order."""
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < batch
        sums = tl.zeros([BLOCK_B, BLOCK_CHUNKS], dtype=tl.float32)
        for c0 in range(0, n_chunks, BLOCK_CHUNKS):
            cols = c0 + tl.arange(0, BLOCK_CHUNKS)
            offs = rows.to(tl.int64)[:, None] * n_chunks + cols[None, :]
            sums += tl.load(partials_ptr + offs, mask=row_mask[:, None] & (cols < n_chunks)[None, :], other=0.0)
        norms = tl.sqrt(tl.sum(sums, axis=1))
        tl.store(norms_ptr + rows, norms, mask=row_mask)
        total += tl.where(row_mask, (norms - 1.0) * (norms - 1.0), 0.0)
    tl.store(penalty_ptr, scale * tl.sum(total, axis=0))


@triton.jit
def _penalty_bwd_kernel(
    grad_penalty_ptr, grad_ptr, norms_ptr, out_ptr, scale2, sample_base, sample_numel, BLOCK: tl.constexpr,
):
    """dg_b = dp·scale2·(‖g_b‖ − 1)/‖g_b‖·g_b, with scale2 = 2·weight/B, and 0 where ‖g_b‖ = 0."""
    sample, _, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    norm = tl.load(norms_ptr + sample)
    nonzero = norm != 0.0
    inv_norm = tl.where(nonzero, 1.0 / tl.where(nonzero, norm, 1.0), 0.0)  # no division by zero, even discarded
    coef = tl.load(grad_penalty_ptr).to(tl.float32) * scale2 * (norm - 1.0) * inv_norm
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (coef * grad).to(out_ptr.dtype.element_ty), mask=mask)


def interpolate(real, fake, alpha):
    """Launcher: x̂ like ``genfast.reference.gradient_penalty.interpolate`` (``alpha`` fp32 of shape (B,))."""
    out = torch.empty_like(real)
    launch(_interpolate_fwd_kernel, real, real, fake, alpha, out)
    return out


def interpolate_backward(grad, alpha, want_real, want_fake):
    """Launcher: (d real, d fake) = (α·g, (1 − α)·g); a gradient not wanted is an empty tensor."""
    grad_real = torch.empty_like(grad) if want_real else grad.new_empty(0)
    grad_fake = torch.empty_like(grad) if want_fake else grad.new_empty(0)
    if want_real or want_fake:
        launch(_interpolate_bwd_kernel, grad, grad, alpha, grad_real if want_real else grad,
               grad_fake if want_fake else grad, WANT_REAL=want_real, WANT_FAKE=want_fake)
    return grad_real, grad_fake


def gradient_norm_penalty(grad, weight):
    """Launcher: (penalty, norms) like ``genfast.reference.gradient_penalty.gradient_norm_penalty``, fp32."""
    batch, sample_numel = dims(grad)
    n_chunks = max(per_sample.num_chunks(sample_numel), 1)  # a sample without elements keeps one zero partial
    norms = torch.empty(batch, dtype=torch.float32, device=grad.device)
    if batch == 0:
        return torch.zeros((), dtype=torch.float32, device=grad.device), norms
    penalty = torch.empty((), dtype=torch.float32, device=grad.device)
    # every partial is written, except the one zero partial of samples without elements
    partials = (torch.empty if sample_numel else torch.zeros)((batch, n_chunks), dtype=torch.float32,
                                                               device=grad.device)
    launch(_sum_squares_kernel, grad, grad, partials, n_chunks)
    _penalty_finish_kernel[(1,)](
        partials, norms, penalty, batch, n_chunks, penalty_scale(weight, batch),
        BLOCK_B=FINISH_B, BLOCK_CHUNKS=FINISH_CHUNKS, num_warps=FINISH_WARPS,
    )
    return penalty, norms


def gradient_norm_penalty_backward(grad_penalty, grad, norms, weight):
    """Launcher: dg_b = dp·weight·(2/B)·(‖g_b‖ − 1)·g_b/‖g_b‖ (0 where ‖g_b‖ = 0), in g's dtype and layout."""
    out = torch.empty_like(grad)
    launch(_penalty_bwd_kernel, grad, grad_penalty, grad, norms, out, 2.0 * penalty_scale(weight, grad.shape[0]))
    return out
