"""Diffusion sampler steps: ddpm_step / ddim_step on every backend against the textbook formulas in float64 and
the kernels against the reference (forward and backward with random upstream gradients, every layout and odd
size, given, Philox and no noise), against diffusers' schedulers, the shared Philox stream, opcheck, gradcheck,
torch.compile and argument validation. Schedule, q_sample and the loss are in test_diffusion.py."""
import pytest
import torch

import genfast
from backends import skip_unless_usable
from diffusion_cases import (CASES, DDIM_TABLES, DDPM_TABLES, DTYPES, OP_LAYOUTS, SCHEDULE, SEED, T,
                             check_forward_backward, compare_compiled, compile_setup, ddim_backward_op, ddim_op,
                             ddpm_backward_op, ddpm_op, op_sample, op_shapes, randn, skip_unless_op_layout, tables,
                             textbook_ddim, textbook_ddpm, timesteps)
from genfast._backend import implementation
from genfast._rng import draw_seed
from genfast._validation import batch_major
from genfast.ops.diffusion import OP
from genfast.reference import diffusion as ref
from genfast.reference.random import noise_like
from tolerances import NOISE_ATOL, TOLERANCES, assert_close, assert_grads_close

__all__ = ["compile_setup"]  # a fixture of the compile tests


# ---- ddpm_step --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_ddpm_step_matches_formula(backend, shape, layout, dtype):
    eps_hat, x, z = randn(shape, dtype, layout), randn(shape, dtype, layout), randn(shape, dtype)
    t = timesteps(shape[0])
    t[0] = 0  # no noise at t = 0
    check_forward_backward(lambda x, e: genfast.ddpm_step(e, t, x, SCHEDULE, z),
                           lambda x, e: textbook_ddpm(e, t, x, z.double()), [x, eps_hat], dtype, layout)


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
    x, eps_hat = randn((2, 3, 4, 4)), randn((2, 3, 4, 4))
    for t in (0, 1, 10, 500, 998, 999):
        want = theirs.step(eps_hat, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        # the same variance noise: diffusers draws torch.randn(shape) from the generator
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(genfast.ddpm_step(eps_hat, t, x, schedule, z), want, **tol)
        # a (B,) tensor of timesteps: each sample as its own diffusers step
        per_sample = genfast.ddpm_step(eps_hat, torch.tensor([t, 999 - t]), x, schedule, z)
        torch.testing.assert_close(per_sample[0], want[0], **tol)


def test_ddpm_step_no_noise_at_t0(backend):
    x, eps_hat = randn((3, 2, 3)), randn((3, 2, 3))
    mean = genfast.ddpm_step(eps_hat, 0, x, SCHEDULE, torch.zeros_like(x))
    assert torch.equal(genfast.ddpm_step(eps_hat, 0, x, SCHEDULE), mean)
    assert torch.equal(genfast.ddpm_step(eps_hat, 0, x, SCHEDULE, randn((3, 2, 3))), mean)
    # as a tensor: samples at t = 0 get no noise, the others do
    t = torch.tensor([0, 5, 0])
    out = genfast.ddpm_step(eps_hat, t, x, SCHEDULE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[[0, 2]], mean[[0, 2]])
    assert not torch.allclose(out[1], genfast.ddpm_step(eps_hat, 5, x, SCHEDULE, torch.zeros_like(x))[1])


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_sampler_seeded_noise_is_one_stream(kernel_backend, step):
    """noise=None: the Philox noise of every backend is noise_like(x_t, seed) for the generator's seed."""
    x, eps_hat, t = randn((2, 3, 4, 5), layout="channels_last"), randn((2, 3, 4, 5)), torch.tensor([30, 7])

    def run(noise=None, generator=None):
        if step == "ddpm":
            return genfast.ddpm_step(eps_hat, t, x, SCHEDULE, noise, generator=generator)
        return genfast.ddim_step(eps_hat, t, t - 5, x, SCHEDULE, eta=0.7, noise=noise, generator=generator)

    out = {}
    for name in ("reference", kernel_backend):
        with genfast.use_backend(name):
            out[name] = run(generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out[kernel_backend], out["reference"], atol=NOISE_ATOL, rtol=0)
    seed = draw_seed(x.device, torch.Generator().manual_seed(9))
    assert_close(out["reference"], run(noise=noise_like(x, seed)))


# ---- ddim_step --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_ddim_step_matches_formula(backend, shape, layout, dtype, eta):
    eps_hat, x, z = randn(shape, dtype, layout), randn(shape, dtype, layout), randn(shape, dtype)
    t = timesteps(shape[0], low=10)
    t_prev = t - 7
    t_prev[0] = -1  # the last step: ᾱ_prev = 1
    check_forward_backward(lambda x, e: genfast.ddim_step(e, t, t_prev, x, SCHEDULE, eta, z),
                           lambda x, e: textbook_ddim(e, t, t_prev, x, z.double(), eta), [x, eps_hat], dtype, layout)


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
    x, eps_hat = randn((2, 3, 4, 4)), randn((2, 3, 4, 4))
    for t in (980, 500, 20, 0):  # t_prev = t − 20; −20 at the last step
        z = randn(x.shape)
        want = theirs.step(eps_hat, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(genfast.ddim_step(eps_hat, t, t - 20, x, schedule, eta, z), want, **tol)


# the interpreter evaluates σ's square root of the negative (1 − ᾱ_t/ᾱ_p) of an inversion step before η = 0 discards it
@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
def test_ddim_eta0_ignores_noise_and_allows_inversion(backend):
    x, eps_hat = randn((3, 2, 5)), randn((3, 2, 5))
    t, t_prev = torch.tensor([40, 3, 20]), torch.tensor([30, 9, -1])  # sample 1 steps up: DDIM inversion
    out = genfast.ddim_step(eps_hat, t, t_prev, x, SCHEDULE, 0.0, randn((3, 2, 5)))
    assert torch.equal(out, genfast.ddim_step(eps_hat, t, t_prev, x, SCHEDULE))
    assert torch.isfinite(out).all()
    assert_close(out, textbook_ddim(eps_hat.double(), t, t_prev, x.double(), 0.0, 0.0))




# ---- the step ops called directly -----------------------------------------------------------------------------

def _step_case(shape, dtype, layout, noise_mode):
    """(model output, x_t, noise, seed, t, t_prev): t[0] = 0 (DDPM: no noise there), t_prev = t − 7 (DDIM: a
    negative t_prev means ᾱ_p = 1)."""
    eps_hat, x = op_sample(shape, dtype, layout), op_sample(shape, dtype, layout)
    noise = op_sample(shape, dtype, layout) if noise_mode == "noise" else None
    t = torch.randint(0, T, (shape[0],))
    t[0] = 0
    return eps_hat, x, noise, SEED if noise_mode == "philox" else None, t, t - 7


@pytest.mark.parametrize("noise_mode", ["philox", "noise", "none"])
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_ops_match_reference(kernel_backend, dtype, layout, noise_mode):
    """The kernels' DDPM and DDIM steps and their backwards, odd sizes and every layout, against the reference on
    the dense copies (which define the noise stream of non-dense inputs)."""
    skip_unless_op_layout(kernel_backend, layout)
    ops = implementation(kernel_backend, OP)
    for shape in op_shapes(kernel_backend):
        eps_hat, x, noise, seed, t, t_prev = _step_case(shape, dtype, layout, noise_mode)
        dense = [batch_major(eps_hat), batch_major(x), None if noise is None else batch_major(noise)]
        out = ops.ddpm_step(eps_hat, t, x, noise, seed, *tables(*DDPM_TABLES))
        want = ref.ddpm_step(dense[0], t, *dense[1:], seed, *tables(*DDPM_TABLES))
        assert out.stride() == want.stride()
        assert_close(out, want, noise_scale=1.0)
        for eta in (0.0, 0.7):
            out = ops.ddim_step(eps_hat, t, t_prev, x, noise, seed, eta, *tables(*DDIM_TABLES))
            assert_close(out, ref.ddim_step(dense[0], t, t_prev, *dense[1:], seed, eta, *tables(*DDIM_TABLES)),
                         noise_scale=1.0)
        grad = op_sample(shape, dtype, layout)
        pairs = [(ops.ddpm_step_backward(grad, t, *tables(*DDPM_TABLES)),
                  ref.ddpm_step_backward(batch_major(grad), t, *tables(*DDPM_TABLES)))]
        for eta in (0.0, 0.7):
            pairs.append((ops.ddim_step_backward(grad, t, t_prev, eta, *tables(*DDIM_TABLES)),
                          ref.ddim_step_backward(batch_major(grad), t, t_prev, eta, *tables(*DDIM_TABLES))))
        for got, want in pairs:
            for g, g_ref in zip(got, want):
                assert g.stride() == g_ref.stride() and g.dtype == g_ref.dtype
                assert_grads_close(g, g_ref)


# ---- opcheck and gradcheck --------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_kind", ["loaded", "philox", "none"])
def test_opcheck(backend, noise_kind):
    x, eps_hat = randn((2, 3, 5)).requires_grad_(), randn((2, 3, 5)).requires_grad_()
    t, t_prev = torch.tensor([4, 30]), torch.tensor([-1, 20])
    noise = randn((2, 3, 5)) if noise_kind == "loaded" else None
    seed = torch.tensor([11, 12]) if noise_kind == "philox" else None
    torch.library.opcheck(ddpm_op, (eps_hat, t, x, noise, seed, *tables(*DDPM_TABLES), backend))
    torch.library.opcheck(ddim_op, (eps_hat, t, t_prev, x, noise, seed, 0.5, *tables(*DDIM_TABLES), backend))
    if noise_kind != "philox":
        grad = randn((2, 3, 5))
        torch.library.opcheck(ddpm_backward_op, (grad, t, *tables(*DDPM_TABLES), backend))
        torch.library.opcheck(ddim_backward_op, (grad, t, t_prev, 0.5, *tables(*DDIM_TABLES), backend))


def test_gradcheck_float64():
    x, eps_hat = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([3, 40])
    with genfast.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda e, x: genfast.ddpm_step(e, t, x, SCHEDULE, noise), (eps_hat, x))
        assert torch.autograd.gradcheck(lambda e, x: genfast.ddim_step(e, t, t - 30, x, SCHEDULE, 0.6, noise),
                                        (eps_hat, x))


# ---- torch.compile ----------------------------------------------------------------------------------------------

def test_compile_ddpm_step(compile_setup):
    x, eps_hat, noise = (randn((2, 3, 4)).requires_grad_() for _ in range(3))

    grad = randn((2, 3, 4))

    def fn(eps_hat, x):
        out = genfast.ddpm_step(eps_hat, torch.tensor([0, 9]), x, SCHEDULE, noise.detach())
        seeded = genfast.ddpm_step(eps_hat, 12, x, SCHEDULE)
        return out.detach(), seeded.detach(), *torch.autograd.grad(out * seeded, (eps_hat, x), grad)

    compare_compiled(fn, eps_hat, x, values=2)


def test_compile_ddim_step(compile_setup):
    x, eps_hat = (randn((2, 3, 4)).requires_grad_() for _ in range(2))

    grad = randn((2, 3, 4))

    def fn(eps_hat, x):
        out = genfast.ddim_step(eps_hat, torch.tensor([20, 9]), torch.tensor([10, -1]), x, SCHEDULE, eta=0.5)
        return out.detach(), *torch.autograd.grad(out * out, (eps_hat, x), grad)

    compare_compiled(fn, eps_hat, x, values=1)




# ---- validation -------------------------------------------------------------------------------------------------

X = torch.randn(2, 3, 4)
T2 = torch.tensor([1, 2])


@pytest.mark.parametrize("call, error, match", [
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
])
def test_validation(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpp_internal_op_checks_its_arguments():
    skip_unless_usable("cpp", op=OP)
    with pytest.raises(RuntimeError, match=f"timestep {T} is outside"):
        implementation("cpp", OP).ddpm_step(X, torch.tensor([0, T]), X, None, SEED, *tables(*DDPM_TABLES))
