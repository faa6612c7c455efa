"""Diffusion, schedule and noising: NoiseSchedule tables vs closed forms, q_sample (every backend vs the textbook
formula in float64, the kernels vs the reference, forward and backward, every layout and odd size), the fused
loss of every prediction type (ε, v, x₀) vs the unfused formula, the target-MSE op, the shared Philox stream,
opcheck, gradcheck, torch.compile and argument validation. The DDPM / DDIM steps are in test_diffusion_steps.py."""
import math

import pytest
import torch
from torch import nn

import genfast
from backends import skip_unless_usable
from diffusion_cases import (CASES, DTYPES, OP_LAYOUTS, PREDICTION_TYPES, Q_TABLES, SCHEDULE, SEED, T,
                             TinyEpsModel, textbook_target,
                             check_forward_backward, closed_form, compare_compiled, compile_setup, mse_backward_op,
                             mse_op, op_sample, op_shapes, q_sample_backward_op, q_sample_op, randn,
                             skip_unless_op_layout, tables, textbook_q_sample, timesteps, unfused_loss)
from genfast._backend import implementation
from genfast._rng import draw_seed
from genfast._validation import batch_major
from genfast.kernels import diffusion as kernels
from genfast.kernels import per_sample
from genfast.ops.diffusion import OP
from genfast.reference import diffusion as ref
from genfast.reference.random import noise_like
from genfast.schedule import TABLES
from tolerances import NOISE_ATOL, TOLERANCES, assert_close, assert_grads_close

__all__ = ["compile_setup"]  # a fixture of the compile tests


# ---- NoiseSchedule ---------------------------------------------------------------------------------------------

def test_linear_schedule_closed_form():
    s = genfast.NoiseSchedule.linear(num_steps=1000, beta_start=1e-4, beta_end=0.02)
    assert s.num_steps == 1000 and isinstance(s, nn.Module)
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == 0.02
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    for name in TABLES:
        buf = getattr(s, name)
        assert buf.dtype == torch.float64 and buf.shape == (1000,) and name in dict(s.named_buffers())
    betas, alphas, ac, ac_prev = closed_form(s)
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


