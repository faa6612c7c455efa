"""reparameterize / gaussian_kl / reparameterize_kl: kernels vs reference, noise identity, autograd, compile."""
import pytest
import torch

import genfast
from genfast._backend import BACKENDS, unavailable_reason
from genfast.reference.random import noise_like
from tolerances import NOISE_ATOL, TOLERANCES, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 37), (4, 130), (2, 3, 5, 7)]


def _inputs(shape, dtype, layout="contiguous"):
    mu = torch.randn(shape)
    logvar = torch.randn(shape) * 0.5
    if layout == "channels_last":
        mu, logvar = (t.to(memory_format=torch.channels_last) for t in (mu, logvar))
    elif layout == "strided":
        mu, logvar = (torch.randn(shape[0], shape[1] * 2, *shape[2:])[:, ::2] for _ in range(2))
    return mu.to(dtype).requires_grad_(), logvar.to(dtype).requires_grad_()


def _run(fn, mu, logvar, **kw):
    z, kl = fn(mu, logvar, **kw)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.dtype)
    grad_kl = torch.randn(kl.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((z.float() * grad_z).sum() + (kl * grad_kl).sum(), (mu, logvar))
    return (z, kl, *grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("explicit_noise", [False, True])
def test_reparameterize_kl_matches_reference(shape, dtype, explicit_noise):
    mu, logvar = _inputs(shape, dtype)
    noise = torch.randn(shape).to(dtype) if explicit_noise else None
    results = {}
    for backend in ("reference", "triton"):
        with genfast.use_backend(backend):
            gen = torch.Generator().manual_seed(7)
            results[backend] = _run(genfast.reparameterize_kl, mu, logvar, noise=noise, generator=gen)
    for got, want in zip(results["triton"], results["reference"]):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, layout):
    mu, logvar = _inputs((2, 3, 4, 5), torch.float32, layout)
    z, kl, dmu, dlogvar = _run(genfast.reparameterize_kl, mu, logvar, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)
    # the same values as the reference computed on contiguous copies with the noise it drew
    seed = torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    mu_b = genfast._validation.batch_major(mu.detach())
    eps = noise_like(mu_b, seed)
    assert_close(z, mu.detach() + torch.exp(0.5 * logvar.detach()) * eps)
    want_kl = 0.5 * (mu.detach() ** 2 + logvar.detach().exp() - 1 - logvar.detach()).flatten(1).sum(1)
    assert_close(kl, want_kl)


def test_same_seed_same_noise_on_every_backend():
    mu = torch.zeros(3, 1000)
    logvar = torch.zeros(3, 1000)
    z = {}
    backends = [b for b in BACKENDS if b != "auto" and unavailable_reason(b) is None]
    assert {"reference", "triton"} <= set(backends)
    for backend in backends:
        with genfast.use_backend(backend):
            torch.manual_seed(123)
            z[backend] = genfast.reparameterize(mu, logvar)
    for backend in backends:
        torch.testing.assert_close(z[backend], z["reference"], atol=NOISE_ATOL, rtol=0, msg=backend)
    # torch.manual_seed governs the default generator: reproducible, and a new call draws new noise
    with genfast.use_backend("reference"):
        torch.manual_seed(123)
        again = genfast.reparameterize(mu, logvar)
        assert torch.equal(again, z["reference"])
        assert not torch.allclose(genfast.reparameterize(mu, logvar), again)


def test_noise_is_regenerated_not_stored(backend):
    """The autograd graph keeps only μ, logvar and the 2-element seed: no tensor of noise."""
    mu, logvar = _inputs((4, 64), torch.float32)
    z = genfast.reparameterize(mu, logvar)
    saved = [t for t in z.grad_fn.saved_tensors if t is not None]
    assert sorted(t.numel() for t in saved) == [2, 256, 256]
    (dmu, dlogvar) = torch.autograd.grad(z.sum(), (mu, logvar))
    eps = (z.detach() - mu.detach()) / torch.exp(0.5 * logvar.detach())
    assert_close(dmu, torch.ones_like(mu))
    assert_close(dlogvar, 0.5 * eps * torch.exp(0.5 * logvar.detach()), torch.float32)


def test_gaussian_kl_and_reparameterize_agree_with_fused(backend):
    mu, logvar = _inputs((5, 33), torch.float32)
    z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(9))
    assert_close(genfast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(9)), z)
    assert_close(genfast.gaussian_kl(mu, logvar), kl)
    assert kl.dtype == torch.float32 and kl.shape == (5,)


