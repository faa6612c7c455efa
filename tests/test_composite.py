"""The "torch" backend (genfast/composite: the plain PyTorch code a user would write, the benchmarks' baseline):
every public op against the reference where the noise is given, forward and backward with random upstream
gradients; its own noise (torch.randn / torch.rand from torch's generator, not genfast's Philox stream) by replay
and statistics; output shapes and dtypes as the reference's; torch.compile(fullgraph=True)."""
import pytest
import torch
from torch import nn

import genfast
from tolerances import assert_close, assert_close_rel_norm, assert_grads_close

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCHEDULE = genfast.NoiseSchedule.linear(num_steps=50, beta_start=1e-3, beta_end=0.2)


@pytest.fixture(autouse=True)
def _torch_backend():
    with genfast.use_backend("torch"):
        yield


def _both(fn, *tensors, grad=None):
    """fn(*tensors) and the gradients of a random upstream gradient, on "torch" and on "reference"."""
    results = []
    for name in ("torch", "reference"):
        leaves = [t.detach().requires_grad_() for t in tensors]
        with genfast.use_backend(name):
            out = fn(*leaves)
        upstream = grad if grad is not None else torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        results.append((out, torch.autograd.grad(out, leaves, upstream.to(out.dtype))))
    return results


def _assert_same(results, dtype):
    """Outputs and gradients of "torch" as the reference's: dtypes, shapes and strides equal; values at the
    tolerances of ``dtype``. In bf16/fp16 the composite rounds after every op where the reference rounds once
    from fp32, a few ulps apart elementwise: there the values are compared by relative norm only."""
    (out, grads), (out_ref, grads_ref) = results
    assert (out.dtype, out.shape, out.stride()) == (out_ref.dtype, out_ref.shape, out_ref.stride())
    check = assert_close_rel_norm if dtype in (torch.bfloat16, torch.float16) else assert_close
    check(out, out_ref, dtype)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        if check is assert_close:
            assert_grads_close(g, g_ref, dtype)
        else:
            assert_close_rel_norm(g, g_ref, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu(dtype, layout):
    """F.group_norm → scale-shift → F.silu against the reference, every input differentiated."""
    x = torch.randn(2, 6, 5, 7, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    params = [torch.randn(6, dtype=dtype) for _ in range(2)] + [torch.randn(2, 6, dtype=dtype) for _ in range(3)]

    def fn(x, weight, bias, add, scale, shift):
        return genfast.group_norm_silu(x, 3, weight, bias, add=add, scale=scale, shift=shift)

    _assert_same(_both(fn, x, *params), dtype)
    _assert_same(_both(lambda x: genfast.group_norm_silu(x, 2, activation=None), x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reparameterize_kl_with_noise(dtype):
    mu, logvar = torch.randn(3, 2, 4, 5).to(dtype), (0.5 * torch.randn(3, 2, 4, 5)).to(dtype)
    noise = torch.randn(3, 2, 4, 5)
    _assert_same(_both(lambda m, lv: genfast.reparameterize(m, lv, noise), mu, logvar), dtype)
    # kl is fp32, a sum of terms the composite computes in the inputs' dtype: compared at that dtype's tolerance
    _assert_same(_both(lambda m, lv: genfast.reparameterize_kl(m, lv, noise)[1], mu, logvar), dtype)
    _assert_same(_both(genfast.gaussian_kl, mu, logvar), dtype)
    z, kl = genfast.reparameterize_kl(mu, logvar, noise)
    assert (z.dtype, kl.dtype, kl.shape) == (dtype, torch.float32, (3,))


def test_reparameterize_draws_torch_randn():
    """Noise drawn by the composite is torch.randn from the generator (so not genfast's Philox stream)."""
    mu, logvar = torch.randn(4, 300), 0.5 * torch.randn(4, 300)
    z = genfast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    with genfast.use_backend("reference"):
        philox = genfast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(z, philox)
    torch.manual_seed(2)  # without a generator: torch's default one
    first = genfast.reparameterize(torch.zeros(64, 512), torch.zeros(64, 512))
    torch.manual_seed(2)
    assert torch.equal(genfast.reparameterize(torch.zeros(64, 512), torch.zeros(64, 512)), first)
    assert abs(first.mean().item()) < 0.01 and abs(first.std().item() - 1) < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_and_steps_with_noise(dtype):
    x, eps_hat, noise = (torch.randn(3, 2, 4, 5).to(dtype) for _ in range(3))
    t, t_prev = torch.tensor([0, 17, 49]), torch.tensor([-1, 7, 30])
    _assert_same(_both(lambda x: genfast.q_sample(x, t, SCHEDULE, noise), x), dtype)
    _assert_same(_both(lambda e, x: genfast.ddpm_step(e, t, x, SCHEDULE, noise), eps_hat, x), dtype)
    for eta in (0.0, 0.7):
        _assert_same(_both(lambda e, x: genfast.ddim_step(e, t, t_prev, x, SCHEDULE, eta, noise), eps_hat, x),
                     dtype)


def test_diffusion_noise_is_torch_randn():
    """q_sample, the DDPM / DDIM steps and the loss draw ε = torch.randn from the generator; the loss draws t
    first when it is not given."""
    x, eps_hat = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    t = torch.tensor([4, 17, 49])

    def eps(seed):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    assert_close(genfast.q_sample(x, t, SCHEDULE, generator=gen(1)), genfast.q_sample(x, t, SCHEDULE, eps(1)))
    assert_close(genfast.ddpm_step(eps_hat, t, x, SCHEDULE, generator=gen(2)),
                 genfast.ddpm_step(eps_hat, t, x, SCHEDULE, eps(2)))
    assert_close(genfast.ddim_step(eps_hat, t, t - 3, x, SCHEDULE, 0.5, generator=gen(3)),
                 genfast.ddim_step(eps_hat, t, t - 3, x, SCHEDULE, 0.5, eps(3)))
    weight = torch.tensor(0.7, requires_grad=True)

    def model(x_t, t):
        return x_t * weight

    loss = genfast.diffusion_loss(model, x, SCHEDULE, generator=gen(4))
    replay = gen(4)
    t_drawn = torch.randint(0, SCHEDULE.num_steps, (3,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    want = (model(genfast.q_sample(x, t_drawn, SCHEDULE, noise), t_drawn) - noise).square().mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, want)
    assert_grads_close(torch.autograd.grad(loss, weight)[0], torch.autograd.grad(want, weight)[0])


class _Critic(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1).to(dtype)
        self.fc = nn.Linear(3 * 4 * 5, 1).to(dtype)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1)).squeeze(1)


def test_gradient_penalty_against_the_reference():
    """The autograd penalty and its critic parameter gradients; α from the generator is torch.rand, which the
    reference draws as well (the same α)."""
    critic = _Critic(torch.float32)
    real, fake = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    params = list(critic.parameters())
    results = []
    for name in ("torch", "reference"):
        with genfast.use_backend(name):
            penalty = genfast.gradient_penalty(critic, real, fake, weight=4.0,
                                               generator=torch.Generator().manual_seed(11))
        results.append((penalty, torch.autograd.grad(penalty, params[:3])))  # fc's bias does not reach it
    (penalty, grads), (penalty_ref, grads_ref) = results
    assert penalty.dtype == penalty_ref.dtype == torch.float32 and penalty.dim() == 0
    assert_close(penalty, penalty_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_grads_close(g, g_ref)
    with torch.no_grad():  # the value without a graph
        assert_close(genfast.gradient_penalty(critic, real, fake, weight=4.0,
                                              generator=torch.Generator().manual_seed(11)), penalty_ref)


def test_gradient_penalty_of_half_inputs_is_float32():
    """The norms and the penalty are taken in fp32 for half inputs, as gradient_penalty documents."""
    critic = _Critic(torch.bfloat16)
    real, fake = torch.randn(3, 2, 4, 5, dtype=torch.bfloat16), torch.randn(3, 2, 4, 5, dtype=torch.bfloat16)
    with genfast.use_backend("reference"):
        assert genfast.gradient_penalty(critic, real, fake).dtype == torch.float32
    assert genfast.gradient_penalty(critic, real, fake).dtype == torch.float32


def test_float64_and_empty_inputs():
    """The composites run float64 (as the reference does) and empty batches (the loss refuses them, the penalty is
    0)."""
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    _assert_same(_both(lambda x: genfast.group_norm_silu(x, 2), x), torch.float64)
    _assert_same(_both(lambda m, lv: genfast.reparameterize_kl(m, lv, x)[0], x, x * 0.3), torch.float64)
    empty = torch.zeros(0, 3)
    with pytest.raises(ValueError, match="^x0 must have at least one element"):
        genfast.diffusion_loss(lambda x_t, t: x_t, empty, SCHEDULE)
    assert genfast.gradient_penalty(lambda v: v.sum(1), empty, empty).item() == 0
    assert genfast.reparameterize_kl(empty, empty)[1].shape == (0,)


def test_torch_compile_fullgraph():
    """The composites of every op in one compiled function, forward and its compiled backward, against eager."""
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    mu = torch.randn(2, 4, 3, 5, requires_grad=True)
    noise = torch.randn(2, 4, 3, 5)
    t = torch.tensor([3, 30])
    upstream = torch.randn(2, 4, 3, 5)

    def fn(x, mu):
        h = genfast.group_norm_silu(x, 2)
        z, kl = genfast.reparameterize_kl(mu, 0.1 * h, noise)
        x_t = genfast.q_sample(z, t, SCHEDULE, noise)
        out = genfast.ddim_step(h, t, t - 10, x_t, SCHEDULE, 0.5, noise)
        return (out.detach(), kl.detach(), *torch.autograd.grad((out * upstream).sum() + kl.sum(), (x, mu)))

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(fn, fullgraph=True)(x, mu)
    eager = fn(x, mu)
    for got, want in zip(compiled[:2], eager[:2]):
        assert_close(got, want)
    for got, want in zip(compiled[2:], eager[2:]):
        assert_grads_close(got, want)