def test_cosine_schedule_is_diffusers_squaredcos_cap_v2():
    """diffusers' squaredcos_cap_v2 is the same schedule, rounded to float32."""
    theirs = pytest.importorskip("diffusers").DDPMScheduler(num_train_timesteps=1000,
                                                            beta_schedule="squaredcos_cap_v2").betas
    ours = genfast.NoiseSchedule.cosine(num_steps=1000, s=0.008).betas
    torch.testing.assert_close(ours.float(), theirs, **TOLERANCES[torch.float32])


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
    x0, noise = randn(shape, dtype, layout), randn(shape, dtype)
    t = timesteps(shape[0])
    check_forward_backward(lambda x: genfast.q_sample(x, t, SCHEDULE, noise),
                           lambda x: textbook_q_sample(x, t, noise), [x0], dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_q_sample_seeded_noise_is_one_stream(kernel_backend, layout):
    """noise=None: every backend draws the seed from the generator and produces the Philox noise of
    genfast.reference.random.noise_like(x0, seed), indexed by memory position."""
    x0, t = randn((3, 2, 5, 7), layout=layout), timesteps(3)
    out = {}
    for name in ("reference", kernel_backend):
        with genfast.use_backend(name):
            out[name] = genfast.q_sample(x0, t, SCHEDULE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out[kernel_backend], out["reference"], atol=NOISE_ATOL, rtol=0)
    seed = draw_seed(x0.device, torch.Generator().manual_seed(7))
    assert_close(out["reference"], textbook_q_sample(x0, t, noise_like(x0, seed)))
    # the default generator when none is given: torch.manual_seed reproduces the draw (on the kernel backend)
    torch.manual_seed(3)
    first = genfast.q_sample(x0, t, SCHEDULE)
    torch.manual_seed(3)
    assert torch.equal(genfast.q_sample(x0, t, SCHEDULE), first)
    assert not torch.equal(genfast.q_sample(x0, t, SCHEDULE), first)


@pytest.mark.parametrize("noise_mode", ["philox", "noise"])
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_op_matches_reference(kernel_backend, dtype, layout, noise_mode):
    """The kernels' q_sample and its backward called directly, odd sizes and every layout, against the reference
    on the dense copy (which defines the noise stream of a non-dense input)."""
    skip_unless_op_layout(kernel_backend, layout)
    ops = implementation(kernel_backend, OP)
    for shape in op_shapes(kernel_backend):
        x, grad = op_sample(shape, dtype, layout), op_sample(shape, dtype, layout)
        noise = op_sample(shape, dtype, layout) if noise_mode == "noise" else None
        seed = SEED if noise_mode == "philox" else None
        t = torch.randint(0, T, (shape[0],))
        out = ops.q_sample(x, t, noise, seed, *tables(*Q_TABLES))
        want = ref.q_sample(batch_major(x), t, None if noise is None else batch_major(noise), seed, *tables(*Q_TABLES))
        assert out.stride() == want.stride()
        assert_close(out, want, noise_scale=1.0)
        got = ops.q_sample_backward(grad, t, *tables(*Q_TABLES))
        assert got.dtype == dtype
        assert_grads_close(got, ref.q_sample_backward(batch_major(grad), t, *tables(*Q_TABLES)))


def test_cpp_internal_op_checks_its_arguments():
    skip_unless_usable("cpp", op=OP)
    with pytest.raises(RuntimeError, match=f"timestep {T} is outside"):
        implementation("cpp", OP).q_sample(torch.randn(2, 3), torch.tensor([0, T]), None, SEED, *tables(*Q_TABLES))


def test_q_sample_int_t_and_int32_t(backend):
    x0, noise = randn((3, 4)), randn((3, 4))
    want = genfast.q_sample(x0, torch.full((3,), 17), SCHEDULE, noise)
    assert torch.equal(genfast.q_sample(x0, 17, SCHEDULE, noise), want)
    assert torch.equal(genfast.q_sample(x0, torch.full((3,), 17, dtype=torch.int32), SCHEDULE, noise), want)


def test_large_batch_launches_in_slices(monkeypatch):
    """Batches beyond CUDA's grid limit on axis 1 launch in slices: the sample index (and so the noise stream)
    continues across slices. Shrink the limit to 2 samples to exercise it on 5."""
    x0, t = randn((5, 3, 4)), timesteps(5)
    mo, noise = randn((5, 3, 4)), randn((5, 3, 4))
    seed = torch.tensor([123, 456])

    def run():
        return (kernels.q_sample(x0, t, None, seed, SCHEDULE.sqrt_alphas_cumprod,
                                 SCHEDULE.sqrt_one_minus_alphas_cumprod),
                kernels.ddpm_step(mo, t, None, x0, noise, None, None, SCHEDULE.alphas_cumprod,
                                  SCHEDULE.sqrt_alphas_cumprod, SCHEDULE.sqrt_one_minus_alphas_cumprod, "epsilon",
                                  "fixed_small", 1.0),
                kernels.target_mse(mo, seed, x0, t, *tables(*Q_TABLES), "v_prediction"))

    whole = run()
    monkeypatch.setattr(per_sample, "MAX_GRID_SAMPLES", 2)
    for got, want in zip(run(), whole):
        assert torch.equal(got, want)




# ---- diffusion_loss ---------------------------------------------------------------------------------------------

def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [((2, 3, 5, 7), "contiguous"), ((2, 3, 5, 7), "channels_last"),
                                           ((2, 3, 20, 20), "strided"), ((1, 1, 1, 1), "contiguous"),
                                           ((3, 37), "contiguous")])
def test_diffusion_loss_matches_unfused(backend, shape, layout, dtype, prediction_type):
    model = TinyEpsModel(shape, dtype)
    x0 = randn(shape, dtype, layout).requires_grad_()
    t = timesteps(shape[0])
    tensors = [x0, model.w, model.emb]
    loss = genfast.diffusion_loss(model, x0, SCHEDULE, t=t, prediction_type=prediction_type,
                                  generator=torch.Generator().manual_seed(4))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    got = _grads(loss, tensors)
    # the noise the fused loss used: the generator's seed, the stream in (batch-major) x0's layout
    seed = draw_seed(x0.device, torch.Generator().manual_seed(4))
    noise = noise_like(batch_major(x0.detach()), seed)
    want_loss = unfused_loss(model, x0, t, noise, prediction_type)
    expected = [(want_loss.detach(), _grads(want_loss, tensors), 0.0)]
    if backend != "reference":  # the same seed: the same noise within NOISE_ATOL (x_t may differ by one ulp)
        with genfast.use_backend("reference"):
            loss_ref = genfast.diffusion_loss(model, x0, SCHEDULE, t=t, prediction_type=prediction_type,
                                              generator=torch.Generator().manual_seed(4))
        expected.append((loss_ref.detach(), _grads(loss_ref, tensors), 4.0))
    for want_loss, want, noise_scale in expected:
        assert_close(loss, want_loss, dtype, noise_scale=noise_scale)
        for g, w in zip(got, want):
            assert_grads_close(g, w, dtype, noise_scale=noise_scale)


