"""reparameterize / gaussian_kl / reparameterize_kl: every backend against the float64 composite (with the noise
the reference draws) and the kernels against the reference, forward and backward with random upstream gradients;
the ops on every layout and odd size; noise identity, autograd, opcheck, compile, validation."""
import pytest
import torch

import genfast
from backends import BACKENDS, skip_reason, skip_unless_usable
from genfast._backend import implementation
from genfast._rng import draw_seed
from genfast._shared import triton_interpret
from genfast._validation import batch_major
from genfast.composite import reparameterize as composite  # called on float64 copies
from genfast.ops.reparameterize import OP
from genfast.reference import reparameterize as ref
from genfast.reference.random import noise_like
from tolerances import NOISE_ATOL, TOLERANCES, assert_close, assert_grads_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 37), (4, 130), (2, 3, 5, 7)]
# the op-level cases: D = C·H·W not a multiple of 4 or 8; batch 1 with 1×1 spatial; D > the blocks of 1024 / 2048
OP_SHAPES = ((2, 3, 5, 7), (1, 3, 1, 1), (3, 5, 23, 29))
# high bits set in both words of key and offset, and a negative int64
SEED = torch.tensor([0x7EDC_BA98_7654_3210, -0x1234_5678_9ABC_DEF1], dtype=torch.int64)


def _inputs(shape, dtype, layout="contiguous"):
    mu = torch.randn(shape)
    logvar = torch.randn(shape) * 0.5
    if layout == "channels_last":
        mu, logvar = (t.to(memory_format=torch.channels_last) for t in (mu, logvar))
    elif layout == "strided":
        mu, logvar = (torch.randn(shape[0], shape[1] * 2, *shape[2:])[:, ::2] for _ in range(2))
    return mu.to(dtype).requires_grad_(), logvar.to(dtype).requires_grad_()


def _run(fn, mu, logvar, **kw):
    """(z, kl, dμ, dlogvar) of fn(mu, logvar) for random upstream gradients of z and kl."""
    z, kl = fn(mu, logvar, **kw)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.dtype)
    grad_kl = torch.randn(kl.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((z.float() * grad_z).sum() + (kl * grad_kl).sum(), (mu, logvar))
    return (z, kl, *grads)


def _noise_scale(logvar):
    """The largest σ = exp(½·logvar): the factor of the noise in z (and, with |dz|, in dlogvar)."""
    return logvar.detach().float().mul(0.5).exp().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("explicit_noise", [False, True])
def test_reparameterize_kl_matches_composite(backend, shape, dtype, explicit_noise):
    """(z, kl, dμ, dlogvar) against the float64 composite fed the reference's noise and, for the kernels, against
    the reference."""
    mu, logvar = _inputs(shape, dtype)
    noise = torch.randn(shape).to(dtype) if explicit_noise else None
    got = _run(genfast.reparameterize_kl, mu, logvar, noise=noise, generator=torch.Generator().manual_seed(7))
    eps = noise if explicit_noise else noise_like(mu.detach(), draw_seed(mu.device, torch.Generator().manual_seed(7)))
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    want = _run(lambda m, lv: composite.reparameterize_kl(m, lv, eps.double()), mu64, logvar64)
    results = [want]
    if backend != "reference":
        with genfast.use_backend("reference"):
            results.append(_run(genfast.reparameterize_kl, mu, logvar, noise=noise,
                                generator=torch.Generator().manual_seed(7)))
    for expected in results:
        assert_close(got[0], expected[0], dtype)
        assert_close(got[1], expected[1], torch.float32)
        for g, w, name in zip(got[2:], expected[2:], ("mu", "logvar")):
            assert g.dtype == dtype
            assert_grads_close(g, w, dtype, name)


LAYOUTS = ("contiguous", "channels_last", "non_contiguous")


def _sample(shape, dtype, layout, scale=1.0):
    """Random values of ``shape`` in ``layout`` (non_contiguous: every other column of a wider tensor)."""
    if layout == "non_contiguous":
        return (torch.randn(*shape[:-1], 2 * shape[-1]) * scale)[..., ::2].to(dtype)
    x = (torch.randn(shape) * scale).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _op_layout(kernel_backend, layout):
    """The C++ ops read any strides; the Triton kernels take batch-major tensors (what the public functions pass),
    so a non-contiguous layout is the C++ ops' case only."""
    if layout == "non_contiguous" and kernel_backend != "cpp":
        pytest.skip("the Triton kernels are given batch-major tensors only (the public functions copy others)")


@pytest.mark.parametrize("given_noise", [False, True], ids=["philox", "noise"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_reference(kernel_backend, dtype, layout, given_noise):
    """The kernels' reparameterize_kl and its backward, every (want_z, want_kl) and every absent upstream
    gradient, against the reference on the dense copy (which defines the noise stream of a non-dense input)."""
    _op_layout(kernel_backend, layout)
    kernels = implementation(kernel_backend, OP)
    # past the C++ block of 2048 only on the C++ ops in the interpreter (slow there; SHAPES cross Triton's 1024)
    for shape in OP_SHAPES[:2] if kernel_backend == "triton" and triton_interpret() else OP_SHAPES:
        mu, logvar = _sample(shape, dtype, layout), _sample(shape, dtype, layout, scale=0.5)
        noise = _sample(shape, dtype, layout) if given_noise else None
        sigma = _noise_scale(logvar)
        ref_args = (batch_major(mu), batch_major(logvar), None if noise is None else batch_major(noise), SEED)
        for want_z, want_kl in ((True, True), (True, False), (False, True)):
            z, kl = kernels.reparameterize_kl(mu, logvar, noise, SEED, want_z, want_kl)
            z_ref, kl_ref = ref.reparameterize_kl(*ref_args, want_z, want_kl)
            assert (z.dtype, z.shape, kl.dtype, kl.shape) == (z_ref.dtype, z_ref.shape, kl_ref.dtype, kl_ref.shape)
            if want_z:
                assert z.stride() == z_ref.stride()
                assert_close(z, z_ref, noise_scale=sigma)
            if want_kl:
                assert_close(kl, kl_ref)
        grad_z, grad_kl = _sample(shape, dtype, layout), torch.randn(shape[0])
        for dz, dkl in ((grad_z, grad_kl), (grad_z, None), (None, grad_kl)):
            got = kernels.reparameterize_kl_backward(dz, dkl, mu, logvar, noise, SEED)
            want = ref.reparameterize_kl_backward(dz, dkl, *ref_args)
            scale = 0.5 * sigma * (0 if dz is None else dz.float().abs().max().item())
            for g, g_ref in zip(got, want):
                assert g.dtype == g_ref.dtype
                assert_grads_close(g, g_ref, noise_scale=scale)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, layout):
    mu, logvar = _inputs((2, 3, 4, 5), torch.float32, layout)
    z, kl, dmu, dlogvar = _run(genfast.reparameterize_kl, mu, logvar, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)
    # the same values as the textbook formulas on the batch-major copies with the noise the reference drew
    eps = noise_like(batch_major(mu.detach()), draw_seed(mu.device, torch.Generator().manual_seed(3)))
    m, lv = mu.detach(), logvar.detach()
    sigma = torch.exp(0.5 * lv)
    assert_close(z, m + sigma * eps)
    assert_close(kl, 0.5 * (m**2 + lv.exp() - 1 - lv).flatten(1).sum(1))
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    grad_kl = torch.randn(kl.shape, generator=torch.Generator().manual_seed(2))[:, None, None, None]
    assert_grads_close(dmu, grad_z + grad_kl * m, msg="mu")
    assert_grads_close(dlogvar, grad_z * eps * 0.5 * sigma + grad_kl * 0.5 * (lv.exp() - 1), msg="logvar")


def test_same_seed_same_noise_on_every_backend():
    """Every backend but "torch" (torch.randn's stream, see test_composite) draws the same Philox noise."""
    mu = torch.zeros(3, 1000)
    logvar = torch.zeros(3, 1000)
    z = {}
    backends = [b for b in BACKENDS if skip_reason(b, op=OP) is None]
    assert "reference" in backends and len(backends) >= 2, backends  # and a kernel backend at least
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
    grad_z = torch.randn(z.shape)
    dmu, dlogvar = torch.autograd.grad(z, (mu, logvar), grad_z)
    sigma = torch.exp(0.5 * logvar.detach())
    eps = (z.detach() - mu.detach()) / sigma
    assert_grads_close(dmu, grad_z)
    assert_grads_close(dlogvar, grad_z * 0.5 * eps * sigma, torch.float32)


def test_gaussian_kl_and_reparameterize_agree_with_fused(backend):
    mu, logvar = _inputs((5, 33), torch.float32)
    z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(9))
    assert_close(genfast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(9)), z)
    assert_close(genfast.gaussian_kl(mu, logvar), kl)
    assert kl.dtype == torch.float32 and kl.shape == (5,)


