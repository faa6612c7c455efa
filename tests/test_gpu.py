"""GPU-only checks (marked `gpu`, skipped without CUDA): the compiled Triton kernels against the reference on the
device, bf16/fp16, channels_last, sizes past 2**31 elements, and torch.compile(fullgraph=True) on CUDA."""
import pytest
import torch

import genfast
from tolerances import NOISE_ATOL, assert_close

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _both_backends(fn, *args, **kwargs):
    """fn on the reference and on the compiled kernels, with identically seeded generators."""
    out = {}
    for backend in ("reference", "triton"):
        with genfast.use_backend(backend):
            gen = torch.Generator(device="cuda").manual_seed(1)
            out[backend] = fn(*args, generator=gen, **kwargs) if "generator" not in kwargs else fn(*args, **kwargs)
    return out["triton"], out["reference"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_kl_on_gpu(dtype):
    mu = torch.randn(256, 4, 32, 32, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    logvar = torch.randn_like(mu) * 0.3
    (z, kl), (z_ref, kl_ref) = _both_backends(genfast.reparameterize_kl, mu, logvar)
    assert_close(z, z_ref, dtype)
    assert_close(kl, kl_ref, torch.float32)


def test_noise_identity_on_gpu():
    mu = torch.zeros(64, 4096, device="cuda")
    z, z_ref = _both_backends(genfast.reparameterize, mu, mu)
    torch.testing.assert_close(z, z_ref, atol=NOISE_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, groups", [((8, 128, 64, 64), 32), ((1, 512, 256, 256), 32), ((4, 320, 7, 9), 32)])
def test_group_norm_silu_on_gpu(shape, groups, dtype, layout):
    x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout).requires_grad_()
    weight = torch.randn(shape[1], device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(shape[1], device="cuda", dtype=dtype, requires_grad=True)
    temb = torch.randn(shape[0], shape[1], device="cuda", dtype=dtype, requires_grad=True)
    results = {}
    for backend in ("reference", "triton"):
        with genfast.use_backend(backend):
            y = genfast.group_norm_silu(x, groups, weight, bias, add=temb)
            grads = torch.autograd.grad(y.float().square().mean(), (x, weight, bias, temb))
            results[backend] = (y, *grads)
    assert results["triton"][0].is_contiguous(memory_format=layout)
    for got, want in zip(results["triton"], results["reference"]):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_sample_and_diffusion_loss_on_gpu(dtype):
    schedule = genfast.NoiseSchedule.linear().cuda()
    x0 = torch.randn(32, 3, 64, 64, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (32,), device="cuda")
    x_t, x_t_ref = _both_backends(genfast.q_sample, x0, t, schedule)
    assert_close(x_t, x_t_ref, dtype)
    model = torch.nn.Conv2d(3, 3, 3, padding=1).cuda().to(dtype)
    loss, loss_ref = _both_backends(genfast.diffusion_loss, model, x0, schedule, t=t)
    assert_close(loss, loss_ref, torch.float32)


def test_sampler_steps_on_gpu():
    schedule = genfast.NoiseSchedule.linear().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    eps = torch.randn_like(x)
    x_prev, x_prev_ref = _both_backends(genfast.ddpm_step, eps, 500, x, schedule)
    assert_close(x_prev, x_prev_ref)
    x_prev, x_prev_ref = _both_backends(genfast.ddim_step, eps, 500, 480, x, schedule, eta=1.0)
    assert_close(x_prev, x_prev_ref)


def test_gradient_penalty_on_gpu():
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(),
                                 torch.nn.Linear(8 * 16 * 16, 1)).cuda()
    real = torch.randn(16, 3, 32, 32, device="cuda")
    fake = torch.randn(16, 3, 32, 32, device="cuda")
    alpha = torch.rand(16, device="cuda")
    grads = {}
    for backend in ("reference", "triton"):
        with genfast.use_backend(backend):
            critic.zero_grad()
            genfast.gradient_penalty(critic, real, fake, alpha=alpha).backward()
            grads[backend] = [p.grad.clone() for p in critic.parameters()]
    for got, want in zip(grads["triton"], grads["reference"]):
        assert_close(got, want)


def test_past_two_to_the_31_elements():
    """Offsets past 2**31 elements: KL of a (3, 2**30 + 5) fp16 tensor, checked row by row in float64."""
    n = 2**30 + 5
    mu = torch.empty(3, n, device="cuda", dtype=torch.float16).normal_(0, 0.1)
    logvar = torch.empty_like(mu).normal_(0, 0.1)
    with genfast.use_backend("triton"):
        kl = genfast.gaussian_kl(mu, logvar)
        x_t = genfast.q_sample(mu, torch.tensor([0, 10, 999], device="cuda"), genfast.NoiseSchedule.linear().cuda(),
                               noise=logvar)
    for b in range(3):
        m, lv = mu[b].double(), logvar[b].double()
        want = 0.5 * (m * m + lv.exp() - 1 - lv).sum()
        torch.testing.assert_close(kl[b].double(), want, rtol=1e-4, atol=1e-2)
    # the last elements of the last sample lie past 2**31 in memory
    schedule = genfast.NoiseSchedule.linear().cuda()
    a = schedule.alphas_cumprod[999]
    want_tail = (a.sqrt() * mu[2, -1000:].double() + (1 - a).sqrt() * logvar[2, -1000:].double())
    torch.testing.assert_close(x_t[2, -1000:].double(), want_tail, rtol=2e-3, atol=2e-3)


def test_torch_compile_fullgraph_on_gpu():
    x = torch.randn(4, 64, 16, 16, device="cuda", requires_grad=True)
    mu = torch.randn(4, 32, device="cuda", requires_grad=True)

    def f(x, mu):
        h = genfast.group_norm_silu(x, 32)
        z, kl = genfast.reparameterize_kl(mu, mu, torch.ones_like(mu))
        return h.square().mean() + z.sum() + kl.sum()

    eager = f(x, mu)
    compiled = torch.compile(f, fullgraph=True)(x, mu)
    assert_close(compiled, eager)
    compiled.backward()