def test_diffusion_loss_draws_t_then_seed(backend):
    shape = (4, 2, 3, 3)
    model = TinyEpsModel(shape, torch.float32)
    x0 = randn(shape)
    loss = genfast.diffusion_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(8))
    replay = torch.Generator().manual_seed(8)
    t = torch.randint(0, T, (4,), generator=replay)
    seed = draw_seed(x0.device, replay)
    assert torch.equal(model.seen[1], t) and model.seen[1].dtype == torch.int64
    assert_close(model.seen[0], textbook_q_sample(x0, t, noise_like(x0, seed)))
    assert_close(loss, unfused_loss(model, x0, t, noise_like(x0, seed)).detach())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_target_mse_op_matches_reference(kernel_backend, dtype, prediction_type):
    """The loss op alone, a sample of two blocks: fp32 partial sums in a fixed order vs the reference's sum, and
    the reference vs the float64 textbook target."""
    output, x0, seed = randn((3, 1100), dtype), randn((3, 1100), dtype), torch.tensor([5, 6])
    t = timesteps(3)
    backends = ("reference", kernel_backend)
    loss = {b: mse_op(output, seed, x0, t, *tables(*Q_TABLES), prediction_type, b) for b in backends}
    grad = {b: mse_backward_op(torch.tensor(1.5), output, seed, x0, t, *tables(*Q_TABLES), prediction_type, b)
            for b in backends}
    assert loss[kernel_backend].dtype == torch.float32
    assert_close(loss[kernel_backend], loss["reference"], torch.float32)
    assert_grads_close(grad[kernel_backend], grad["reference"], dtype)
    error = output.double() - textbook_target(x0, t, noise_like(output, seed), prediction_type)
    assert_close(loss["reference"], error.square().mean(), torch.float32)
    assert_grads_close(grad["reference"], 1.5 * 2 * error / output.numel(), dtype)


@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_target_mse_op_layouts(kernel_backend, dtype, layout):
    """The kernels' MSE called directly on every layout and odd size (the v target, which reads ε and x₀), against
    the reference on the dense copies (which define a non-dense input's noise stream)."""
    skip_unless_op_layout(kernel_backend, layout)
    ops = implementation(kernel_backend, OP)
    for shape in op_shapes(kernel_backend):
        output, x0 = op_sample(shape, dtype, layout), op_sample(shape, dtype, layout)
        t = timesteps(shape[0])
        dense = batch_major(output), batch_major(x0)
        loss = ops.target_mse(output, SEED, x0, t, *tables(*Q_TABLES), "v_prediction")
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss, ref.target_mse(*dense[:1], SEED, dense[1], t, *tables(*Q_TABLES),
                                                        "v_prediction"), atol=4 * NOISE_ATOL, rtol=2e-5)
        grad = ops.target_mse_backward(torch.tensor(1.7), output, SEED, x0, t, *tables(*Q_TABLES), "v_prediction")
        assert grad.stride() == dense[0].stride()
        assert_grads_close(grad, ref.target_mse_backward(torch.tensor(1.7), dense[0], SEED, dense[1], t,
                                                         *tables(*Q_TABLES), "v_prediction"),
                           noise_scale=2 * 1.7 / output.numel())


def test_target_mse_of_an_empty_tensor_is_nan(backend):
    """The mean of no elements is NaN, as torch.mean's; its gradient is empty."""
    output, t = torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
    assert mse_op(output, SEED, None, t, *tables(*Q_TABLES), "epsilon", backend).isnan()
    grad = mse_backward_op(torch.tensor(1.0), output, SEED, None, t, *tables(*Q_TABLES), "epsilon", backend)
    assert grad.shape == (0, 3)


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
    with pytest.raises(ValueError, match="^x0 must have at least one element"):  # a mean of nothing: refused
        genfast.diffusion_loss(model, x, SCHEDULE)


