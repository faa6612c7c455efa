"""What the diffusion tests share (tests/test_diffusion.py: schedule, q_sample, the loss; tests/test_diffusion_steps.py:
the DDPM / DDIM steps and the dynamic threshold): the cases, the schedule, the textbook formulas in float64 (torch
code independent of genfast, written after the papers and diffusers' schedulers), the forward/backward check and
the registered ops."""
import pytest
import torch
from torch import nn

import genfast
from genfast._shared import triton_interpret
from tolerances import assert_close, assert_grads_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1x1 spatial, batch 1, non-powers of two, a sample longer than one block (2 chunks), 2-d (B, D) inputs
SHAPES = [(1, 1, 1, 1), (3, 2, 1, 1), (2, 3, 5, 7), (2, 3, 20, 20), (3, 37)]
# channels_last is batch-major and kept; "strided" (every other channel) is not and is copied
CASES = [(shape, layout) for shape in SHAPES
         for layout in (("contiguous", "channels_last", "strided") if len(shape) == 4 else ("contiguous",))]
T = 50
SCHEDULE = genfast.NoiseSchedule.linear(num_steps=T, beta_start=1e-3, beta_end=0.2)

q_sample_op = torch.ops.genfast.q_sample.default
q_sample_backward_op = torch.ops.genfast.q_sample_backward.default
ddpm_op = torch.ops.genfast.ddpm_step.default
ddpm_backward_op = torch.ops.genfast.ddpm_step_backward.default
ddim_op = torch.ops.genfast.ddim_step.default
ddim_backward_op = torch.ops.genfast.ddim_step_backward.default
threshold_op = torch.ops.genfast.dynamic_threshold.default
mse_op = torch.ops.genfast.target_mse.default
mse_backward_op = torch.ops.genfast.target_mse_backward.default
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# x̂₀ handling: as it is, clipped to ±1.5, or dynamically thresholded with ratio 0.9 and a max value of 1.5 (so s
# lands inside (1, 1.5) on the scaled test data, where the quantile matters)
HANDLINGS = {"as_is": dict(clip_sample=False), "clip": dict(clip_sample_range=1.5),
             "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)}


def randn(shape, dtype=torch.float32, layout="contiguous"):
    x = torch.randn(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], 2 * shape[1], *shape[2:])[:, ::2]
    return x.to(dtype)


def laid_out(x, layout):
    """A copy of ``x`` in ``layout`` ("strided": every other channel of a wider tensor)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.clone()


def eps_step_inputs(shape, dtype, layout, t):
    """(ε̂, x_t) of a good ε-prediction model: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, ε̂ = ε + 0.05·noise, with x₀ uniform
    in (−1.3, 1.3) and 0 at every sample's first element, so that clipping x̂₀ to ±1 leaves some elements in and
    takes others out."""
    x0 = torch.rand(shape) * 2.6 - 1.3
    x0.view(shape[0], -1)[:, 0] = 0.0
    eps = torch.randn(shape)
    ac = col(closed_form(SCHEDULE)[2][t], x0)
    x = (ac.sqrt() * x0 + (1 - ac).sqrt() * eps).float()
    return laid_out((eps + 0.05 * torch.randn(shape)).to(dtype), layout), laid_out(x.to(dtype), layout)


def timesteps(batch, low=0, high=T):
    return torch.randint(low, high, (batch,))


def col(v, like):
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def closed_form(schedule):
    """(β, α, ᾱ, ᾱ_{t−1}) in float64 from the betas alone."""
    betas = schedule.betas
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    return betas, alphas, ac, torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])


def textbook_q_sample(x0, t, noise):
    ac = closed_form(SCHEDULE)[2][t]
    return col(ac.sqrt(), x0) * x0.double() + col((1 - ac).sqrt(), x0) * noise.double()


def textbook_ddpm_algorithm2(eps_hat, t, x, z):
    """Ho et al. Algorithm 2 (ε-prediction, no clipping): x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t + σ_t·z,
    σ_t² = β_t(1−ᾱ_{t−1})/(1−ᾱ_t)."""
    betas, alphas, ac, ac_prev = (col(v[t], x) for v in closed_form(SCHEDULE))
    sigma = (betas * (1 - ac_prev) / (1 - ac)).sqrt()
    return (x - betas / (1 - ac).sqrt() * eps_hat) / alphas.sqrt() + sigma * z


def _x0_and_eps(y, x, ac, prediction_type):
    """(x̂₀, ε̂) from the model output y, diffusers' formulas."""
    if prediction_type == "epsilon":
        return (x - (1 - ac).sqrt() * y) / ac.sqrt(), y
    if prediction_type == "v_prediction":
        return ac.sqrt() * x - (1 - ac).sqrt() * y, ac.sqrt() * y + (1 - ac).sqrt() * x
    return y, (x - ac.sqrt() * y) / (1 - ac).sqrt()