def test_kl_closed_form():
    mu = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    want = torch.tensor([0.5, 0.5 * (4.0 + (torch.e - 2.0))])
    assert_close(genfast.gaussian_kl(mu, logvar), want)


def test_kl_over_many_chunks(backend):
    """A sample longer than one block: the KL sums the partials of several programs."""
    mu, logvar = _inputs((2, 2500), torch.float32)
    assert_close(genfast.gaussian_kl(mu, logvar),
                 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1).detach(), torch.float32)


def test_empty_batch(backend):
    mu, logvar = _inputs((0, 8), torch.float32)
    z, kl = genfast.reparameterize_kl(mu, logvar)
    assert z.shape == (0, 8) and kl.shape == (0,)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == (0, 8)


def test_gradcheck_float64():
    mu = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with genfast.use_backend("reference"):
        def f(mu, logvar):
            return genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(0))

        assert torch.autograd.gradcheck(f, (mu, logvar))
        assert torch.autograd.gradcheck(lambda m, lv: genfast.reparameterize(m, lv, torch.ones_like(m)),
                                        (mu, logvar))


@pytest.mark.parametrize("want", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("explicit_noise", [False, True])
def test_opcheck(backend, want, explicit_noise):
    mu, logvar = _inputs((3, 2, 3), torch.float32)
    noise = torch.randn(3, 2, 3) if explicit_noise else None
    seed = torch.tensor([5, 6], dtype=torch.int64)
    torch.library.opcheck(torch.ops.genfast.reparameterize_kl.default,
                          (mu.detach(), logvar.detach(), noise, seed, *want, backend))
    grad_z = torch.randn(3, 2, 3) if want[0] else None
    grad_kl = torch.randn(3) if want[1] else None
    torch.library.opcheck(torch.ops.genfast.reparameterize_kl_backward.default,
                          (grad_z, grad_kl, mu.detach(), logvar.detach(), noise, seed, backend))


def test_torch_compile_fullgraph():
    mu, logvar = _inputs((4, 6), torch.float32)
    noise = torch.randn(4, 6)

    def loss_fn(mu, logvar, noise):
        z, kl = genfast.reparameterize_kl(mu, logvar, noise)
        return z.square().sum() + kl.sum() + genfast.gaussian_kl(mu, logvar).sum()

    def loss_and_grads(fn):
        loss = fn(mu, logvar, noise)
        return (loss, *torch.autograd.grad(loss, (mu, logvar)))  # the compiled backward graph runs here

    with genfast.use_backend("reference"):
        eager = loss_and_grads(loss_fn)
        compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    for got, want in zip(compiled, eager):
        assert_close(got, want, torch.float32)


def test_torch_compile_fullgraph_in_kernel_noise():
    """With noise drawn inside the op, the compiled graph has no break and the noise is standard normal."""
    mu = torch.zeros(8, 512, requires_grad=True)
    logvar = torch.zeros(8, 512, requires_grad=True)
    with genfast.use_backend("reference"):
        z = torch.compile(lambda m, lv: genfast.reparameterize(m, lv), fullgraph=True)(mu, logvar)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(mu=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "mu"),
        (dict(mu=torch.zeros(())), ValueError, "mu"),
        (dict(logvar=torch.zeros(2, 4)), ValueError, "logvar"),
        (dict(logvar=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "logvar"),
        (dict(noise=torch.zeros(3, 3)), ValueError, "noise"),
        (dict(noise=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "noise"),
        (dict(generator=123), TypeError, "generator"),
    ],
)
def test_validation(kwargs, exc, match):
    args = dict(mu=torch.zeros(2, 3), logvar=torch.zeros(2, 3), noise=None, generator=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        genfast.reparameterize_kl(args["mu"], args["logvar"], args["noise"], generator=args["generator"])


def test_triton_backend_refuses_float64():
    with genfast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        genfast.gaussian_kl(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_statistics_in_fp32(backend, dtype):
    """Large per-sample KL sums: accumulated in fp32, so bf16/fp16 inputs give the fp32 answer of their values."""
    mu, logvar = _inputs((2, 3000), dtype)
    kl = genfast.gaussian_kl(mu, logvar)
    m, lv = mu.detach().double(), logvar.detach().double()
    want = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(1)
    torch.testing.assert_close(kl.double(), want, **TOLERANCES[torch.float32])
