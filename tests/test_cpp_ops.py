"""The C++ CPU kernels of the per-sample ops (csrc/cpu/{reparameterize,diffusion,gradient_penalty}.cpp) against the
reference: every op's forward and backward for fp32/bf16/fp16, contiguous / channels_last / non-contiguous inputs,
odd sizes, given noise and in-kernel Philox noise (the same stream as ``genfast.reference.random``), and the public
functions under ``genfast.use_backend("cpp")``."""
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import genfast
from genfast import cpp
from genfast.cpp import diffusion as cpp_diffusion
from genfast.cpp import gradient_penalty as cpp_gp
from genfast.cpp import reparameterize as cpp_vae
from genfast.reference import diffusion as ref_diffusion
from genfast.reference import gradient_penalty as ref_gp
from genfast.reference import reparameterize as ref_vae
from genfast.reference.random import noise_like

from tolerances import NOISE_ATOL, TOLERANCES, assert_close

_REASON = cpp.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"the C++ extension cannot be loaded: {_REASON}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last", "non_contiguous")
# (B, C, H, W): D = C·H·W not a multiple of 4 or 8; batch 1 with 1×1 spatial; D > the kernels' block of 2048
SHAPES = ((2, 3, 5, 7), (1, 3, 1, 1), (3, 5, 23, 29))
# high bits set in both words of key and offset, and a negative int64
SEED = torch.tensor([0x7EDC_BA98_7654_3210, -0x1234_5678_9ABC_DEF1], dtype=torch.int64)


def _sample(shape, dtype, layout, scale=1.0):
    """Random values of ``shape`` in ``layout`` (non_contiguous: every other column of a wider tensor)."""
    if layout == "non_contiguous":
        wide = torch.randn(*shape[:-1], 2 * shape[-1]) * scale
        return wide[..., ::2].to(dtype)
    x = (torch.randn(shape) * scale).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _dense(x):
    """The tensor the kernels index by memory position: a non-dense input is read as its contiguous copy (the
    public functions pass ``batch_major`` tensors), so that copy defines its noise stream."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _close(actual, expected, *, noise_scale=0.0):
    """assert_close at ``actual``'s dtype, with ``noise_scale``·NOISE_ATOL more where a term ε·scale enters."""
    tol = dict(TOLERANCES[actual.dtype])
    tol["atol"] += noise_scale * NOISE_ATOL
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def _same_layout(actual, expected):
    assert actual.stride() == expected.stride(), f"strides {actual.stride()} != {expected.stride()}"


# ---- the noise stream --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 7, 9), (2, 4101)])
def test_in_kernel_noise_is_the_reference_stream(shape):
    """z = 0 + exp(0)·ε is ε itself: the same seed gives the reference's noise within NOISE_ATOL."""
    zeros = torch.zeros(shape)
    z, _ = cpp_vae.reparameterize_kl(zeros, zeros, None, SEED, True, False)
    torch.testing.assert_close(z, noise_like(zeros, SEED), atol=NOISE_ATOL, rtol=0)