def test_kl_closed_form(backend):
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
    assert mu.grad.shape == (0, 8) and logvar.grad.shape == (0, 8)


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


def test_torch_compile_fullgraph(backend):
    """The compiled loss and its compiled backward on ``backend`` against the eager reference."""
    mu, logvar = _inputs((4, 6), torch.float32)
    noise = torch.randn(4, 6)

    def loss_fn(mu, logvar, noise):
        z, kl = genfast.reparameterize_kl(mu, logvar, noise)
        return z.square().sum() + kl.sum() + genfast.gaussian_kl(mu, logvar).sum()

    def loss_and_grads(fn):
        loss = fn(mu, logvar, noise)
        return (loss, *torch.autograd.grad(loss, (mu, logvar)))  # the compiled backward graph runs here

    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    with genfast.use_backend("reference"):
        eager = loss_and_grads(loss_fn)
    assert_close(compiled[0], eager[0], torch.float32)
    for got, want in zip(compiled[1:], eager[1:]):
        assert_grads_close(got, want, torch.float32)


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


def test_kernel_backends_refuse_float64(kernel_backend):
    match = f"genfast backend '{kernel_backend}' cannot run reparameterize on torch.float64 tensors on cpu"
    with pytest.raises(TypeError, match=match):
        genfast.gaussian_kl(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))


def test_cpp_internal_op_checks_its_arguments():
    """The C++ op checks its arguments for a caller that reaches it directly."""
    skip_unless_usable("cpp", op=OP)
    cpp = implementation("cpp", OP)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="mu must be float32, bfloat16 or float16"):
        cpp.reparameterize_kl(x.double(), x.double(), None, SEED, True, True)
    with pytest.raises(RuntimeError, match=r"logvar must have shape \[2, 3\]"):
        cpp.reparameterize_kl(x, x[:, :2], None, SEED, True, True)
    with pytest.raises(RuntimeError, match="seed must be an integer tensor"):
        cpp.reparameterize_kl(x, x, None, torch.zeros(3, dtype=torch.int64), True, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_statistics_in_fp32(backend, dtype):
    """Large per-sample KL sums: accumulated in fp32, so bf16/fp16 inputs give the fp32 answer of their values."""
    mu, logvar = _inputs((2, 3000), dtype)
    kl = genfast.gaussian_kl(mu, logvar)
    m, lv = mu.detach().double(), logvar.detach().double()
    want = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(1)
    torch.testing.assert_close(kl.double(), want, **TOLERANCES[torch.float32])