def _handle_x0(x0, clip_sample=True, clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995,
               sample_max_value=1.0):
    """x̂₀ clipped, or dynamically thresholded (s from torch.quantile, held constant: detached), as diffusers."""
    if thresholding:
        s = torch.quantile(x0.detach().abs().reshape(x0.shape[0], -1), dynamic_thresholding_ratio, dim=1)
        s = col(s.clamp(min=1, max=sample_max_value), x0)
        return torch.clamp(x0, -s, s) / s
    return x0.clamp(-clip_sample_range, clip_sample_range) if clip_sample else x0


def _alphas(t, t_prev, x):
    ac_all = closed_form(SCHEDULE)[2]
    return col(ac_all[t], x), col(torch.where(t_prev >= 0, ac_all[t_prev.clamp(min=0)], 1.0), x)


def textbook_ddpm(y, t, x, z, *, t_prev=None, prediction_type="epsilon", variance_type="fixed_small", **handling):
    """DDPMScheduler.step: x̂₀ (handled), x_prev = √ᾱ_p·β'/(1−ᾱ_t)·x̂₀ + √α'·(1−ᾱ_p)/(1−ᾱ_t)·x_t + σ·z with
    α' = ᾱ_t/ᾱ_p, β' = 1 − α', σ² = (1−ᾱ_p)/(1−ᾱ_t)·β' (fixed_small) or β' (fixed_large), σ = 0 at t = 0."""
    ac, ac_prev = _alphas(t, t - 1 if t_prev is None else t_prev, x)
    alpha = ac / ac_prev
    x0 = _handle_x0(_x0_and_eps(y, x, ac, prediction_type)[0], **handling)
    mean = ac_prev.sqrt() * (1 - alpha) / (1 - ac) * x0 + alpha.sqrt() * (1 - ac_prev) / (1 - ac) * x
    variance = (1 - ac_prev) / (1 - ac) * (1 - alpha) if variance_type == "fixed_small" else 1 - alpha
    return mean + torch.where(col(t, x) > 0, variance.clamp(min=0).sqrt(), 0.0) * z


def textbook_ddim(y, t, t_prev, x, z, eta, *, prediction_type="epsilon", use_clipped_model_output=False,
                  **handling):
    """Song et al. eq. 12 as DDIMScheduler.step: σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p), ᾱ_p = 1 for t_prev < 0."""
    ac, ac_prev = _alphas(t, t_prev, x)
    sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).clamp(min=0).sqrt()
    x0, eps = _x0_and_eps(y, x, ac, prediction_type)
    x0 = _handle_x0(x0, **handling)
    if use_clipped_model_output:
        eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt()
    return ac_prev.sqrt() * x0 + (1 - ac_prev - sigma**2).sqrt() * eps + sigma * z


def textbook_grads(formula, inputs, grad):
    """(output, input gradients) of ``formula`` in float64 by autograd."""
    inputs64 = [v.detach().double().requires_grad_() for v in inputs]
    out = formula(*inputs64)
    return out.detach(), torch.autograd.grad(out, inputs64, grad.double())


def check_forward_backward(fn, formula, inputs, dtype, layout):
    """fn(*inputs) and its input gradients (a random upstream gradient) against the float64 textbook formula and,
    on a kernel backend, against the reference, at the tolerances of dtype (gradients also by relative norm)."""
    inputs = [v.detach().requires_grad_() for v in inputs]
    out = fn(*inputs)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    # batch-major layouts are kept, others copied to contiguous
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    grad = randn(out.shape, dtype, layout)
    got = torch.autograd.grad(out, inputs, grad)
    expected = [textbook_grads(formula, inputs, grad)]
    if genfast.get_backend() != "reference":
        with genfast.use_backend("reference"):
            out_ref = fn(*inputs)
            expected.append((out_ref.detach(), torch.autograd.grad(out_ref, inputs, grad)))
    for want_out, want in expected:
        assert_close(out, want_out, dtype)
        for g, w in zip(got, want):
            assert_grads_close(g, w, dtype)


