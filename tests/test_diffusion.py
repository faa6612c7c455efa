"""Diffusion: NoiseSchedule tables vs closed forms, q_sample / ddpm_step / ddim_step (kernels and reference vs the
textbook formulas, forward and backward, and vs diffusers' schedulers), the fused ε-prediction loss vs the unfused
formula, the shared Philox stream, opcheck, gradcheck, torch.compile and argument validation."""
import math

import pytest
import torch
from torch import nn

import genfast
from genfast._rng import draw_seed
from genfast._validation import batch_major
from genfast.kernels import diffusion as kernels
from genfast.kernels import per_sample
from genfast.reference.random import noise_like
from genfast.schedule import TABLES
from tolerances import NOISE_ATOL, TOLERANCES, assert_close

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
mse_op = torch.ops.genfast.noise_mse.default
mse_backward_op = torch.ops.genfast.noise_mse_backward.default


def _randn(shape, dtype=torch.float32, layout="contiguous"):
    x = torch.randn(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], 2 * shape[1], *shape[2:])[:, ::2]
    return x.to(dtype)


def _timesteps(batch, low=0, high=T):
    return torch.randint(low, high, (batch,))


def _col(v, like):
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _closed_form(schedule):
    """(β, α, ᾱ, ᾱ_{t−1}) in float64 from the betas alone."""
    betas = schedule.betas
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    return betas, alphas, ac, torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])


def _textbook_q_sample(x0, t, noise):
    ac = _closed_form(SCHEDULE)[2][t]
    return _col(ac.sqrt(), x0) * x0.double() + _col((1 - ac).sqrt(), x0) * noise.double()


def _textbook_ddpm(eps_hat, t, x, z):
    """Ho et al. Algorithm 2: x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t + σ_t·z, σ_t² = β_t(1−ᾱ_{t−1})/(1−ᾱ_t)."""
    betas, alphas, ac, ac_prev = (_col(v[t], x) for v in _closed_form(SCHEDULE))
    sigma = (betas * (1 - ac_prev) / (1 - ac)).sqrt()
    return (x - betas / (1 - ac).sqrt() * eps_hat) / alphas.sqrt() + sigma * z


def _textbook_ddim(eps_hat, t, t_prev, x, z, eta):
    """Song et al. eq. 12 with σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p), ᾱ_p = 1 for t_prev < 0."""
    ac_all = _closed_form(SCHEDULE)[2]
    ac = _col(ac_all[t], x)
    ac_prev = _col(torch.where(t_prev >= 0, ac_all[t_prev.clamp(min=0)], 1.0), x)
    sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).clamp(min=0).sqrt()
    x0_hat = (x - (1 - ac).sqrt() * eps_hat) / ac.sqrt()
    return ac_prev.sqrt() * x0_hat + (1 - ac_prev - sigma**2).sqrt() * eps_hat + sigma * z


def _textbook_grads(formula, inputs, grad):
    """(output, input gradients) of ``formula`` in float64 by autograd."""
    inputs64 = [v.detach().double().requires_grad_() for v in inputs]
    out = formula(*inputs64)
    return out.detach(), torch.autograd.grad(out, inputs64, grad.double())


def _check_forward_backward(fn, formula, inputs, dtype, layout):
    """fn(*inputs) and its input gradients against the float64 textbook formula, at the tolerance of dtype."""
    inputs = [v.detach().requires_grad_() for v in inputs]
    out = fn(*inputs)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    # batch-major layouts are kept, others copied to contiguous
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    grad = _randn(out.shape, dtype, layout)
    got = torch.autograd.grad(out, inputs, grad)
    want_out, want = _textbook_grads(formula, inputs, grad)
    assert_close(out, want_out, dtype)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)


# ---- NoiseSchedule ---------------------------------------------------------------------------------------------

