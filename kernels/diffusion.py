"""Fused diffusion ops: q_sample, the DDPM and DDIM steps with diffusers' x̂₀ handling, the dynamic threshold of
x̂₀, and the training targets' MSE (the maths: ``genfast.reference.diffusion``).

Grid (cdiv(D, BLOCK), B) over tensors of shape (B, ...) with D = numel / B elements per sample, batch outermost in
memory: each program loads its sample's timesteps and the float64 schedule entries at them once, combines them
into the step's coefficients (P, Q, A, B, C, σ) in fp64 scalars and runs the elementwise math in fp32.

- A step's x̂₀ handling is the constexpr X0: as it is (the step folds to a·x + b·y + σ·ε, a = A + C·P,
  b = B + C·Q: two loads and a store), clipped (x̂₀ = P·x + Q·y clamped to ±clip) or thresholded (clamped to ±s
  and scaled by 1/s, s loaded per sample) — computed in the same pass.
- The dynamic threshold is one extra reduction: each program finds the K largest (or smallest) |x̂₀| of its block
  (a bitonic top-k, ``tl.topk``) and writes them, K = the count of order statistics above (below) the quantile's
  rank rounded up to a power of two, at most BLOCK; the two order statistics around the rank are then among the
  merged candidates (``torch.topk`` on the device: nothing is read back to the host).
- ε comes from memory (NOISE_LOADED), from the in-kernel Philox stream (NOISE_PHILOX), or is absent (NOISE_NONE).
- The MSE regenerates ε from the seed in its forward and its backward and sums per-program partials (B, n_chunks)
  in a fixed order.
"""
import torch
import triton
import triton.language as tl

from genfast._shared import PREDICTION_TYPES, VARIANCE_TYPES, quantile_position

from . import per_sample
from .per_sample import block_noise, dims, launch, sample_block

# where the forward kernels take ε from (the constexpr NOISE)
NOISE_NONE, NOISE_LOADED, NOISE_PHILOX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# the model output's kind (the constexpr PREDICTION: the index in PREDICTION_TYPES)
EPSILON, V_PREDICTION, SAMPLE = (tl.constexpr(PREDICTION_TYPES.index(name))
                                 for name in ("epsilon", "v_prediction", "sample"))
# a step's x̂₀ handling (the constexpr X0)
X0_AS_IS, X0_CLIPPED, X0_THRESHOLDED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# the pointers of (B, ...) tensors, whose traffic is the op's bytes (read by `genfast bench --static`)
STREAMED = ("x0_ptr", "x_ptr", "y_ptr", "noise_ptr", "out_ptr", "grad_ptr", "grad_x0_ptr", "grad_x_ptr", "grad_y_ptr")


@triton.jit
def _prediction_coefficients(sqrt_ac, sqrt_1m_ac, PREDICTION: tl.constexpr):
    """(P, Q, R, S) of x̂₀ = P·x_t + Q·y and ε̂ = R·x_t + S·y, in fp64 (one division)."""
    if PREDICTION == EPSILON:
        p = 1.0 / sqrt_ac
        return p, -sqrt_1m_ac * p, sqrt_ac * 0.0, sqrt_ac * 0.0 + 1.0
    elif PREDICTION == V_PREDICTION:
        return sqrt_ac, -sqrt_1m_ac, sqrt_1m_ac, sqrt_ac
    else:
        r = 1.0 / sqrt_1m_ac
        return sqrt_ac * 0.0, sqrt_ac * 0.0 + 1.0, r, -sqrt_ac * r


@triton.jit
def _alphas_prev(t_prev, ac_ptr, sqrt_ac_ptr):
    """(ᾱ_p, √ᾱ_p) at t_prev, 1 for t_prev < 0."""
    has_prev = t_prev >= 0
    prev = tl.maximum(t_prev, 0)
    return tl.where(has_prev, tl.load(ac_ptr + prev), 1.0), tl.where(has_prev, tl.load(sqrt_ac_ptr + prev), 1.0)


