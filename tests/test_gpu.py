"""GPU-only checks (marked `gpu`, skipped without CUDA): the compiled Triton kernels and the CUDA C++ kernels (the
"cpp" backend's GroupNorm + SiLU) against the reference on the device, forward and backward with random upstream
gradients (gradients compared by relative norm as well), bf16/fp16, channels_last, sizes past 2**31 elements, and
torch.compile(fullgraph=True) on CUDA, its compiled backward included."""
import pytest
import torch

import genfast
from backends import KERNEL_BACKENDS, skip_unless_usable
from genfast._backend import DEVICES
from tolerances import NOISE_ATOL, TOLERANCES, assert_close, assert_close_rel_norm

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gpu_backends(op):
    """The kernel backends with CUDA kernels for ``op`` (the backend table's DEVICES)."""
    return [name for name in KERNEL_BACKENDS if "cuda" in DEVICES[name][op]]


def _seeded(fn, backend, *args, **kwargs):
    """fn(*args) on ``backend`` with a freshly seeded CUDA generator (the same Philox noise on every backend)."""
    with genfast.use_backend(backend):
        return fn(*args, generator=torch.Generator(device="cuda").manual_seed(1), **kwargs)


def _assert_grad(got, want, dtype, name=None):
    """A gradient of large reductions on the device: by relative norm, and elementwise with an atol scaled by its
    largest value (fp32 sums of up to 2**16 terms, in another order than the reference's)."""
    assert got.dtype == want.dtype, name
    assert_close_rel_norm(got, want, dtype, name)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, atol=tol["atol"] * max(want.abs().max().item(), 1.0), rtol=tol["rtol"],
                               msg=name)


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_kl_on_gpu(dtype):
    mu = torch.randn(256, 4, 32, 32, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    logvar = torch.randn_like(mu) * 0.3
    grad_z, grad_kl = torch.randn_like(mu), torch.randn(256, device="cuda")
    results = {}
    for backend in ("reference", "triton"):
        leaves = _leaves(mu, logvar)
        z, kl = _seeded(genfast.reparameterize_kl, backend, *leaves)
        results[backend] = (z, kl, *torch.autograd.grad((z, kl), leaves, (grad_z, grad_kl)))
    (z, kl, dmu, dlogvar), (z_ref, kl_ref, dmu_ref, dlogvar_ref) = results["triton"], results["reference"]
    sigma = logvar.float().mul(0.5).exp().max().item()
    assert_close(z, z_ref, dtype, noise_scale=sigma)
    assert_close(kl, kl_ref, torch.float32)
    _assert_grad(dmu, dmu_ref, dtype, "mu")
    assert_close_rel_norm(dlogvar, dlogvar_ref, dtype, "logvar")


def test_noise_identity_on_gpu():
    mu = torch.zeros(64, 4096, device="cuda")
    z, z_ref = (_seeded(genfast.reparameterize, backend, mu, mu) for backend in ("triton", "reference"))
    torch.testing.assert_close(z, z_ref, atol=NOISE_ATOL, rtol=0)


@pytest.mark.parametrize("backend", _gpu_backends("group_norm_silu"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, groups", [((8, 128, 64, 64), 32), ((1, 512, 256, 256), 32), ((4, 320, 7, 9), 32)])
def test_group_norm_silu_on_gpu(backend, shape, groups, dtype, layout):
    """The Triton kernels and the CUDA C++ kernels against the reference, every input differentiated."""
    skip_unless_usable(backend, "cuda", "group_norm_silu")
    x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout)
    weight, bias = torch.randn(shape[1], device="cuda", dtype=dtype), torch.randn(shape[1], device="cuda", dtype=dtype)
    temb, scale = (torch.randn(shape[0], shape[1], device="cuda", dtype=dtype) for _ in range(2))
    grad_y = torch.randn(shape, device="cuda", dtype=dtype)
    results = {}
    for name in ("reference", backend):
        leaves = _leaves(x, weight, bias, temb, scale)
        with genfast.use_backend(name):
            y = genfast.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], add=leaves[3], scale=leaves[4])
        results[name] = (y, *torch.autograd.grad(y, leaves, grad_y))
    assert results[backend][0].is_contiguous(memory_format=layout)
    assert_close(results[backend][0], results["reference"][0], dtype)
    for name, got, want in zip(("x", "weight", "bias", "add", "scale"), results[backend][1:],
                               results["reference"][1:]):
        _assert_grad(got, want, dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_sample_and_diffusion_loss_on_gpu(dtype):
    schedule = genfast.NoiseSchedule.linear().cuda()
    x0 = torch.randn(32, 3, 64, 64, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (32,), device="cuda")
    grad = torch.randn_like(x0)
    results = {}
    for backend in ("reference", "triton"):
        (leaf,) = _leaves(x0)
        x_t = _seeded(genfast.q_sample, backend, leaf, t, schedule)
        results[backend] = (x_t, *torch.autograd.grad(x_t, leaf, grad))
    assert_close(results["triton"][0], results["reference"][0], dtype, noise_scale=1.0)
    _assert_grad(results["triton"][1], results["reference"][1], dtype, "x0")
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).cuda().to(dtype)
    losses = {}
    for backend in ("reference", "triton"):
        (leaf,) = _leaves(x0)
        loss = _seeded(genfast.diffusion_loss, backend, lambda x_t, t: conv(x_t), leaf, schedule, t=t)
        losses[backend] = (loss, *torch.autograd.grad(loss, [leaf, *conv.parameters()]))
    # an fp32 loss of bf16 x_t and ε̂: where the two noises straddle a rounding boundary of x_t, x_t differs by one
    # ulp of its dtype, so the loss agrees to the tolerance of that dtype
    assert_close(losses["triton"][0], losses["reference"][0], dtype, noise_scale=4.0)
    for name, got, want in zip(("x0", "weight", "bias"), losses["triton"][1:], losses["reference"][1:]):
        assert_close_rel_norm(got, want, dtype, name)


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_sampler_steps_on_gpu(step):
    schedule = genfast.NoiseSchedule.linear().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    eps, grad = torch.randn_like(x), torch.randn_like(x)

    def run(e, x_t, generator):
        if step == "ddpm":
            return genfast.ddpm_step(e, 500, x_t, schedule, generator=generator)
        return genfast.ddim_step(e, 500, 480, x_t, schedule, eta=1.0, generator=generator)

    results = {}
    for backend in ("reference", "triton"):
        leaves = _leaves(eps, x)
        out = _seeded(run, backend, *leaves)
        results[backend] = (out, *torch.autograd.grad(out, leaves, grad))
    assert_close(results["triton"][0], results["reference"][0], noise_scale=1.0)
    for name, got, want in zip(("model_output", "x_t"), results["triton"][1:], results["reference"][1:]):
        _assert_grad(got, want, torch.float32, name)