class TinyEpsModel(nn.Module):
    """ε̂ = tanh(x_t·w + e_t), w per feature and e_t a per-timestep embedding; the output is contiguous whatever
    x_t's layout. Remembers the (x_t, t) it was called with."""

    def __init__(self, shape, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape[1:]).to(dtype))
        self.emb = nn.Parameter(torch.randn(T).to(dtype))
        self.seen = None

    def forward(self, x_t, t):
        self.seen = (x_t.detach(), t)
        return torch.tanh(x_t * self.w + col(self.emb[t], x_t)).contiguous()


def textbook_target(x0, t, noise, prediction_type):
    """The training target in float64: ε, v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022) or x₀."""
    if prediction_type == "epsilon":
        return noise.double()
    if prediction_type == "sample":
        return x0.double()
    ac = col(closed_form(SCHEDULE)[2][t], x0)
    return ac.sqrt() * noise.double() - (1 - ac).sqrt() * x0.double()


def unfused_loss(model, x0, t, noise, prediction_type="epsilon"):
    """The textbook loss mean((model(x_t, t) − target)²) with explicit noise, x_t rounded to x0's dtype."""
    x_t = textbook_q_sample(x0, t, noise).to(x0.dtype)
    return (model(x_t, t).double() - textbook_target(x0, t, noise, prediction_type)).square().mean()


def tables(*names):
    return [getattr(SCHEDULE, name) for name in names]


Q_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
STEP_TABLES = ("alphas_cumprod",) + Q_TABLES


@pytest.fixture
def compile_setup(backend):
    """The ``backend`` matrix; Dynamo traces torch.autograd.grad only with trace_autograd_ops (else a graph break);
    fallback_random makes compiled torch.randint draw what eager does (the seeds)."""
    import torch._dynamo.config
    import torch._inductor.config

    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True):
        yield backend


def compare_compiled(fn, *args, values=1):
    """fn(*args) compiled with fullgraph=True on the backend in use against fn eager on the reference, from the same
    torch seed: its first ``values`` results elementwise, the others (gradients) also by relative norm. Seeded
    noise of a kernel backend and the reference differs by NOISE_ATOL at most (its factors here are ≤ 1; 2 in a
    gradient)."""
    torch.manual_seed(1)
    compiled = torch.compile(fn, fullgraph=True)(*args)
    torch.manual_seed(1)
    with genfast.use_backend("reference"):
        eager = fn(*args)
    assert len(compiled) == len(eager)
    scale = 0.0 if genfast.get_backend() == "reference" else 1.0
    for got, want in zip(compiled[:values], eager[:values]):
        assert_close(got, want, noise_scale=scale)
    for got, want in zip(compiled[values:], eager[values:]):
        assert_grads_close(got, want, noise_scale=2 * scale)


# ---- the ops called directly (the kernels against the reference) ----------------------------------------------
# D = C·H·W not a multiple of 4 or 8; batch 1 with 1×1 spatial; D > the kernels' blocks of 1024 / 2048
OP_SHAPES = ((2, 3, 5, 7), (1, 3, 1, 1), (3, 5, 23, 29))
OP_LAYOUTS = ("contiguous", "channels_last", "non_contiguous")
# high bits set in both words of key and offset, and a negative int64
SEED = torch.tensor([0x7EDC_BA98_7654_3210, -0x1234_5678_9ABC_DEF1], dtype=torch.int64)


def op_shapes(kernel_backend):
    """OP_SHAPES, less the one past the C++ block of 2048 in the Triton interpreter (slow; Triton's blocks of 1024
    are crossed by CASES' (2, 3, 20, 20))."""
    return OP_SHAPES[:2] if kernel_backend == "triton" and triton_interpret() else OP_SHAPES


def op_sample(shape, dtype, layout):
    """Random values of ``shape`` in ``layout`` (non_contiguous: every other column of a wider tensor)."""
    if layout == "non_contiguous":
        return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2].to(dtype)
    x = torch.randn(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def skip_unless_op_layout(kernel_backend, layout):
    """The C++ ops read any strides; the Triton kernels are given batch-major tensors only (the public functions
    copy others), so a non-contiguous input is the C++ ops' case."""
    if layout == "non_contiguous" and kernel_backend != "cpp":
        pytest.skip("the Triton kernels are given batch-major tensors only (the public functions copy others)")