@triton.jit
def _ddpm_coefficients(t, t_prev, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, PREDICTION: tl.constexpr,
                       FIXED_LARGE: tl.constexpr):
    """(P, Q, A, B, C, σ) of the DDPM step from t to t_prev, in fp64 (three divisions and two square roots: each
    thread computes them, so they are written to need few)."""
    ac, sqrt_ac, sqrt_1m_ac = tl.load(ac_ptr + t), tl.load(sqrt_ac_ptr + t), tl.load(sqrt_1m_ac_ptr + t)
    ac_prev, sqrt_ac_prev = _alphas_prev(t_prev, ac_ptr, sqrt_ac_ptr)
    p, q, _, _ = _prediction_coefficients(sqrt_ac, sqrt_1m_ac, PREDICTION)
    alpha = ac / ac_prev
    beta = 1.0 - alpha
    inv_one_minus = 1.0 / (sqrt_1m_ac * sqrt_1m_ac)
    coef1 = sqrt_ac_prev * beta * inv_one_minus
    coef2 = tl.sqrt(alpha) * (1.0 - ac_prev) * inv_one_minus
    if FIXED_LARGE:
        variance = beta
    else:
        variance = (1.0 - ac_prev) * inv_one_minus * beta
    sigma = tl.where(t > 0, tl.sqrt(tl.maximum(variance, 0.0)), 0.0)
    return p, q, coef2, coef2 * 0.0, coef1, sigma


@triton.jit
def _ddim_coefficients(t, t_prev, eta, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, PREDICTION: tl.constexpr,
                       USE_CLIPPED: tl.constexpr):
    """(P, Q, A, B, C, σ) of the DDIM step from t to t_prev, in fp64; σ is exactly 0 for η = 0."""
    ac, sqrt_ac, sqrt_1m_ac = tl.load(ac_ptr + t), tl.load(sqrt_ac_ptr + t), tl.load(sqrt_1m_ac_ptr + t)
    ac_prev, sqrt_ac_prev = _alphas_prev(t_prev, ac_ptr, sqrt_ac_ptr)
    p, q, r, s = _prediction_coefficients(sqrt_ac, sqrt_1m_ac, PREDICTION)
    variance = (1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)
    sigma = tl.where(eta > 0, eta * tl.sqrt(variance), 0.0)
    d = tl.sqrt(1.0 - ac_prev - sigma * sigma)
    if USE_CLIPPED:
        d_over = d / sqrt_1m_ac
        return p, q, d_over, d * 0.0, sqrt_ac_prev - d_over * sqrt_ac, sigma
    else:
        return p, q, d * r, d * s, sqrt_ac_prev, sigma


@triton.jit
def _x0_bound(threshold_ptr, clip, sample, X0: tl.constexpr):
    """(bound, 1/scale) of the x̂₀ handling: (clip, 1) or (s, 1/s) with s the sample's threshold."""
    if X0 == X0_THRESHOLDED:
        s = tl.load(threshold_ptr + sample).to(tl.float32)
        return s, 1.0 / s
    else:
        return clip, 1.0