def test_gradient_penalty_on_gpu():
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(),
                                 torch.nn.Linear(8 * 16 * 16, 1)).cuda()
    real = torch.randn(16, 3, 32, 32, device="cuda")
    fake = torch.randn(16, 3, 32, 32, device="cuda")
    alpha = torch.rand(16, device="cuda")
    # piecewise linear: ∇_x critic depends on the weights only (the biases get no or zero gradients)
    params = [critic[0].weight, critic[3].weight]
    results = {}
    for backend in ("reference", "triton"):
        with genfast.use_backend(backend):
            penalty = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
            results[backend] = (penalty, *torch.autograd.grad(penalty, params))
    assert_close(results["triton"][0], results["reference"][0])
    for got, want in zip(results["triton"][1:], results["reference"][1:]):
        _assert_grad(got, want, torch.float32)


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


@pytest.mark.parametrize("backend", _gpu_backends("group_norm_silu"))
def test_torch_compile_fullgraph_on_gpu(backend):
    """The compiled forward and the compiled backward (random upstream gradients) on ``backend`` against eager on
    the reference. The C++ backend has CUDA kernels for GroupNorm + SiLU only: its function has that op alone."""
    skip_unless_usable(backend, "cuda", "group_norm_silu")
    x = torch.randn(4, 64, 16, 16, device="cuda")
    mu = torch.randn(4, 32, device="cuda")
    grad_h, grad_z = torch.randn_like(x), torch.randn_like(mu)

    def f(x, mu):
        loss = (genfast.group_norm_silu(x, 32) * grad_h).sum()
        if backend == "triton":
            z, kl = genfast.reparameterize_kl(mu, mu, torch.ones_like(mu))
            loss = loss + (z * grad_z).sum() + kl.sum()
        else:
            loss = loss + (mu * grad_z).sum()
        return loss

    def loss_and_grads(fn, name):
        leaves = _leaves(x, mu)
        with genfast.use_backend(name):
            loss = fn(*leaves)
            return (loss, *torch.autograd.grad(loss, leaves))  # a compiled fn runs its compiled backward here

    compiled = loss_and_grads(torch.compile(f, fullgraph=True), backend)
    eager = loss_and_grads(f, "reference")
    torch.testing.assert_close(compiled[0], eager[0], rtol=TOLERANCES[torch.float32]["rtol"], atol=1e-3)
    for name, got, want in zip(("x", "mu"), compiled[1:], eager[1:]):
        _assert_grad(got, want, torch.float32, name)