# ---- opcheck and gradcheck --------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_kind", ["loaded", "philox"])
def test_opcheck(backend, noise_kind):
    x, eps_hat = randn((2, 3, 5)).requires_grad_(), randn((2, 3, 5)).requires_grad_()
    t = torch.tensor([4, 30])
    noise = randn((2, 3, 5)) if noise_kind == "loaded" else None
    seed = torch.tensor([11, 12]) if noise_kind == "philox" else None
    torch.library.opcheck(q_sample_op, (x, t, noise, seed, *tables(*Q_TABLES), backend))
    if noise_kind == "philox":
        for prediction_type in PREDICTION_TYPES:
            target_x0 = None if prediction_type == "epsilon" else x.detach()
            torch.library.opcheck(mse_op, (eps_hat, seed, target_x0, t, *tables(*Q_TABLES), prediction_type,
                                           backend))
            torch.library.opcheck(mse_backward_op, (torch.tensor(2.0), eps_hat.detach(), seed, target_x0, t,
                                                    *tables(*Q_TABLES), prediction_type, backend))
    else:
        torch.library.opcheck(q_sample_backward_op, (randn((2, 3, 5)), t, *tables(*Q_TABLES), backend))


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([3, 40])
    with genfast.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x: genfast.q_sample(x, t, SCHEDULE, noise), (x,))

        def loss(x, w, prediction_type):
            return genfast.diffusion_loss(lambda x_t, _: torch.tanh(x_t * w), x, SCHEDULE, t=t,
                                          prediction_type=prediction_type, generator=torch.Generator().manual_seed(2))

        w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        for prediction_type in PREDICTION_TYPES:  # x enters v's and x₀'s target too
            assert torch.autograd.gradcheck(lambda x, w: loss(x, w, prediction_type), (x, w))


# ---- torch.compile ----------------------------------------------------------------------------------------------

def test_compile_q_sample(compile_setup):
    x0, t, noise = randn((2, 3, 4)).requires_grad_(), torch.tensor([2, 40]), randn((2, 3, 4))

    grad = randn((2, 3, 4))

    def fn(x0):
        x_t = genfast.q_sample(x0, t, SCHEDULE, noise)
        x_t_seeded = genfast.q_sample(x0, t, SCHEDULE)
        return x_t.detach(), x_t_seeded.detach(), *torch.autograd.grad(x_t * x_t_seeded, x0, grad)

    compare_compiled(fn, x0, values=2)


def test_compile_diffusion_loss(compile_setup):
    shape = (2, 3, 4)
    model = TinyEpsModel(shape, torch.float32)
    x0 = randn(shape).requires_grad_()

    def fn(x0):
        loss = genfast.diffusion_loss(model, x0, SCHEDULE)
        v_loss = genfast.diffusion_loss(model, x0, SCHEDULE, prediction_type="v_prediction")
        return loss.detach(), v_loss.detach(), *torch.autograd.grad(loss + v_loss, (x0, model.w, model.emb))

    compare_compiled(fn, x0, values=2)


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
    (lambda: genfast.diffusion_loss(lambda x, t: x[:, :1], X, SCHEDULE), ValueError, r"model\(x_t, t\)"),
    (lambda: genfast.diffusion_loss(lambda x, t: x.long(), X, SCHEDULE), TypeError, r"model\(x_t, t\)"),
    (lambda: genfast.diffusion_loss(lambda x, t: x, X, SCHEDULE, t=torch.tensor([0, 50])), ValueError, "t must"),
    (lambda: genfast.diffusion_loss(lambda x, t: x, X.long(), SCHEDULE), TypeError, "x0"),
    (lambda: genfast.diffusion_loss(lambda x, t: x, X, SCHEDULE, prediction_type="v"), ValueError,
     "prediction_type must be one of 'epsilon', 'v_prediction', 'sample'"),
])
def test_validation(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_kernel_backends_refuse_float64(kernel_backend):
    match = f"genfast backend '{kernel_backend}' cannot run diffusion on torch.float64 tensors on cpu"
    with pytest.raises(TypeError, match=match):
        genfast.q_sample(X.double(), T2, SCHEDULE)
    with pytest.raises(TypeError, match=match):
        genfast.ddpm_step(X.double(), T2, X.double(), SCHEDULE)
