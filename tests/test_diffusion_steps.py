"""Diffusion sampler steps: ddpm_step / ddim_step on every backend against the textbook formulas in float64 (every
prediction type and x̂₀ handling: as it is, clipped, dynamically thresholded) and the kernels against the reference
(forward and backward with random upstream gradients, every layout and odd size, given, Philox and no noise),
against diffusers' schedulers for every configuration the steps take (their defaults included), the dynamic
threshold against torch.quantile, the shared Philox stream, opcheck, gradcheck, torch.compile and argument
validation. Schedule, q_sample and the loss are in test_diffusion.py."""
import inspect
import itertools

import pytest
import torch

import genfast
from backends import skip_unless_usable
from diffusion_cases import (CASES, DTYPES, HANDLINGS, OP_LAYOUTS, PREDICTION_TYPES, Q_TABLES, SCHEDULE, SEED,
                             STEP_TABLES, T, check_forward_backward, compare_compiled, compile_setup,
                             eps_step_inputs,
                             ddim_backward_op, ddim_op, ddpm_backward_op, ddpm_op, op_sample, op_shapes, randn,
                             skip_unless_op_layout, tables, textbook_ddim, textbook_ddpm, textbook_ddpm_algorithm2,
                             threshold_op, timesteps)
from genfast._backend import implementation
from genfast._shared import triton_interpret
from genfast._rng import draw_seed
from genfast._validation import batch_major
from genfast.ops.diffusion import OP
from genfast.reference import diffusion as ref
from genfast.reference.random import noise_like
from genfast.kernels import per_sample
from tolerances import NOISE_ATOL, TOLERANCES, assert_close, assert_grads_close

__all__ = ["compile_setup"]  # a fixture of the compile tests


# ---- the steps against the textbook -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_ddpm_step_matches_formula(backend, shape, layout, dtype):
    """The defaults (ε-prediction, x̂₀ clipped to [−1, 1], as diffusers) on every case, and without clipping Ho et
    al.'s Algorithm 2."""
    t = timesteps(shape[0])
    t[0] = 0  # no noise at t = 0
    (eps_hat, x), z = eps_step_inputs(shape, dtype, layout, t), randn(shape, dtype)
    check_forward_backward(lambda x, e: genfast.ddpm_step(e, t, x, SCHEDULE, z),
                           lambda x, e: textbook_ddpm(e, t, x, z.double()), [x, eps_hat], dtype, layout)
    check_forward_backward(lambda x, e: genfast.ddpm_step(e, t, x, SCHEDULE, z, clip_sample=False),
                           lambda x, e: textbook_ddpm_algorithm2(e, t, x, z.double()), [x, eps_hat], dtype, layout)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_ddim_step_matches_formula(backend, shape, layout, dtype, eta):
    t = timesteps(shape[0], low=10)
    (eps_hat, x), z = eps_step_inputs(shape, dtype, layout, t), randn(shape, dtype)
    t_prev = t - 7
    t_prev[0] = -1  # the last step: ᾱ_prev = 1
    check_forward_backward(lambda x, e: genfast.ddim_step(e, t, t_prev, x, SCHEDULE, eta, z),
                           lambda x, e: textbook_ddim(e, t, t_prev, x, z.double(), eta), [x, eps_hat], dtype, layout)


@pytest.mark.parametrize("handling", list(HANDLINGS))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_x0_handling_matches_formula(backend, dtype, prediction_type, handling):
    """Every prediction type and x̂₀ handling: DDPM with both variances, t → t − 1 and a stride; DDIM with η = 0
    and 0.7, with and without use_clipped_model_output; forward and backward (no gradient where x̂₀ was clamped)."""
    shape, layout = (2, 3, 5, 7), "channels_last"
    settings = dict(prediction_type=prediction_type, **HANDLINGS[handling])
    y, z = randn(shape, dtype, layout), randn(shape, dtype)
    x = (1.5 * randn(shape, torch.float32, layout)).to(dtype)
    t = torch.tensor([0, 31])
    for variance_type, t_prev in (("fixed_small", None), ("fixed_large", t - 9)):
        check_forward_backward(
            lambda x, y: genfast.ddpm_step(y, t, x, SCHEDULE, z, t_prev=t_prev, variance_type=variance_type,
                                           **settings),
            lambda x, y: textbook_ddpm(y, t, x, z.double(), t_prev=t_prev, variance_type=variance_type, **settings),
            [x, y], dtype, layout)
    t = torch.tensor([12, 45])
    for eta, use_clipped in itertools.product((0.0, 0.7), (False, True)):
        check_forward_backward(
            lambda x, y: genfast.ddim_step(y, t, t - 12, x, SCHEDULE, eta, z, use_clipped_model_output=use_clipped,
                                           **settings),
            lambda x, y: textbook_ddim(y, t, t - 12, x, z.double(), eta, use_clipped_model_output=use_clipped,
                                       **settings),
            [x, y], dtype, layout)