@triton.jit
def _step_fwd(x_ptr, y_ptr, noise_ptr, seed_ptr, threshold_ptr, out_ptr, clip, coefficients, sample, start, offs, mask,
              X0: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """out = A·x + B·y + C·x̂₀' + σ·ε on this block (a·x + b·y + σ·ε when x̂₀ is as it is)."""
    p, q, a, b, c, sigma = coefficients
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if X0 == X0_AS_IS:
        out = (a + c * p).to(tl.float32) * x + (b + c * q).to(tl.float32) * y
    else:
        bound, inv_scale = _x0_bound(threshold_ptr, clip, sample, X0)
        x0 = p.to(tl.float32) * x + q.to(tl.float32) * y
        x0 = tl.minimum(tl.maximum(x0, -bound), bound) * inv_scale
        out = a.to(tl.float32) * x + b.to(tl.float32) * y + c.to(tl.float32) * x0
    if NOISE != NOISE_NONE:
        out += sigma.to(tl.float32) * block_noise(noise_ptr, seed_ptr, sample, start, offs, mask,
                                                  NOISE == NOISE_LOADED, BLOCK)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_bwd(grad_ptr, y_ptr, x_ptr, threshold_ptr, grad_y_ptr, grad_x_ptr, clip, coefficients, sample, offs, mask,
              X0: tl.constexpr):
    """dx = (A + C·m·P/s)·g and dy = (B + C·m·Q/s)·g on this block, m = 1 where |x̂₀| ≤ the bound."""
    p, q, a, b, c, _ = coefficients
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if X0 == X0_AS_IS:
        grad_x = (a + c * p).to(tl.float32) * g
        grad_y = (b + c * q).to(tl.float32) * g
    else:
        bound, inv_scale = _x0_bound(threshold_ptr, clip, sample, X0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = p.to(tl.float32) * x + q.to(tl.float32) * y
        passed = tl.where((x0 >= -bound) & (x0 <= bound), inv_scale * c.to(tl.float32) * g, 0.0)
        grad_x = a.to(tl.float32) * g + p.to(tl.float32) * passed
        grad_y = b.to(tl.float32) * g + q.to(tl.float32) * passed
    tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_y_ptr + offs, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _t_prev(t, t_prev_ptr, sample, HAS_T_PREV: tl.constexpr):
    """The sample's t_prev: loaded, or t − 1."""
    if HAS_T_PREV:
        return tl.load(t_prev_ptr + sample)
    else:
        return t - 1


@triton.jit
def _q_sample_fwd_kernel(
    x0_ptr, t_ptr, noise_ptr, seed_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, out_ptr, sample_base, sample_numel,
    NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε on this block."""
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    t = tl.load(t_ptr + sample)
    out = tl.load(sqrt_ac_ptr + t).to(tl.float32) * tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE != NOISE_NONE:
        out += tl.load(sqrt_1m_ac_ptr + t).to(tl.float32) * block_noise(noise_ptr, seed_ptr, sample, start, offs,
                                                                         mask, NOISE == NOISE_LOADED, BLOCK)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_bwd_kernel(
    grad_ptr, t_ptr, sqrt_ac_ptr, grad_x0_ptr, sample_base, sample_numel, BLOCK: tl.constexpr,
):
    """dx_0 = √ᾱ_t·g on this block."""
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    a = tl.load(sqrt_ac_ptr + tl.load(t_ptr + sample)).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x0_ptr + offs, (a * g).to(grad_x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ddpm_fwd_kernel(
    y_ptr, t_ptr, t_prev_ptr, x_ptr, noise_ptr, seed_ptr, threshold_ptr, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr,
    out_ptr, clip, sample_base, sample_numel, HAS_T_PREV: tl.constexpr, PREDICTION: tl.constexpr,
    FIXED_LARGE: tl.constexpr, X0: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    t = tl.load(t_ptr + sample)
    coefficients = _ddpm_coefficients(t, _t_prev(t, t_prev_ptr, sample, HAS_T_PREV), ac_ptr, sqrt_ac_ptr,
                                      sqrt_1m_ac_ptr, PREDICTION, FIXED_LARGE)
    _step_fwd(x_ptr, y_ptr, noise_ptr, seed_ptr, threshold_ptr, out_ptr, clip, coefficients, sample, start, offs, mask,
              X0, NOISE, BLOCK)


@triton.jit
def _ddpm_bwd_kernel(
    grad_ptr, y_ptr, x_ptr, threshold_ptr, t_ptr, t_prev_ptr, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, grad_y_ptr,
    grad_x_ptr, clip, sample_base, sample_numel, HAS_T_PREV: tl.constexpr, PREDICTION: tl.constexpr,
    FIXED_LARGE: tl.constexpr, X0: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    t = tl.load(t_ptr + sample)
    coefficients = _ddpm_coefficients(t, _t_prev(t, t_prev_ptr, sample, HAS_T_PREV), ac_ptr, sqrt_ac_ptr,
                                      sqrt_1m_ac_ptr, PREDICTION, FIXED_LARGE)
    _step_bwd(grad_ptr, y_ptr, x_ptr, threshold_ptr, grad_y_ptr, grad_x_ptr, clip, coefficients, sample, offs, mask,
              X0)


@triton.jit
def _ddim_fwd_kernel(
    y_ptr, t_ptr, t_prev_ptr, x_ptr, noise_ptr, seed_ptr, threshold_ptr, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr,
    out_ptr, eta, clip, sample_base, sample_numel, PREDICTION: tl.constexpr, USE_CLIPPED: tl.constexpr,
    X0: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    coefficients = _ddim_coefficients(tl.load(t_ptr + sample), tl.load(t_prev_ptr + sample), eta, ac_ptr,
                                      sqrt_ac_ptr, sqrt_1m_ac_ptr, PREDICTION, USE_CLIPPED)
    _step_fwd(x_ptr, y_ptr, noise_ptr, seed_ptr, threshold_ptr, out_ptr, clip, coefficients, sample, start, offs, mask,
              X0, NOISE, BLOCK)


@triton.jit
def _ddim_bwd_kernel(
    grad_ptr, y_ptr, x_ptr, threshold_ptr, t_ptr, t_prev_ptr, ac_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, grad_y_ptr,
    grad_x_ptr, eta, clip, sample_base, sample_numel, PREDICTION: tl.constexpr, USE_CLIPPED: tl.constexpr,
    X0: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    coefficients = _ddim_coefficients(tl.load(t_ptr + sample), tl.load(t_prev_ptr + sample), eta, ac_ptr,
                                      sqrt_ac_ptr, sqrt_1m_ac_ptr, PREDICTION, USE_CLIPPED)
    _step_bwd(grad_ptr, y_ptr, x_ptr, threshold_ptr, grad_y_ptr, grad_x_ptr, clip, coefficients, sample, offs, mask,
              X0)


@triton.jit
def _threshold_candidates_kernel(
    y_ptr, t_ptr, x_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, candidates_ptr, n_chunks, sample_base, sample_numel,
    PREDICTION: tl.constexpr, LARGEST: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    """candidates[b, chunk, :COUNT] = the COUNT largest (LARGEST) or smallest |x̂₀| of this block (a bitonic top-k,
    ``tl.topk``, of |x̂₀| or −|x̂₀|), +inf or −inf past the sample's end: the order statistics the quantile needs
    are among them."""
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    t = tl.load(t_ptr + sample)
    p, q, _, _ = _prediction_coefficients(tl.load(sqrt_ac_ptr + t), tl.load(sqrt_1m_ac_ptr + t), PREDICTION)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    magnitude = tl.abs(p.to(tl.float32) * x + q.to(tl.float32) * y)
    if LARGEST:
        top = tl.topk(tl.where(mask, magnitude, float("-inf")), COUNT)
    else:
        top = -tl.topk(tl.where(mask, -magnitude, float("-inf")), COUNT)
    row = (sample.to(tl.int64) * n_chunks + tl.program_id(0)) * COUNT
    tl.store(candidates_ptr + row + tl.arange(0, COUNT), top)


@triton.jit
def _target_error(y_ptr, seed_ptr, x0_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, sample, start, offs, mask,
                  PREDICTION: tl.constexpr, BLOCK: tl.constexpr):
    """y − target on this block (0 past the sample's end): target = ε, √ᾱ_t·ε − √(1−ᾱ_t)·x₀ or x₀."""
    diff = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PREDICTION == SAMPLE:
        diff -= tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = block_noise(y_ptr, seed_ptr, sample, start, offs, mask, False, BLOCK)
        if PREDICTION == EPSILON:
            diff -= eps
        else:
            t = tl.load(t_ptr + sample)
            x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            diff -= tl.load(sqrt_ac_ptr + t).to(tl.float32) * eps - tl.load(sqrt_1m_ac_ptr + t).to(tl.float32) * x0
    return tl.where(mask, diff, 0.0)


@triton.jit
def _target_mse_fwd_kernel(
    y_ptr, seed_ptr, x0_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, partial_ptr, n_chunks, inv_numel, sample_base,
    sample_numel, PREDICTION: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[b, chunk] = Σ (y − target)² / numel over this block: the loss is the (fixed-order) sum of the
    partials."""
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    diff = _target_error(y_ptr, seed_ptr, x0_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, sample, start, offs, mask,
                         PREDICTION, BLOCK)
    tl.store(partial_ptr + sample.to(tl.int64) * n_chunks + tl.program_id(0), tl.sum(diff * diff, axis=0) * inv_numel)


@triton.jit
def _target_mse_bwd_kernel(
    grad_loss_ptr, y_ptr, seed_ptr, x0_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, grad_ptr, scale, sample_base,
    sample_numel, PREDICTION: tl.constexpr, BLOCK: tl.constexpr,
):
    sample, start, offs, mask = sample_block(sample_base, sample_numel, BLOCK)
    diff = _target_error(y_ptr, seed_ptr, x0_ptr, t_ptr, sqrt_ac_ptr, sqrt_1m_ac_ptr, sample, start, offs, mask,
                         PREDICTION, BLOCK)
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


def _x0_args(threshold, clip, x):
    """(threshold pointer, clip, X0) for the step kernels."""
    if threshold is not None:
        return threshold, 0.0, X0_THRESHOLDED.value
    if clip is not None:
        return x, float(clip), X0_CLIPPED.value
    return x, 0.0, X0_AS_IS.value


def q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    out = torch.empty_like(x0)
    noise, seed, mode = _noise_args(noise, seed, x0, t)
    launch(_q_sample_fwd_kernel, x0, x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out,
           NOISE=mode)
    return out


def q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    grad_x0 = torch.empty_like(grad)
    launch(_q_sample_bwd_kernel, grad, grad, t, sqrt_alphas_cumprod, grad_x0)
    return grad_x0


def ddpm_step(model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod, sqrt_alphas_cumprod,
              sqrt_one_minus_alphas_cumprod, prediction_type, variance_type, clip):
    out = torch.empty_like(x_t)
    noise, seed, mode = _noise_args(noise, seed, x_t, t)
    threshold, clip, x0_mode = _x0_args(threshold, clip, x_t)
    launch(_ddpm_fwd_kernel, x_t, model_output, t, t if t_prev is None else t_prev, x_t, noise, seed, threshold,
           alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out, clip,
           HAS_T_PREV=t_prev is not None, PREDICTION=PREDICTION_TYPES.index(prediction_type),
           FIXED_LARGE=VARIANCE_TYPES.index(variance_type) == 1, X0=x0_mode, NOISE=mode)
    return out


def ddpm_step_backward(grad, model_output, x_t, threshold, t, t_prev, alphas_cumprod, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, prediction_type, variance_type, clip):
    grad_model_output, grad_x = torch.empty_like(grad), torch.empty_like(grad)
    threshold, clip, x0_mode = _x0_args(threshold, clip, grad)
    launch(_ddpm_bwd_kernel, grad, grad, grad if model_output is None else model_output, grad if x_t is None else x_t,
           threshold, t, t if t_prev is None else t_prev, alphas_cumprod, sqrt_alphas_cumprod,
           sqrt_one_minus_alphas_cumprod, grad_model_output, grad_x, clip, HAS_T_PREV=t_prev is not None,
           PREDICTION=PREDICTION_TYPES.index(prediction_type), FIXED_LARGE=VARIANCE_TYPES.index(variance_type) == 1,
           X0=x0_mode)
    return grad_model_output, grad_x


def ddim_step(model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod, sqrt_alphas_cumprod,
              sqrt_one_minus_alphas_cumprod, eta, prediction_type, use_clipped_model_output, clip):
    out = torch.empty_like(x_t)
    noise, seed, mode = _noise_args(noise, seed, x_t, t)
    threshold, clip, x0_mode = _x0_args(threshold, clip, x_t)
    launch(_ddim_fwd_kernel, x_t, model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod,
           sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out, eta, clip,
           PREDICTION=PREDICTION_TYPES.index(prediction_type), USE_CLIPPED=use_clipped_model_output, X0=x0_mode,
           NOISE=mode)
    return out


def ddim_step_backward(grad, model_output, x_t, threshold, t, t_prev, alphas_cumprod, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, eta, prediction_type, use_clipped_model_output, clip):
    grad_model_output, grad_x = torch.empty_like(grad), torch.empty_like(grad)
    threshold, clip, x0_mode = _x0_args(threshold, clip, grad)
    launch(_ddim_bwd_kernel, grad, grad, grad if model_output is None else model_output, grad if x_t is None else x_t,
           threshold, t, t_prev, alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
           grad_model_output, grad_x, eta, clip, PREDICTION=PREDICTION_TYPES.index(prediction_type),
           USE_CLIPPED=use_clipped_model_output, X0=x0_mode)
    return grad_model_output, grad_x


def dynamic_threshold(model_output, t, x_t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type,
                      ratio, max_value):
    batch, sample_numel = dims(x_t)
    if sample_numel == 0 or batch == 0:
        return torch.ones(batch, dtype=torch.float32, device=x_t.device)
    lo, hi, weight = quantile_position(sample_numel, ratio, torch.float32)
    above, below = sample_numel - lo, hi + 1  # order statistics at or above rank lo, at or below rank hi
    largest = above <= below
    k = above if largest else below
    count = triton.next_power_of_2(max(2, min(k, per_sample.config(sample_numel)[0])))  # tl.topk takes k ≥ 2
    n_chunks = per_sample.num_chunks(sample_numel)
    candidates = torch.empty((batch, n_chunks * count), dtype=torch.float32, device=x_t.device)
    launch(_threshold_candidates_kernel, x_t, model_output, t, x_t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
           candidates, n_chunks, PREDICTION=PREDICTION_TYPES.index(prediction_type), LARGEST=largest, COUNT=count)
    ordered = torch.topk(candidates, k, dim=1, largest=largest, sorted=True).values
    if largest:  # ordered[:, j] is the order statistic at rank numel − 1 − j
        v_lo, v_hi = ordered[:, above - 1], ordered[:, above - 1 - (hi - lo)]
    else:
        v_lo, v_hi = ordered[:, lo], ordered[:, hi]
    quantile = torch.lerp(v_lo, v_hi, weight)
    return quantile.clamp(min=1.0, max=max_value)  # min first, then max: max_value when it is below 1


def _target_args(model_output, x0):
    """The x0 pointer of the MSE kernels (model_output where the target does not read x0)."""
    return model_output if x0 is None else x0


def target_mse(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type):
    batch, sample_numel = dims(model_output)
    n_chunks = per_sample.num_chunks(sample_numel)
    partials = torch.empty((batch, n_chunks), dtype=torch.float32, device=model_output.device)
    launch(_target_mse_fwd_kernel, model_output, model_output, seed, _target_args(model_output, x0), t,
           sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, partials, n_chunks,
           1.0 / max(model_output.numel(), 1), PREDICTION=PREDICTION_TYPES.index(prediction_type))
    return partials.sum() if model_output.numel() else partials.sum() / 0.0  # the mean of nothing is NaN


def target_mse_backward(grad_loss, model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                        prediction_type):
    grad = torch.empty_like(model_output)
    scale = 2.0 / max(model_output.numel(), 1)  # an empty y has an empty gradient
    launch(_target_mse_bwd_kernel, model_output, grad_loss, model_output, seed, _target_args(model_output, x0), t,
           sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, grad, scale,
           PREDICTION=PREDICTION_TYPES.index(prediction_type))
    return grad