def test_noise_follows_memory_order_of_channels_last():
    x = torch.zeros(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    z, _ = cpp_vae.reparameterize_kl(x, x, None, SEED, True, False)
    _same_layout(z, x)
    torch.testing.assert_close(z, noise_like(x, SEED), atol=NOISE_ATOL, rtol=0)


_AVX2_NOISE_CHECK = textwrap.dedent("""
    import torch
    from genfast.cpp import reparameterize
    from genfast.reference.random import noise_like
    assert torch.backends.cpu.get_cpu_capability() != "AVX512"
    seed = torch.tensor([0x7EDCBA9876543210, -0x123456789ABCDEF1])
    x = torch.zeros(3, 4101)
    z, _ = reparameterize.reparameterize_kl(x, x, None, seed, True, False)
    print((z - noise_like(x, seed)).abs().max().item())
""")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the CPU runs the AVX2 noise path in every other test")
def test_avx2_noise_path_is_the_reference_stream():
    """Where ATen uses AVX-512 the noise runs a 16-lane twin; the at::vec path runs under ATEN_CPU_CAPABILITY."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    result = subprocess.run([sys.executable, "-c", _AVX2_NOISE_CHECK], env=env, capture_output=True, text=True,
                            check=True)
    assert float(result.stdout.strip().splitlines()[-1]) <= NOISE_ATOL


# ---- VAE -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given_noise", [False, True], ids=["philox", "noise"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_kl(dtype, layout, given_noise):
    for shape in SHAPES:
        mu = _sample(shape, dtype, layout)
        logvar = _sample(shape, dtype, layout, scale=0.5)
        noise = _sample(shape, dtype, layout) if given_noise else None
        sigma_max = logvar.float().mul(0.5).exp().max().item()
        ref_args = (_dense(mu), _dense(logvar), None if noise is None else _dense(noise), SEED)
        for want_z, want_kl in ((True, True), (True, False), (False, True)):
            z, kl = cpp_vae.reparameterize_kl(mu, logvar, noise, SEED, want_z, want_kl)
            z_ref, kl_ref = ref_vae.reparameterize_kl(*ref_args, want_z, want_kl)
            assert (z.dtype, z.shape, kl.dtype, kl.shape) == (z_ref.dtype, z_ref.shape, kl_ref.dtype, kl_ref.shape)
            if want_z:
                _same_layout(z, z_ref)
                _close(z, z_ref, noise_scale=sigma_max)
            if want_kl:
                _close(kl, kl_ref)
        grad_z = _sample(shape, dtype, layout)
        grad_kl = torch.randn(shape[0])
        for dz, dkl in ((grad_z, grad_kl), (grad_z, None), (None, grad_kl)):
            got = cpp_vae.reparameterize_kl_backward(dz, dkl, mu, logvar, noise, SEED)
            want = ref_vae.reparameterize_kl_backward(dz, dkl, *ref_args)
            scale = 0.5 * sigma_max * (0 if dz is None else dz.float().abs().max().item())
            for g, g_ref in zip(got, want):
                assert g.dtype == g_ref.dtype
                _close(g, g_ref, noise_scale=scale)


# ---- diffusion -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _schedule():
    return genfast.NoiseSchedule.linear(50)


def _ddpm_tables(s):
    return (s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, s.posterior_mean_coef1, s.posterior_mean_coef2,
            s.posterior_variance)


def _ddim_tables(s):
    return s.alphas_cumprod, s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod


@pytest.mark.parametrize("noise_mode", ["philox", "noise", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_steps(dtype, layout, noise_mode):
    s = _schedule()
    for shape in SHAPES:
        batch = shape[0]
        x, y = _sample(shape, dtype, layout), _sample(shape, dtype, layout)
        noise = _sample(shape, dtype, layout) if noise_mode == "noise" else None
        seed = SEED if noise_mode == "philox" else None
        t = torch.randint(0, s.num_steps, (batch,))
        t[0] = 0  # DDPM: no noise at t = 0
        t_prev = t - 7  # DDIM: negative t_prev means ᾱ_p = 1
        dx, dy = _dense(x), _dense(y)
        dnoise = None if noise is None else _dense(noise)
        q_tables = (s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod)
        if noise_mode != "none":  # q_sample always has a noise term
            out = cpp_diffusion.q_sample(x, t, noise, seed, *q_tables)
            _same_layout(out, dx)
            _close(out, ref_diffusion.q_sample(dx, t, dnoise, seed, *q_tables), noise_scale=1.0)
        out = cpp_diffusion.ddpm_step(y, t, x, noise, seed, *_ddpm_tables(s))
        _close(out, ref_diffusion.ddpm_step(dy, t, dx, dnoise, seed, *_ddpm_tables(s)), noise_scale=1.0)
        for eta in (0.0, 0.7):
            out = cpp_diffusion.ddim_step(y, t, t_prev, x, noise, seed, eta, *_ddim_tables(s))
            _close(out, ref_diffusion.ddim_step(dy, t, t_prev, dx, dnoise, seed, eta, *_ddim_tables(s)),
                   noise_scale=1.0)
        grad = _sample(shape, dtype, layout)
        dgrad = _dense(grad)
        got = cpp_diffusion.q_sample_backward(grad, t, *q_tables)
        assert got.dtype == dtype
        _close(got, ref_diffusion.q_sample_backward(dgrad, t, *q_tables))
        pairs = [(cpp_diffusion.ddpm_step_backward(grad, t, *_ddpm_tables(s)),
                  ref_diffusion.ddpm_step_backward(dgrad, t, *_ddpm_tables(s)))]
        for eta in (0.0, 0.7):
            pairs.append((cpp_diffusion.ddim_step_backward(grad, t, t_prev, eta, *_ddim_tables(s)),
                          ref_diffusion.ddim_step_backward(dgrad, t, t_prev, eta, *_ddim_tables(s))))
        for got, want in pairs:
            for g, g_ref in zip(got, want):
                _same_layout(g, g_ref)
                _close(g, g_ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_mse(dtype, layout):
    for shape in SHAPES:
        eps_hat = _sample(shape, dtype, layout)
        dense = _dense(eps_hat)
        loss = cpp_diffusion.noise_mse(eps_hat, SEED)
        loss_ref = ref_diffusion.noise_mse(dense, SEED)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss, loss_ref, atol=4 * NOISE_ATOL, rtol=2e-5)
        grad_loss = torch.tensor(1.7)
        grad = cpp_diffusion.noise_mse_backward(grad_loss, eps_hat, SEED)
        _same_layout(grad, dense)
        _close(grad, ref_diffusion.noise_mse_backward(grad_loss, dense, SEED),
               noise_scale=2 * 1.7 / eps_hat.numel())


def test_noise_mse_of_an_empty_tensor_is_nan_like_the_reference():
    eps_hat = torch.zeros(0, 3)
    assert cpp_diffusion.noise_mse(eps_hat, SEED).isnan()
    assert ref_diffusion.noise_mse(eps_hat, SEED).isnan()
    assert cpp_diffusion.noise_mse_backward(torch.tensor(1.0), eps_hat, SEED).shape == (0, 3)


# ---- gradient penalty -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_penalty_ops(dtype, layout):
    for shape in SHAPES:
        real, fake = _sample(shape, dtype, layout), _sample(shape, dtype, layout)
        alpha = torch.rand(shape[0])
        out = cpp_gp.interpolate(real, fake, alpha)
        _close(out, ref_gp.interpolate(real, fake, alpha))
        grad = _sample(shape, dtype, layout)
        for want_real, want_fake in ((True, True), (True, False), (False, True), (False, False)):
            got = cpp_gp.interpolate_backward(grad, alpha, want_real, want_fake)
            want = ref_gp.interpolate_backward(grad, alpha, want_real, want_fake)
            for g, g_ref in zip(got, want):
                assert (g.shape, g.dtype) == (g_ref.shape, g_ref.dtype)
                _close(g, g_ref)
        grad[0] = 0  # ‖g_0‖ = 0: its gradient is 0
        penalty, norms = cpp_gp.gradient_norm_penalty(grad, 10.0)
        penalty_ref, norms_ref = ref_gp.gradient_norm_penalty(grad, 10.0)
        assert (penalty.dtype, penalty.dim(), norms.dtype) == (torch.float32, 0, torch.float32)
        assert_close(norms, norms_ref)
        assert_close(penalty, penalty_ref)
        grad_penalty = torch.tensor(0.3)
        got = cpp_gp.gradient_norm_penalty_backward(grad_penalty, grad, norms, 10.0)
        _close(got, ref_gp.gradient_norm_penalty_backward(grad_penalty, grad, norms_ref, 10.0))
        assert got[0].abs().max() == 0


def test_empty_batch_penalty_is_zero():
    penalty, norms = cpp_gp.gradient_norm_penalty(torch.zeros(0, 3), 10.0)
    assert penalty.item() == 0 and norms.shape == (0,)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="mu must be float32, bfloat16 or float16"):
        cpp_vae.reparameterize_kl(x.double(), x.double(), None, SEED, True, True)
    with pytest.raises(RuntimeError, match=r"logvar must have shape \[2, 3\]"):
        cpp_vae.reparameterize_kl(x, x[:, :2], None, SEED, True, True)
    with pytest.raises(RuntimeError, match="seed must be an integer tensor"):
        cpp_vae.reparameterize_kl(x, x, None, torch.zeros(3, dtype=torch.int64), True, True)
    with pytest.raises(RuntimeError, match=r"alpha must be a floating CPU tensor of 2 elements"):
        cpp_gp.interpolate(x, x, torch.rand(3))
    s = _schedule()
    with pytest.raises(RuntimeError, match="timestep 50 is outside"):
        cpp_diffusion.q_sample(x, torch.tensor([0, 50]), None, SEED, s.sqrt_alphas_cumprod,
                               s.sqrt_one_minus_alphas_cumprod)


# ---- the public functions under use_backend("cpp") vs "reference" -------------------------------------------


def _run_both(fn):
    """fn() under the "cpp" and the "reference" backend, each from the same torch seed."""
    results = []
    for name in ("cpp", "reference"):
        torch.manual_seed(0)
        with genfast.use_backend(name):
            results.append(fn())
    return results


def _leaf(shape, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_vae_functions(dtype):
    def run():
        mu, logvar = _leaf((4, 3, 5, 5), dtype, channels_last=True), _leaf((4, 3, 5, 5), dtype)
        z, kl = genfast.reparameterize_kl(mu, logvar)
        (z.float().square().sum() + kl.sum()).backward()
        return z, kl, mu.grad, logvar.grad

    for got, want in zip(*_run_both(run)):
        _close(got, want, noise_scale=10.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_diffusion_functions(dtype):
    schedule = _schedule()

    def run():
        x0 = _leaf((3, 3, 6, 5), dtype, channels_last=True)
        weight = torch.tensor(0.8, requires_grad=True)
        loss = genfast.diffusion_loss(lambda x_t, t: x_t * weight, x0, schedule)
        loss.backward()
        x_t = _leaf((3, 3, 6, 5), dtype)
        eps_hat = _leaf((3, 3, 6, 5), dtype)
        t = torch.tensor([0, 17, 49])
        ddpm = genfast.ddpm_step(eps_hat, t, x_t, schedule)
        ddim = genfast.ddim_step(eps_hat, t, t - 10, x_t, schedule, eta=0.5)
        (ddpm.float().sum() + ddim.float().square().sum()).backward()
        q = genfast.q_sample(x0.detach(), t, schedule)
        return loss, x0.grad, weight.grad, ddpm, ddim, x_t.grad, eps_hat.grad, q

    for got, want in zip(*_run_both(run)):
        _close(got, want, noise_scale=10.0)


def test_public_gradient_penalty():
    def run():
        critic = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                     torch.nn.Linear(4 * 5 * 3, 1))
        real, fake = torch.randn(3, 3, 7, 5), torch.randn(3, 3, 7, 5)
        penalty = genfast.gradient_penalty(lambda x: critic(x).squeeze(1), real, fake, weight=10.0)
        penalty.backward()
        # the Linear's bias does not change ∇_x critic: it gets no gradient
        return (penalty,) + tuple(p.grad for p in critic.parameters() if p.grad is not None)

    got, want = _run_both(run)
    assert len(got) == len(want) == 4
    for g, g_ref in zip(got, want):
        assert_close(g, g_ref)


# ---- torch.library.opcheck of the public ops with backend "cpp" -----------------------------------------------


def test_opcheck_with_cpp_backend():
    x = torch.randn(2, 3, 5, 7)
    s = _schedule()
    t = torch.tensor([3, 41])
    cases = [
        (torch.ops.genfast.reparameterize_kl.default, (x, x.mul(0.5), None, SEED, True, True, "cpp")),
        (torch.ops.genfast.q_sample.default,
         (x, t, None, SEED, s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, "cpp")),
        (torch.ops.genfast.gradient_norm_penalty.default, (x, 10.0, "cpp")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