def test_clipped_x0_passes_no_gradient_outside_the_range(backend):
    """sample prediction, DDPM: x_prev = c1·clamp(y, −1, 1) + c2·x_t + σz, so dy = c1·g inside [−1, 1], 0 outside."""
    y = torch.tensor([[-3.0, -0.5, 0.25, 2.0]], requires_grad=True)
    x = torch.zeros(1, 4)
    out = genfast.ddpm_step(y, 20, x, SCHEDULE, torch.zeros(1, 4), prediction_type="sample")
    (grad,) = torch.autograd.grad(out.sum(), y)
    c1 = SCHEDULE.posterior_mean_coef1[20].item()
    torch.testing.assert_close(grad, torch.tensor([[0.0, c1, c1, 0.0]]))


# ---- against diffusers' schedulers ------------------------------------------------------------------------------

def _diffusers(name):
    return getattr(pytest.importorskip("diffusers"), name)


def _with_float64_tables(scheduler, schedule):
    """``scheduler`` computing its coefficients from our float64 ᾱ (its elementwise math stays in fp32)."""
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    return scheduler


@pytest.mark.parametrize("handling", list(HANDLINGS))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_step_matches_diffusers(backend, prediction_type, handling):
    """DDPMScheduler.step for both variances, all T steps (t → t − 1) and set_timesteps(50) (t → t − 20), the
    same variance noise."""
    schedule = genfast.NoiseSchedule.linear(num_steps=1000)
    settings = dict(prediction_type=prediction_type, **HANDLINGS[handling])
    x, y = 1.5 * randn((2, 3, 4, 4)), randn((2, 3, 4, 4))
    for variance_type, steps in itertools.product(("fixed_small", "fixed_large"), (None, 50)):
        theirs = _with_float64_tables(_diffusers("DDPMScheduler")(variance_type=variance_type, **settings), schedule)
        if steps is not None:
            theirs.set_timesteps(steps)
        for t in (0, 1, 20, 500, 980, 999) if steps is None else (0, 20, 500, 980):
            want = theirs.step(y, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))  # diffusers' draw
            t_prev = None if steps is None else t - 20
            got = genfast.ddpm_step(y, t, x, schedule, z, t_prev=t_prev, variance_type=variance_type, **settings)
            torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
            # a (B,) tensor of timesteps: each sample as its own diffusers step
            per_sample = genfast.ddpm_step(y, torch.tensor([t, 999 - t]), x, schedule, z,
                                           t_prev=None if t_prev is None else torch.tensor([t_prev, 979 - t]),
                                           variance_type=variance_type, **settings)
            torch.testing.assert_close(per_sample[0], want[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("handling", list(HANDLINGS))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_matches_diffusers(backend, prediction_type, handling, eta):
    """DDIMScheduler.step after set_timesteps(50), with and without use_clipped_model_output, the same
    variance noise."""
    schedule = genfast.NoiseSchedule.linear(num_steps=1000)
    settings = dict(prediction_type=prediction_type, **HANDLINGS[handling])
    theirs = _with_float64_tables(_diffusers("DDIMScheduler")(**settings), schedule)
    theirs.set_timesteps(50)
    x, y = 1.5 * randn((2, 3, 4, 4)), randn((2, 3, 4, 4))
    for t, use_clipped in itertools.product((980, 500, 20, 0), (False, True)):  # t_prev = t − 20; −20 at the end
        z = randn(x.shape)
        want = theirs.step(y, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=z).prev_sample
        got = genfast.ddim_step(y, t, t - 20, x, schedule, eta, z, use_clipped_model_output=use_clipped, **settings)
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_steps_take_diffusers_names_and_defaults():
    """Every keyword the steps share with diffusers' scheduler configs has diffusers' default."""
    pytest.importorskip("diffusers")
    for step, scheduler in ((genfast.ddpm_step, "DDPMScheduler"), (genfast.ddim_step, "DDIMScheduler")):
        theirs = inspect.signature(_diffusers(scheduler).__init__).parameters
        ours = {name: p.default for name, p in inspect.signature(step).parameters.items()
                if p.kind == p.KEYWORD_ONLY and name in theirs}
        assert set(ours) >= {"prediction_type", "clip_sample", "clip_sample_range", "thresholding",
                             "dynamic_thresholding_ratio", "sample_max_value"}
        assert ours == {name: theirs[name].default for name in ours}
    step_arguments = inspect.signature(_diffusers("DDIMScheduler").step).parameters
    assert inspect.signature(genfast.ddim_step).parameters["use_clipped_model_output"].default == \
        step_arguments["use_clipped_model_output"].default


def test_steps_with_defaults_match_diffusers_with_defaults(backend):
    """genfast.ddpm_step / ddim_step with no settings against DDPMScheduler() / DDIMScheduler() with none, on
    diffusers' own float32 tables: diffusers derives β_t = 1 − ᾱ_t/ᾱ_{t−1} and 1 − ᾱ from float32 ᾱ, a relative
    error of about 2⁻²⁴/β_t ≈ 6e-4 at β ≈ 1e-4, which reaches x_{t−1} (|x| ≲ 4) as up to ~3e-4."""
    schedule = genfast.NoiseSchedule.linear()
    x, y = 1.5 * randn((2, 3, 4, 4)), randn((2, 3, 4, 4))
    ddpm = _diffusers("DDPMScheduler")()
    for t in (0, 1, 10, 500, 999):
        want = ddpm.step(y, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(genfast.ddpm_step(y, t, x, schedule, z), want, atol=1e-3, rtol=1e-3)
    ddim = _diffusers("DDIMScheduler")()
    ddim.set_timesteps(50)
    for t in (980, 500, 20, 0):
        want = ddim.step(y, t, x).prev_sample
        torch.testing.assert_close(genfast.ddim_step(y, t, t - 20, x, schedule), want, atol=1e-4, rtol=1e-4)


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


# the interpreter evaluates σ's square root of the negative (1 − ᾱ_t/ᾱ_p) of an inversion step before η = 0 discards it
@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
def test_ddim_eta0_ignores_noise_and_allows_inversion(backend):
    x, eps_hat = randn((3, 2, 5)), randn((3, 2, 5))
    t, t_prev = torch.tensor([40, 3, 20]), torch.tensor([30, 9, -1])  # sample 1 steps up: DDIM inversion
    out = genfast.ddim_step(eps_hat, t, t_prev, x, SCHEDULE, 0.0, randn((3, 2, 5)))
    assert torch.equal(out, genfast.ddim_step(eps_hat, t, t_prev, x, SCHEDULE))
    assert torch.isfinite(out).all()
    assert_close(out, textbook_ddim(eps_hat.double(), t, t_prev, x.double(), 0.0, 0.0))


# ---- the dynamic threshold --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_threshold_is_torch_quantile(backend, dtype, monkeypatch):
    """The threshold op against diffusers' torch.quantile of |x̂₀| clamped to [1, max_value]: bitwise in fp32 (x̂₀ =
    y exactly for sample prediction), for ratios whose rank falls in the sorted order's bottom, middle and top,
    samples of one element, one block and several blocks (in the Triton interpreter, whose sort of a block of 2048
    takes a minute, blocks of 128)."""
    long = (2, 3000)
    if backend == "triton" and triton_interpret():
        monkeypatch.setattr(per_sample, "MAX_BLOCK", 128)
        long = (2, 300)
    for shape in ((3, 2, 5, 7), (4, 1), long):
        y = (2 * randn(shape, torch.float32)).to(dtype)
        x, t = randn(shape, dtype), timesteps(shape[0])
        for ratio in (0.995, 0.9, 0.5, 0.1, 0.0, 1.0):
            got = threshold_op(y, t, x, *tables(*Q_TABLES), "sample", ratio, 1e6, backend)
            want = torch.quantile(y.float().abs().reshape(shape[0], -1), ratio, dim=1).clamp(min=1, max=1e6)
            assert got.dtype == torch.float32 and got.shape == (shape[0],)
            assert torch.equal(got, want), (shape, ratio, got, want)
    s = threshold_op(y, t, x, *tables(*Q_TABLES), "sample", 0.9, 1.5, backend)
    assert torch.equal(s, want.clamp(max=1.5))


def test_dynamic_threshold_of_empty_samples_is_one(backend):
    x = torch.zeros(2, 0)
    assert torch.equal(threshold_op(x, torch.tensor([3, 4]), x, *tables(*Q_TABLES), "epsilon", 0.9, 1.5, backend),
                       torch.ones(2))


# ---- the step ops called directly -----------------------------------------------------------------------------

def _step_case(shape, dtype, layout, noise_mode):
    """(model output, x_t, noise, seed, t, t_prev): t[0] = 0 (DDPM: no noise there), t_prev = t − 7 (a negative
    t_prev means ᾱ_p = 1)."""
    eps_hat, x = op_sample(shape, dtype, layout), op_sample(shape, dtype, layout)
    noise = op_sample(shape, dtype, layout) if noise_mode == "noise" else None
    t = torch.randint(0, T, (shape[0],))
    t[0] = 0
    return eps_hat, x, noise, SEED if noise_mode == "philox" else None, t, t - 7


def _compare_ops(ops, eps_hat, x, noise, seed, t, t_prev, dense, settings, threshold):
    """The kernels' DDPM and DDIM steps and their backwards against the reference on the dense copies."""
    prediction_type, clip = settings
    step_tables = tables(*STEP_TABLES)
    for t_prev_ddpm, variance_type in ((None, "fixed_small"), (t_prev, "fixed_large")):
        out = ops.ddpm_step(eps_hat, t, t_prev_ddpm, x, noise, seed, threshold, *step_tables, prediction_type,
                            variance_type, clip)
        want = ref.ddpm_step(dense[0], t, t_prev_ddpm, *dense[1:], seed, threshold, *step_tables, prediction_type,
                             variance_type, clip)
        assert out.stride() == want.stride()
        assert_close(out, want, noise_scale=1.0)
    for eta, use_clipped in ((0.0, False), (0.7, True)):
        out = ops.ddim_step(eps_hat, t, t_prev, x, noise, seed, threshold, *step_tables, eta, prediction_type,
                            use_clipped, clip)
        assert_close(out, ref.ddim_step(dense[0], t, t_prev, *dense[1:], seed, threshold, *step_tables, eta,
                                        prediction_type, use_clipped, clip), noise_scale=1.0)


def _compare_backward_ops(ops, grad, eps_hat, x, t, t_prev, settings, threshold):
    """The backward ops (model output and x_t given only when x̂₀ is clipped or thresholded, grad in x_t's layout
    then: as the registered ops call them) against the reference."""
    prediction_type, clip = settings
    step_tables = tables(*STEP_TABLES)
    handled = clip is not None or threshold is not None
    y, x = (eps_hat, x) if handled else (None, None)
    grad = grad if handled else batch_major(grad)
    pairs = [(ops.ddpm_step_backward(grad, y, x, threshold, t, t_prev, *step_tables, prediction_type,
                                     "fixed_small", clip),
              ref.ddpm_step_backward(grad, y, x, threshold, t, t_prev, *step_tables, prediction_type,
                                     "fixed_small", clip))]
    for eta, use_clipped in ((0.0, False), (0.7, True)):
        pairs.append((ops.ddim_step_backward(grad, y, x, threshold, t, t_prev, *step_tables, eta, prediction_type,
                                             use_clipped, clip),
                      ref.ddim_step_backward(grad, y, x, threshold, t, t_prev, *step_tables, eta, prediction_type,
                                             use_clipped, clip)))
    for got, want in pairs:
        for g, g_ref in zip(got, want):
            assert g.stride() == g_ref.stride() and g.dtype == g_ref.dtype
            assert_grads_close(g, g_ref, allow_zero=True)  # a zero: e.g. dx of sample prediction at t = 0


@pytest.mark.parametrize("noise_mode", ["philox", "noise", "none"])
@pytest.mark.parametrize("layout", OP_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_ops_match_reference(kernel_backend, dtype, layout, noise_mode):
    """The kernels' steps (ε-prediction, x̂₀ clipped to ±1: the defaults) and their backwards, odd sizes and every
    layout, against the reference on the dense copies (which define the noise stream of non-dense inputs)."""
    skip_unless_op_layout(kernel_backend, layout)
    ops = implementation(kernel_backend, OP)
    for shape in op_shapes(kernel_backend):
        eps_hat, x, noise, seed, t, t_prev = _step_case(shape, dtype, layout, noise_mode)
        dense = [batch_major(eps_hat), batch_major(x), None if noise is None else batch_major(noise)]
        _compare_ops(ops, eps_hat, x, noise, seed, t, t_prev, dense, ("epsilon", 1.0), None)
        if layout != "non_contiguous":  # the registered ops give the backward x_t-laid-out tensors
            grad = op_sample(shape, dtype, layout)
            _compare_backward_ops(ops, grad, eps_hat, x, t, t_prev, ("epsilon", 1.0), None)


@pytest.mark.parametrize("handling", list(HANDLINGS))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_ops_x0_handling_match_reference(kernel_backend, dtype, prediction_type, handling):
    """Every prediction type and x̂₀ handling through the kernels (channels_last, Philox noise), the threshold from
    the backend's own threshold op, forward and backward."""
    ops = implementation(kernel_backend, OP)
    clip = HANDLINGS["clip"]["clip_sample_range"] if handling == "clip" else None
    for shape in op_shapes(kernel_backend):
        eps_hat, x, _, seed, t, t_prev = _step_case(shape, dtype, "channels_last", "philox")
        x = (1.5 * x.float()).to(dtype)
        threshold = None
        if handling == "threshold":
            threshold = ops.dynamic_threshold(eps_hat, t, x, *tables(*Q_TABLES), prediction_type, 0.9, 1.5)
            assert_close(threshold, ref.dynamic_threshold(eps_hat, t, x, *tables(*Q_TABLES), prediction_type, 0.9,
                                                          1.5), torch.float32)
        _compare_ops(ops, eps_hat, x, None, seed, t, t_prev, [eps_hat, x, None], (prediction_type, clip), threshold)
        grad = op_sample(shape, dtype, "channels_last")
        _compare_backward_ops(ops, grad, eps_hat, x, t, t_prev, (prediction_type, clip), threshold)


# ---- opcheck and gradcheck --------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_kind", ["loaded", "philox", "none"])
def test_opcheck(backend, noise_kind):
    x, eps_hat = randn((2, 3, 5)).requires_grad_(), randn((2, 3, 5)).requires_grad_()
    t, t_prev = torch.tensor([4, 30]), torch.tensor([-1, 20])
    noise = randn((2, 3, 5)) if noise_kind == "loaded" else None
    seed = torch.tensor([11, 12]) if noise_kind == "philox" else None
    s = threshold_op(eps_hat.detach(), t, x.detach(), *tables(*Q_TABLES), "v_prediction", 0.9, 1.5, backend)
    torch.library.opcheck(threshold_op, (eps_hat.detach(), t, x.detach(), *tables(*Q_TABLES), "v_prediction", 0.9,
                                         1.5, backend))
    for threshold, clip, t_prev_ddpm in ((None, None, None), (None, 1.0, t_prev), (s, None, None)):
        torch.library.opcheck(ddpm_op, (eps_hat, t, t_prev_ddpm, x, noise, seed, threshold, *tables(*STEP_TABLES),
                                        "v_prediction", "fixed_small", clip, backend))
        torch.library.opcheck(ddim_op, (eps_hat, t, t_prev, x, noise, seed, threshold, *tables(*STEP_TABLES), 0.5,
                                        "epsilon", True, clip, backend))
        if noise_kind != "philox":
            grad = randn((2, 3, 5))
            handled = (eps_hat.detach(), x.detach()) if clip is not None or threshold is not None else (None, None)
            torch.library.opcheck(ddpm_backward_op, (grad, *handled, threshold, t, t_prev_ddpm,
                                                     *tables(*STEP_TABLES), "v_prediction", "fixed_small", clip,
                                                     backend))
            torch.library.opcheck(ddim_backward_op, (grad, *handled, threshold, t, t_prev, *tables(*STEP_TABLES),
                                                     0.5, "epsilon", True, clip, backend))


def test_gradcheck_float64():
    x, y = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([3, 40])
    with genfast.use_backend("reference"):
        for settings in (dict(), dict(clip_sample=False)):
            assert torch.autograd.gradcheck(lambda e, x: genfast.ddpm_step(e, t, x, SCHEDULE, noise, **settings),
                                            (y, x))
            assert torch.autograd.gradcheck(
                lambda e, x: genfast.ddim_step(e, t, t - 30, x, SCHEDULE, 0.6, noise, use_clipped_model_output=True,
                                               **settings), (y, x))


def test_gradcheck_float64_thresholded_with_the_threshold_held():
    """Dynamic thresholding's s is a constant of the backward (the steps' docstrings say so; autograd through
    diffusers' torch.quantile would pass a gradient through s too): gradcheck of the step ops with s given, and
    the public steps' gradient equal to the ops' with their own s — an s inside (1, sample_max_value), so that it
    scales x̂₀ (at its clamps gradcheck of the public steps would pass either way)."""
    x, y = (2 * torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(2))
    x.requires_grad_(), y.requires_grad_()
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    t, t_prev = torch.tensor([3, 40]), torch.tensor([1, 10])
    settings = dict(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.7, sample_max_value=4.0)
    s = threshold_op(y.detach(), t, x.detach(), *tables(*Q_TABLES), "sample", 0.7, 4.0, "reference")
    assert ((s > 1) & (s < 4)).all(), s

    def ddpm(e, x_t):
        return ddpm_op(e, t, None, x_t, noise, None, s, *tables(*STEP_TABLES), "sample", "fixed_small", None,
                       "reference")

    def ddim(e, x_t):
        return ddim_op(e, t, t_prev, x_t, noise, None, s, *tables(*STEP_TABLES), 0.6, "sample", True, None,
                       "reference")

    grad = torch.randn(2, 3, 4, dtype=torch.float64)
    with genfast.use_backend("reference"):
        for op, public in ((ddpm, lambda: genfast.ddpm_step(y, t, x, SCHEDULE, noise, **settings)),
                           (ddim, lambda: genfast.ddim_step(y, t, t_prev, x, SCHEDULE, 0.6, noise,
                                                            use_clipped_model_output=True, **settings))):
            assert torch.autograd.gradcheck(op, (y, x))
            expected = torch.autograd.grad(op(y, x), (y, x), grad)
            for actual, wanted in zip(torch.autograd.grad(public(), (y, x), grad), expected):
                assert_grads_close(actual, wanted, torch.float64)


# ---- torch.compile ----------------------------------------------------------------------------------------------

def test_compile_ddpm_step(compile_setup):
    x, eps_hat, noise = (randn((2, 3, 4)).requires_grad_() for _ in range(3))

    grad = randn((2, 3, 4))

    def fn(eps_hat, x):
        out = genfast.ddpm_step(eps_hat, torch.tensor([0, 9]), x, SCHEDULE, noise.detach())
        seeded = genfast.ddpm_step(eps_hat, 12, x, SCHEDULE, t_prev=4, prediction_type="v_prediction",
                                   thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5)
        return out.detach(), seeded.detach(), *torch.autograd.grad(out * seeded, (eps_hat, x), grad)

    compare_compiled(fn, eps_hat, x, values=2)


def test_compile_ddim_step(compile_setup):
    x, eps_hat = (randn((2, 3, 4)).requires_grad_() for _ in range(2))

    grad = randn((2, 3, 4))

    def fn(eps_hat, x):
        out = genfast.ddim_step(eps_hat, torch.tensor([20, 9]), torch.tensor([10, -1]), x, SCHEDULE, eta=0.5,
                                use_clipped_model_output=True)
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
    (lambda: genfast.ddpm_step(X, 5, X, SCHEDULE, t_prev=5), ValueError, "t_prev must be < t"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, t_prev=torch.tensor([0, 2])), ValueError, "t_prev must be < t"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, t_prev=T2.float()), TypeError, "t_prev"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, prediction_type="eps"), ValueError, "prediction_type must be"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, variance_type="learned"), ValueError, "variance_type must be"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, clip_sample=1), TypeError, "clip_sample must be a bool"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, clip_sample_range=float("inf")), TypeError, "clip_sample_range"),
    (lambda: genfast.ddpm_step(X, T2, X, SCHEDULE, thresholding="yes"), TypeError, "thresholding must be a bool"),
    (lambda: genfast.ddim_step(X, T2, 1, X, SCHEDULE, dynamic_thresholding_ratio=1.5), ValueError,
     "dynamic_thresholding_ratio"),
    (lambda: genfast.ddim_step(X, T2, 1, X, SCHEDULE, sample_max_value=-1.0), ValueError, "sample_max_value"),
    (lambda: genfast.ddim_step(X, T2, 1, X, SCHEDULE, use_clipped_model_output=None), TypeError,
     "use_clipped_model_output"),
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
        implementation("cpp", OP).ddpm_step(X, torch.tensor([0, T]), None, X, None, SEED, None,
                                            *tables(*STEP_TABLES), "epsilon", "fixed_small", 1.0)