def test_linear_schedule_closed_form():
    s = genfast.NoiseSchedule.linear(num_steps=1000, beta_start=1e-4, beta_end=0.02)
    assert s.num_steps == 1000 and isinstance(s, nn.Module)
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == 0.02
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    for name in TABLES:
        buf = getattr(s, name)
        assert buf.dtype == torch.float64 and buf.shape == (1000,) and name in dict(s.named_buffers())
    betas, alphas, ac, ac_prev = _closed_form(s)
    for t in (0, 1, 500, 999):
        assert math.isclose(s.alphas_cumprod[t].item(), math.prod(1 - b for b in betas[: t + 1].tolist()),
                            rel_tol=1e-12)
        one_minus = 1 - ac[t].item()
        assert math.isclose(s.posterior_variance[t].item(), betas[t].item() * (1 - ac_prev[t].item()) / one_minus,
                            rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(s.posterior_mean_coef1[t].item(), betas[t].item() * ac_prev[t].item() ** 0.5 / one_minus,
                            rel_tol=1e-12)
        assert math.isclose(s.posterior_mean_coef2[t].item(),
                            alphas[t].item() ** 0.5 * (1 - ac_prev[t].item()) / one_minus, rel_tol=1e-12)
    assert s.alphas_cumprod_prev[0].item() == 1.0 and s.posterior_variance[0].item() == 0.0
    assert torch.equal(s.sqrt_alphas_cumprod, s.alphas_cumprod.sqrt())
    assert torch.equal(s.sqrt_one_minus_alphas_cumprod, (1 - s.alphas_cumprod).sqrt())
    one = genfast.NoiseSchedule.linear(num_steps=1, beta_start=0.3, beta_end=0.3)
    assert one.betas.tolist() == [0.3] and one.num_steps == 1


def test_cosine_schedule_closed_form():
    T_, s_ = 1000, 0.008
    s = genfast.NoiseSchedule.cosine(num_steps=T_, s=s_)

    def alpha_bar(t):
        return math.cos((t / T_ + s_) / (1 + s_) * math.pi / 2) ** 2 / math.cos(s_ / (1 + s_) * math.pi / 2) ** 2

    want_betas = [min(1 - alpha_bar(t + 1) / alpha_bar(t), 0.999) for t in range(T_)]
    torch.testing.assert_close(s.betas, torch.tensor(want_betas, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # ᾱ_t = f(t+1)/f(0) while no β is clipped; the last step's β = 1 − 0/ᾱ is clipped at 0.999
    clipped = s.betas == 0.999
    assert clipped[-1] and clipped.sum() < 5 and s.betas.max().item() == 0.999
    first_clipped = int(clipped.nonzero()[0])
    torch.testing.assert_close(s.alphas_cumprod[:first_clipped],
                               torch.tensor([alpha_bar(t + 1) for t in range(first_clipped)], dtype=torch.float64),
                               rtol=1e-10, atol=0)
    # diffusers' squaredcos_cap_v2 is the same schedule, rounded to float32
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(num_train_timesteps=T_, beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(s.betas.float(), theirs, **TOLERANCES[torch.float32])


def test_schedule_to_keeps_float64_and_moves_buffers():
    s = genfast.NoiseSchedule.cosine(num_steps=20)
    values = {name: buf.clone() for name, buf in s.named_buffers()}
    for convert in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float(),
                    lambda m: m.to("cpu", torch.bfloat16)):
        assert convert(s) is s
        for name, buf in s.named_buffers():
            assert buf.dtype == torch.float64 and torch.equal(buf, values[name])
    moved = s.to("meta")
    assert all(buf.device.type == "meta" and buf.dtype == torch.float64 for buf in moved.buffers())
    assert moved.num_steps == 20 and len(list(moved.buffers())) == len(TABLES)


def test_schedule_state_dict_round_trip():
    source = genfast.NoiseSchedule.cosine(num_steps=30)
    state = source.state_dict()
    assert set(state) == set(TABLES) and all(v.dtype == torch.float64 for v in state.values())
    target = genfast.NoiseSchedule.linear(num_steps=30)
    target.load_state_dict(state)
    for name in TABLES:
        assert torch.equal(getattr(target, name), getattr(source, name))
    # a schedule built from the same betas has the same tables
    rebuilt = genfast.NoiseSchedule(betas=source.betas.float())
    torch.testing.assert_close(rebuilt.alphas_cumprod, source.alphas_cumprod, **TOLERANCES[torch.float32])


def test_schedule_factories_take_positional_arguments():
    for got, want in [(genfast.NoiseSchedule.linear(500, 1e-4, 0.02),
                       genfast.NoiseSchedule.linear(num_steps=500, beta_start=1e-4, beta_end=0.02)),
                      (genfast.NoiseSchedule.cosine(500, 0.008), genfast.NoiseSchedule.cosine(num_steps=500, s=0.008))]:
        assert torch.equal(got.alphas_cumprod, want.alphas_cumprod)


@pytest.mark.parametrize("build, error, match", [
    (lambda: genfast.NoiseSchedule.linear(num_steps=0), ValueError, "num_steps"),
    (lambda: genfast.NoiseSchedule.linear(num_steps=10.0), TypeError, "num_steps"),
    (lambda: genfast.NoiseSchedule.linear(beta_start=0.0), ValueError, "beta_start"),
    (lambda: genfast.NoiseSchedule.linear(beta_start=0.03, beta_end=0.02), ValueError, "beta_start"),
    (lambda: genfast.NoiseSchedule.linear(beta_end=1.0), ValueError, "beta_end"),
    (lambda: genfast.NoiseSchedule.linear(beta_end=float("nan")), TypeError, "beta_end"),
    (lambda: genfast.NoiseSchedule.cosine(num_steps=-1), ValueError, "num_steps"),
    (lambda: genfast.NoiseSchedule.cosine(s=-0.1), ValueError, "s must"),
    (lambda: genfast.NoiseSchedule(betas=torch.tensor([0.1, 1.0])), ValueError, "betas"),
    (lambda: genfast.NoiseSchedule(betas=torch.ones(2, 2) * 0.1), ValueError, "betas"),
    (lambda: genfast.NoiseSchedule(betas=torch.tensor([1, 2])), TypeError, "betas"),
])
def test_schedule_validation(build, error, match):
    with pytest.raises(error, match=match):
        build()


# ---- q_sample ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_q_sample_matches_formula(backend, shape, layout, dtype):
    x0, noise = _randn(shape, dtype, layout), _randn(shape, dtype)
    t = _timesteps(shape[0])
    _check_forward_backward(lambda x: genfast.q_sample(x, t, SCHEDULE, noise),
                            lambda x: _textbook_q_sample(x, t, noise), [x0], dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_q_sample_seeded_noise_is_one_stream(layout):
    """noise=None: both backends draw the seed from the generator and produce the Philox noise of
    genfast.reference.random.noise_like(x0, seed), indexed by memory position."""
    x0, t = _randn((3, 2, 5, 7), layout=layout), _timesteps(3)
    out = {}
    for name in ("reference", "triton"):
        with genfast.use_backend(name):
            out[name] = genfast.q_sample(x0, t, SCHEDULE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out["triton"], out["reference"], atol=NOISE_ATOL, rtol=0)
    seed = draw_seed(x0.device, torch.Generator().manual_seed(7))
    assert_close(out["reference"], _textbook_q_sample(x0, t, noise_like(x0, seed)))
    # the default generator when none is given: torch.manual_seed reproduces the draw
    torch.manual_seed(3)
    first = genfast.q_sample(x0, t, SCHEDULE)
    torch.manual_seed(3)
    assert torch.equal(genfast.q_sample(x0, t, SCHEDULE), first)
    assert not torch.equal(genfast.q_sample(x0, t, SCHEDULE), first)


def test_q_sample_int_t_and_int32_t(backend):
    x0, noise = _randn((3, 4)), _randn((3, 4))
    want = genfast.q_sample(x0, torch.full((3,), 17), SCHEDULE, noise)
    assert torch.equal(genfast.q_sample(x0, 17, SCHEDULE, noise), want)
    assert torch.equal(genfast.q_sample(x0, torch.full((3,), 17, dtype=torch.int32), SCHEDULE, noise), want)


def test_large_batch_launches_in_slices(monkeypatch):
    """Batches beyond CUDA's grid limit on axis 1 launch in slices: the sample index (and so the noise stream)
    continues across slices. Shrink the limit to 2 samples to exercise it on 5."""
    x0, t = _randn((5, 3, 4)), _timesteps(5)
    mo, noise = _randn((5, 3, 4)), _randn((5, 3, 4))
    seed = torch.tensor([123, 456])

    def run():
        return (kernels.q_sample(x0, t, None, seed, SCHEDULE.sqrt_alphas_cumprod,
                                 SCHEDULE.sqrt_one_minus_alphas_cumprod),
                kernels.ddpm_step(mo, t, x0, noise, None, SCHEDULE.sqrt_alphas_cumprod,
                                  SCHEDULE.sqrt_one_minus_alphas_cumprod, SCHEDULE.posterior_mean_coef1,
                                  SCHEDULE.posterior_mean_coef2, SCHEDULE.posterior_variance),
                kernels.noise_mse(mo, seed))

    whole = run()
    monkeypatch.setattr(per_sample, "MAX_GRID_SAMPLES", 2)
    for got, want in zip(run(), whole):
        assert torch.equal(got, want)


# ---- ddpm_step --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_ddpm_step_matches_formula(backend, shape, layout, dtype):
    eps_hat, x, z = _randn(shape, dtype, layout), _randn(shape, dtype, layout), _randn(shape, dtype)
    t = _timesteps(shape[0])
    t[0] = 0  # no noise at t = 0
    _check_forward_backward(lambda x, e: genfast.ddpm_step(e, t, x, SCHEDULE, z),
                            lambda x, e: _textbook_ddpm(e, t, x, z.double()), [x, eps_hat], dtype, layout)


def _diffusers_with_float64_tables(scheduler, schedule):
    """``scheduler`` computing its coefficients from our float64 ᾱ (its elementwise math stays in fp32)."""
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    return scheduler


@pytest.mark.parametrize("float64_tables", [False, True])
def test_ddpm_step_matches_diffusers(backend, float64_tables):
    from diffusers import DDPMScheduler

    schedule = genfast.NoiseSchedule.linear(num_steps=1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                           clip_sample=False)
    if float64_tables:
        theirs = _diffusers_with_float64_tables(theirs, schedule)
        tol = TOLERANCES[torch.float32]
    else:
        # diffusers derives β_t = 1 − ᾱ_t/ᾱ_{t−1} and 1 − ᾱ from float32 ᾱ: a relative error of about
        # 2⁻²⁴/β_t ≈ 6e-4 at β ≈ 1e-4, which reaches x_{t−1} (|x| ≲ 4) as up to ~3e-4 (measured 2.1e-4 at t = 1)
        tol = dict(atol=1e-3, rtol=1e-3)
    x, eps_hat = _randn((2, 3, 4, 4)), _randn((2, 3, 4, 4))
    for t in (0, 1, 10, 500, 998, 999):
        want = theirs.step(eps_hat, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        # the same variance noise: diffusers draws torch.randn(shape) from the generator
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(genfast.ddpm_step(eps_hat, t, x, schedule, z), want, **tol)
        # a (B,) tensor of timesteps: each sample as its own diffusers step
        per_sample = genfast.ddpm_step(eps_hat, torch.tensor([t, 999 - t]), x, schedule, z)
        torch.testing.assert_close(per_sample[0], want[0], **tol)


def test_ddpm_step_no_noise_at_t0(backend):
    x, eps_hat = _randn((3, 2, 3)), _randn((3, 2, 3))
    mean = genfast.ddpm_step(eps_hat, 0, x, SCHEDULE, torch.zeros_like(x))
    assert torch.equal(genfast.ddpm_step(eps_hat, 0, x, SCHEDULE), mean)
    assert torch.equal(genfast.ddpm_step(eps_hat, 0, x, SCHEDULE, _randn((3, 2, 3))), mean)
    # as a tensor: samples at t = 0 get no noise, the others do
    t = torch.tensor([0, 5, 0])
    out = genfast.ddpm_step(eps_hat, t, x, SCHEDULE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[[0, 2]], mean[[0, 2]])
    assert not torch.allclose(out[1], genfast.ddpm_step(eps_hat, 5, x, SCHEDULE, torch.zeros_like(x))[1])


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_sampler_seeded_noise_is_one_stream(step):
    """noise=None: the Philox noise of both backends is noise_like(x_t, seed) for the generator's seed."""
    x, eps_hat, t = _randn((2, 3, 4, 5), layout="channels_last"), _randn((2, 3, 4, 5)), torch.tensor([30, 7])

    def run(noise=None, generator=None):
        if step == "ddpm":
            return genfast.ddpm_step(eps_hat, t, x, SCHEDULE, noise, generator=generator)
        return genfast.ddim_step(eps_hat, t, t - 5, x, SCHEDULE, eta=0.7, noise=noise, generator=generator)

    out = {}
    for name in ("reference", "triton"):
        with genfast.use_backend(name):
            out[name] = run(generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out["triton"], out["reference"], atol=NOISE_ATOL, rtol=0)
    seed = draw_seed(x.device, torch.Generator().manual_seed(9))
    assert_close(out["reference"], run(noise=noise_like(x, seed)))


# ---- ddim_step --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_ddim_step_matches_formula(backend, shape, layout, dtype, eta):
    eps_hat, x, z = _randn(shape, dtype, layout), _randn(shape, dtype, layout), _randn(shape, dtype)
    t = _timesteps(shape[0], low=10)
    t_prev = t - 7
    t_prev[0] = -1  # the last step: ᾱ_prev = 1
    _check_forward_backward(lambda x, e: genfast.ddim_step(e, t, t_prev, x, SCHEDULE, eta, z),
                            lambda x, e: _textbook_ddim(e, t, t_prev, x, z.double(), eta), [x, eps_hat], dtype,
                            layout)


@pytest.mark.parametrize("float64_tables", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(backend, eta, float64_tables):
    from diffusers import DDIMScheduler

    schedule = genfast.NoiseSchedule.linear(num_steps=1000)
    theirs = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                           set_alpha_to_one=True)
    theirs.set_timesteps(50)
    if float64_tables:
        theirs = _diffusers_with_float64_tables(theirs, schedule)
    # float32 tables: ᾱ_t rounded to float32 (cumprod error ≤ 4e-7 relative) scales x_t by √ᾱ_p/√ᾱ_t
    tol = TOLERANCES[torch.float32] if float64_tables else dict(atol=1e-4, rtol=1e-4)
    x, eps_hat = _randn((2, 3, 4, 4)), _randn((2, 3, 4, 4))
    for t in (980, 500, 20, 0):  # t_prev = t − 20; −20 at the last step
        z = _randn(x.shape)
        want = theirs.step(eps_hat, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(genfast.ddim_step(eps_hat, t, t - 20, x, schedule, eta, z), want, **tol)


# the interpreter evaluates σ's square root of the negative (1 − ᾱ_t/ᾱ_p) of an inversion step before η = 0 discards it
@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
def test_ddim_eta0_ignores_noise_and_allows_inversion(backend):
    x, eps_hat = _randn((3, 2, 5)), _randn((3, 2, 5))
    t, t_prev = torch.tensor([40, 3, 20]), torch.tensor([30, 9, -1])  # sample 1 steps up: DDIM inversion
    out = genfast.ddim_step(eps_hat, t, t_prev, x, SCHEDULE, 0.0, _randn((3, 2, 5)))
    assert torch.equal(out, genfast.ddim_step(eps_hat, t, t_prev, x, SCHEDULE))
    assert torch.isfinite(out).all()
    assert_close(out, _textbook_ddim(eps_hat.double(), t, t_prev, x.double(), 0.0, 0.0))


# ---- diffusion_loss ---------------------------------------------------------------------------------------------

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
        return torch.tanh(x_t * self.w + _col(self.emb[t], x_t)).contiguous()


def _unfused_loss(model, x0, t, noise):
    """The textbook loss mean((model(x_t, t) − ε)²) with explicit noise, x_t rounded to x0's dtype."""
    x_t = _textbook_q_sample(x0, t, noise).to(x0.dtype)
    return (model(x_t, t).double() - noise.double()).square().mean()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [((2, 3, 5, 7), "contiguous"), ((2, 3, 5, 7), "channels_last"),
                                           ((2, 3, 20, 20), "strided"), ((1, 1, 1, 1), "contiguous"),
                                           ((3, 37), "contiguous")])
def test_diffusion_loss_matches_unfused(backend, shape, layout, dtype):
    model = TinyEpsModel(shape, dtype)
    x0 = _randn(shape, dtype, layout).requires_grad_()
    t = _timesteps(shape[0])
    tensors = [x0, model.w, model.emb]
    loss = genfast.diffusion_loss(model, x0, SCHEDULE, t=t, generator=torch.Generator().manual_seed(4))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    got = _grads(loss, tensors)
    # the noise the fused loss used: the generator's seed, the stream in (batch-major) x0's layout
    seed = draw_seed(x0.device, torch.Generator().manual_seed(4))
    noise = noise_like(batch_major(x0.detach()), seed)
    want_loss = _unfused_loss(model, x0, t, noise)
    want = _grads(want_loss, tensors)
    assert_close(loss, want_loss.detach(), dtype)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    assert all(g.abs().sum() > 0 for g in got)


def test_diffusion_loss_draws_t_then_seed(backend):
    shape = (4, 2, 3, 3)
    model = TinyEpsModel(shape, torch.float32)
    x0 = _randn(shape)
    loss = genfast.diffusion_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(8))
    replay = torch.Generator().manual_seed(8)
    t = torch.randint(0, T, (4,), generator=replay)
    seed = draw_seed(x0.device, replay)
    assert torch.equal(model.seen[1], t) and model.seen[1].dtype == torch.int64
    assert_close(model.seen[0], _textbook_q_sample(x0, t, noise_like(x0, seed)))
    assert_close(loss, _unfused_loss(model, x0, t, noise_like(x0, seed)).detach())


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_mse_op_matches_reference(dtype):
    """The loss op alone, a sample of two blocks: fp32 partial sums in a fixed order vs the reference's sum."""
    eps_hat, seed = _randn((3, 1100), dtype), torch.tensor([5, 6])
    loss = {b: mse_op(eps_hat, seed, b) for b in ("reference", "triton")}
    grad = {b: mse_backward_op(torch.tensor(1.5), eps_hat, seed, b) for b in ("reference", "triton")}
    assert loss["triton"].dtype == torch.float32
    assert_close(loss["triton"], loss["reference"], torch.float32)
    assert_close(grad["triton"], grad["reference"], dtype)
    noise = noise_like(eps_hat, seed).double()
    assert_close(loss["reference"], (eps_hat.double() - noise).square().mean(), torch.float32)
    assert_close(grad["reference"], 1.5 * 2 * (eps_hat.double() - noise) / eps_hat.numel(), dtype)


# ---- empty batches ----------------------------------------------------------------------------------------------

def test_empty_batch(backend):
    x, eps_hat = torch.randn(0, 3, 4, 4, requires_grad=True), torch.randn(0, 3, 4, 4, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64)
    outs = [genfast.q_sample(x, t, SCHEDULE), genfast.ddpm_step(eps_hat, t, x, SCHEDULE),
            genfast.ddim_step(eps_hat, t, t - 1, x, SCHEDULE, eta=1.0)]
    for out in outs:
        assert out.shape == (0, 3, 4, 4)
    grads = torch.autograd.grad(sum(out.sum() for out in outs), (x, eps_hat))
    assert all(g.shape == (0, 3, 4, 4) for g in grads)
    model = TinyEpsModel((0, 3, 4, 4), torch.float32)
    loss = genfast.diffusion_loss(model, x, SCHEDULE)
    assert torch.isnan(loss)  # the mean of no elements, as torch.mean and F.mse_loss
    assert all(g.shape == v.shape for g, v in zip(_grads(loss, (x, model.w)), (x, model.w)))


# ---- opcheck and gradcheck --------------------------------------------------------------------------------------

def _tables(*names):
    return [getattr(SCHEDULE, name) for name in names]


Q_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
DDPM_TABLES = Q_TABLES + ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance")
DDIM_TABLES = ("alphas_cumprod",) + Q_TABLES


@pytest.mark.parametrize("noise_kind", ["loaded", "philox", "none"])
def test_opcheck(backend, noise_kind):
    x, eps_hat, grad = (_randn((2, 3, 5)).requires_grad_() for _ in range(3))
    t, t_prev = torch.tensor([4, 30]), torch.tensor([-1, 20])
    noise = _randn((2, 3, 5)) if noise_kind == "loaded" else None
    seed = torch.tensor([11, 12]) if noise_kind == "philox" else None
    if noise_kind != "none":
        torch.library.opcheck(q_sample_op, (x, t, noise, seed, *_tables(*Q_TABLES), backend))
    torch.library.opcheck(ddpm_op, (eps_hat, t, x, noise, seed, *_tables(*DDPM_TABLES), backend))
    torch.library.opcheck(ddim_op, (eps_hat, t, t_prev, x, noise, seed, 0.5, *_tables(*DDIM_TABLES), backend))
    if noise_kind == "philox":
        torch.library.opcheck(mse_op, (eps_hat, seed, backend))
        torch.library.opcheck(mse_backward_op, (torch.tensor(2.0), eps_hat.detach(), seed, backend))
    else:
        grad = grad.detach()
        torch.library.opcheck(q_sample_backward_op, (grad, t, *_tables(*Q_TABLES), backend))
        torch.library.opcheck(ddpm_backward_op, (grad, t, *_tables(*DDPM_TABLES), backend))
        torch.library.opcheck(ddim_backward_op, (grad, t, t_prev, 0.5, *_tables(*DDIM_TABLES), backend))


def test_gradcheck_float64():
    x, eps_hat = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([3, 40])
    with genfast.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x: genfast.q_sample(x, t, SCHEDULE, noise), (x,))
        assert torch.autograd.gradcheck(lambda e, x: genfast.ddpm_step(e, t, x, SCHEDULE, noise), (eps_hat, x))
        assert torch.autograd.gradcheck(lambda e, x: genfast.ddim_step(e, t, t - 30, x, SCHEDULE, 0.6, noise),
                                        (eps_hat, x))

        def loss(x, w):
            return genfast.diffusion_loss(lambda x_t, _: torch.tanh(x_t * w), x, SCHEDULE, t=t,
                                          generator=torch.Generator().manual_seed(2))

        w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(loss, (x, w))


# ---- torch.compile ----------------------------------------------------------------------------------------------

@pytest.fixture
def compile_setup():
    """Reference backend; Dynamo traces torch.autograd.grad only with trace_autograd_ops (else a graph break);
    fallback_random makes compiled torch.randint draw what eager does (the seeds)."""
    import torch._dynamo.config
    import torch._inductor.config

    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True), \
            genfast.use_backend("reference"):
        yield


def _compare_compiled(fn, *args):
    torch.manual_seed(1)
    eager = fn(*args)
    torch.manual_seed(1)
    compiled = torch.compile(fn, fullgraph=True)(*args)
    for got, want in zip(compiled, eager):
        assert_close(got, want)


def test_compile_q_sample(compile_setup):
    x0, t, noise = _randn((2, 3, 4)).requires_grad_(), torch.tensor([2, 40]), _randn((2, 3, 4))

    def fn(x0):
        x_t = genfast.q_sample(x0, t, SCHEDULE, noise)
        x_t_seeded = genfast.q_sample(x0, t, SCHEDULE)
        return x_t.detach(), x_t_seeded.detach(), *torch.autograd.grad((x_t * x_t).sum(), x0)

    _compare_compiled(fn, x0)


def test_compile_diffusion_loss(compile_setup):
    shape = (2, 3, 4)
    model = TinyEpsModel(shape, torch.float32)
    x0 = _randn(shape).requires_grad_()

    def fn(x0):
        loss = genfast.diffusion_loss(model, x0, SCHEDULE)
        return loss.detach(), *torch.autograd.grad(loss, (x0, model.w, model.emb))

    _compare_compiled(fn, x0)


def test_compile_ddpm_step(compile_setup):
    x, eps_hat, noise = (_randn((2, 3, 4)).requires_grad_() for _ in range(3))

    def fn(eps_hat, x):
        out = genfast.ddpm_step(eps_hat, torch.tensor([0, 9]), x, SCHEDULE, noise.detach())
        seeded = genfast.ddpm_step(eps_hat, 12, x, SCHEDULE)
        return out.detach(), seeded.detach(), *torch.autograd.grad((out * seeded).sum(), (eps_hat, x))

    _compare_compiled(fn, eps_hat, x)


def test_compile_ddim_step(compile_setup):
    x, eps_hat = (_randn((2, 3, 4)).requires_grad_() for _ in range(2))

    def fn(eps_hat, x):
        out = genfast.ddim_step(eps_hat, torch.tensor([20, 9]), torch.tensor([10, -1]), x, SCHEDULE, eta=0.5)
        return out.detach(), *torch.autograd.grad((out * out).sum(), (eps_hat, x))

    _compare_compiled(fn, eps_hat, x)


# ---- validation -------------------------------------------------------------------------------------------------

X = torch.randn(2, 3, 4)
T2 = torch.tensor([1, 2])


@pytest.mark.parametrize("call, error, match", [
    (lambda: genfast.q_sample(X.long(), T2, SCHEDULE), TypeError, "x0"),
    (lambda: genfast.q_sample(torch.tensor(1.0), T2, SCHEDULE), ValueError, "x0"),
    (lambda: genfast.q_sample(X, T2.float(), SCHEDULE), TypeError, "t must have an integer dtype"),
    (lambda: genfast.q_sample(X, torch.tensor([True, False]), SCHEDULE), TypeError, "t must"),
    (lambda: genfast.q_sample(X, torch.tensor([1, 2, 3]), SCHEDULE), ValueError, r"t must have shape \(2,\)"),
    (lambda: genfast.q_sample(X, torch.tensor(1), SCHEDULE), ValueError, "t must have shape"),
    (lambda: genfast.q_sample(X, 1.5, SCHEDULE), TypeError, "t must be an int"),
    (lambda: genfast.q_sample(X, T, SCHEDULE), ValueError, r"t must be in \[0, 50\)"),
    (lambda: genfast.q_sample(X, -1, SCHEDULE), ValueError, "t must be"),
    (lambda: genfast.q_sample(X, torch.tensor([0, T]), SCHEDULE), ValueError, r"t must be in \[0, 50\)"),
    (lambda: genfast.q_sample(X, torch.tensor([-3, 1]), SCHEDULE), ValueError, "t must be in"),
    (lambda: genfast.q_sample(X, T2.to("meta"), SCHEDULE), ValueError, "t is on meta"),
    (lambda: genfast.q_sample(X, T2, SCHEDULE, torch.randn(2, 3)), ValueError, "noise"),
    (lambda: genfast.q_sample(X, T2, SCHEDULE, X.long()), TypeError, "noise"),
    (lambda: genfast.q_sample(X, T2, "linear"), TypeError, "schedule"),
    (lambda: genfast.q_sample(X, T2, genfast.NoiseSchedule.linear(num_steps=T).to("meta")), ValueError,
     r"schedule is on meta.*schedule\.to"),
    (lambda: genfast.q_sample(X, T2, SCHEDULE, generator=1), TypeError, "generator"),
    (lambda: genfast.ddpm_step(X[:1], T2, X, SCHEDULE), ValueError, "model_output"),
    (lambda: genfast.ddpm_step(X.half(), T2, X, SCHEDULE), TypeError, "model_output"),
    (lambda: genfast.ddpm_step(None, T2, X, SCHEDULE), TypeError, "model_output"),
    (lambda: genfast.ddpm_step(X, T2, X.int(), SCHEDULE), TypeError, "x_t"),
    (lambda: genfast.ddpm_step(X, torch.tensor([1, 99]), X, SCHEDULE), ValueError, "t must be in"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, X[:, :2]), ValueError, "noise"),
    (lambda: genfast.ddim_step(X, T2, T2.float(), X, SCHEDULE), TypeError, "t_prev"),
    (lambda: genfast.ddim_step(X, T2, T, X, SCHEDULE), ValueError, "t_prev must be < 50"),
    (lambda: genfast.ddim_step(X, T2, torch.tensor([0, T]), X, SCHEDULE), ValueError, "t_prev must be < 50"),
    (lambda: genfast.ddim_step(X, 60, 1, X, SCHEDULE), ValueError, "t must be"),
    (lambda: genfast.ddim_step(X, T2, 1, X, SCHEDULE, eta=-0.5), ValueError, "eta"),
    (lambda: genfast.ddim_step(X, T2, 1, X, SCHEDULE, eta="1"), TypeError, "eta"),
    (lambda: genfast.diffusion_loss(lambda x, t: x[:, :1], X, SCHEDULE), ValueError, r"model\(x_t, t\)"),
    (lambda: genfast.diffusion_loss(lambda x, t: x.long(), X, SCHEDULE), TypeError, r"model\(x_t, t\)"),
    (lambda: genfast.diffusion_loss(lambda x, t: x, X, SCHEDULE, t=torch.tensor([0, 50])), ValueError, "t must"),
    (lambda: genfast.diffusion_loss(lambda x, t: x, X.long(), SCHEDULE), TypeError, "x0"),
])
def test_validation(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_triton_backend_refuses_float64():
    with genfast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        genfast.q_sample(X.double(), T2, SCHEDULE)
