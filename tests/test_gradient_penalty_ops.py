"""gradient_penalty's two ops (interpolate: x̂ = α·real + (1 − α)·fake; the norm penalty weight·mean_b(‖g_b‖ − 1)²):
every kernel backend against the reference and the reference against the textbook formulas, forward and backward
(random upstream gradients), every layout, odd size and (want_real, want_fake); autograd, opcheck, gradcheck,
torch.compile and the C++ op's argument errors. The public function is in test_gradient_penalty.py."""
import pytest
import torch

from backends import skip_unless_usable
from genfast._backend import implementation
from genfast.ops.gradient_penalty import OP
from genfast.reference import gradient_penalty as ref
from tolerances import TOLERANCES, assert_close, assert_grads_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1x1 spatial, batch 1, non-powers of two, a sample longer than one block (2 chunks), 2-d (B, D) inputs
SHAPES = [(1, 1, 1, 1), (3, 2, 1, 1), (2, 3, 5, 7), (2, 3, 20, 20), (3, 37)]
LAYOUTS = ["contiguous", "channels_last"]

interpolate_op = torch.ops.genfast.interpolate.default
interpolate_backward_op = torch.ops.genfast.interpolate_backward.default
penalty_op = torch.ops.genfast.gradient_norm_penalty.default
penalty_backward_op = torch.ops.genfast.gradient_norm_penalty_backward.default


def _randn(shape, dtype=torch.float32, layout="contiguous", scale=1.0):
    x = torch.randn(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * scale
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other channel of a wider tensor: not batch-major dense
        x = torch.randn(shape[0], shape[1] * 2, *shape[2:], dtype=x.dtype)[:, ::2] * scale
    return x.to(dtype)


def _per_sample(v, like):
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _layouts_for(shape):
    return LAYOUTS if len(shape) == 4 else LAYOUTS[:1]


OP_CASES = [(shape, layout) for shape in SHAPES for layout in _layouts_for(shape)]


# ---- the interpolate op --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", OP_CASES)
def test_interpolate_op_matches_reference(kernel_backend, shape, layout, dtype):
    real, fake, grad = (_randn(shape, dtype, layout) for _ in range(3))
    alpha = torch.rand(shape[0])
    backends = ("reference", kernel_backend)
    out = {b: interpolate_op(real, fake, alpha, b) for b in backends}
    bwd = {b: interpolate_backward_op(grad, alpha, True, True, b) for b in backends}
    assert_close(out[kernel_backend], out["reference"], dtype)
    for got, want in zip(bwd[kernel_backend], bwd["reference"]):
        assert_grads_close(got, want, dtype)
    assert out[kernel_backend].stride() == real.stride() and bwd[kernel_backend][0].stride() == grad.stride()
    # the reference is the textbook x̂ = α·real + (1 − α)·fake, d real = α·g, d fake = (1 − α)·g
    a = _per_sample(alpha.double(), real)
    assert_close(out["reference"], a * real.double() + (1 - a) * fake.double(), dtype)
    assert_grads_close(bwd["reference"][0], a * grad.double(), dtype)
    assert_grads_close(bwd["reference"][1], (1 - a) * grad.double(), dtype)


@pytest.mark.parametrize("want_real, want_fake", [(True, False), (False, True), (True, True)])
def test_interpolate_autograd(backend, want_real, want_fake):
    """Through autograd, only the wanted gradients are computed, the others are None."""
    real = _randn((3, 2, 3, 4)).requires_grad_(want_real)
    fake = _randn((3, 2, 3, 4)).requires_grad_(want_fake)
    alpha = torch.rand(3)
    out = interpolate_op(real, fake, alpha, backend)
    out.backward(grad := torch.randn_like(out))
    a = _per_sample(alpha, real)
    assert (real.grad is not None) == want_real and (fake.grad is not None) == want_fake
    if want_real:
        assert_grads_close(real.grad, a * grad)
    if want_fake:
        assert_grads_close(fake.grad, (1 - a) * grad)


# ---- the penalty op ------------------------------------------------------------------------------------------

def _textbook_penalty_of_grad(grad, weight):
    """weight·mean_b(‖g_b‖ − 1)² with torch.linalg.vector_norm, in fp64: value and dp/dg."""
    g = grad.detach().double().requires_grad_()
    norms = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
    p = weight * (norms - 1).square().mean()
    return p, torch.autograd.grad(p, g)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", OP_CASES)
def test_penalty_op_matches_reference(kernel_backend, shape, layout, dtype):
    grad = _randn(shape, dtype, layout, scale=0.3)
    if shape[0] > 1:
        grad[-1] = 0  # a sample whose gradient is zero: its norm is 0 and it gets a zero (not NaN) gradient
    weight = 7.5
    backends = ("reference", kernel_backend)
    fwd = {b: penalty_op(grad, weight, b) for b in backends}
    dp = torch.tensor(1.7)
    bwd = {b: penalty_backward_op(dp, grad, fwd[b][1], weight, b) for b in backends}
    for got, want in zip(fwd[kernel_backend], fwd["reference"]):
        assert got.dtype == torch.float32
        assert_close(got, want, torch.float32)  # fp32 sums of the same values, in another order
    assert_grads_close(bwd[kernel_backend], bwd["reference"], dtype)
    assert bwd[kernel_backend].stride() == grad.stride() and bwd[kernel_backend].dtype == dtype
    # the reference is the textbook formula, its gradient included (vector_norm's 0 at a zero norm)
    p, dg = _textbook_penalty_of_grad(grad, weight)
    assert_close(fwd["reference"][0], p, torch.float32)
    assert_grads_close(bwd["reference"], 1.7 * dg, dtype)
    if shape[0] > 1:
        assert torch.equal(bwd[kernel_backend][-1], torch.zeros_like(grad[-1]))


def test_penalty_autograd_and_norms(backend):
    grad = _randn((4, 3, 5, 5), scale=0.2)
    grad[1] = 0
    grad.requires_grad_()
    p, norms = penalty_op(grad, 10.0, backend)
    assert not norms.requires_grad  # the saved norms are an auxiliary output
    assert_close(norms, grad.detach().flatten(1).norm(dim=1))
    p.backward()
    # the zero sample's gradient is 0 (not NaN), as vector_norm's in the textbook formula
    assert_grads_close(grad.grad, _textbook_penalty_of_grad(grad, 10.0)[1], torch.float32)
    assert torch.equal(grad.grad[1], torch.zeros_like(grad.grad[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_statistics_in_fp32(backend, dtype):
    """bf16/fp16 gradients: norms and penalty are fp32 sums of their values, not half-precision sums."""
    grad = _randn((2, 3000), dtype, scale=0.05)
    p, norms = penalty_op(grad, 10.0, backend)
    want_p, _ = _textbook_penalty_of_grad(grad, 10.0)
    torch.testing.assert_close(norms.double(), grad.double().norm(dim=1), **TOLERANCES[torch.float32])
    torch.testing.assert_close(p.double(), want_p, **TOLERANCES[torch.float32])


def test_penalty_sample_without_elements(backend):
    """Samples of 0 elements have norm 0: the penalty is weight·1 and there is no NaN; an empty batch has
    penalty 0 (not the NaN of a mean of nothing)."""
    p, norms = penalty_op(torch.zeros(3, 0), 2.0, backend)
    assert_close(p, torch.tensor(2.0))
    assert torch.equal(norms, torch.zeros(3))
    p, norms = penalty_op(torch.zeros(0, 3), 10.0, backend)
    assert p.item() == 0 and norms.shape == (0,)


OP_SHAPES = ((2, 3, 5, 7), (1, 3, 1, 1), (3, 5, 23, 29))  # D not a multiple of 4 or 8; 1×1; D > a block of 2048


def _op_sample(shape, dtype, layout):
    """``_randn`` in ``layout``; non_contiguous: every other column of a wider tensor (C++ ops only)."""
    if layout == "non_contiguous":
        return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2].to(dtype)
    return _randn(shape, dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_on_every_layout_and_want(kernel_backend, dtype, layout):
    """The kernels' four ops called directly, every (want_real, want_fake), odd sizes and a zero sample, against
    the reference. The C++ ops read any strides; the Triton ones are given batch-major tensors only."""
    if layout == "non_contiguous" and kernel_backend != "cpp":
        pytest.skip("the Triton kernels are given batch-major tensors only (the public function copies others)")
    kernels = implementation(kernel_backend, OP)
    for shape in OP_SHAPES:
        real, fake, grad = (_op_sample(shape, dtype, layout) for _ in range(3))
        alpha = torch.rand(shape[0])
        assert_close(kernels.interpolate(real, fake, alpha), ref.interpolate(real, fake, alpha))
        for want_real, want_fake in ((True, True), (True, False), (False, True), (False, False)):
            got = kernels.interpolate_backward(grad, alpha, want_real, want_fake)
            want = ref.interpolate_backward(grad, alpha, want_real, want_fake)
            for g, g_ref in zip(got, want):
                assert (g.shape, g.dtype) == (g_ref.shape, g_ref.dtype)
                assert_grads_close(g, g_ref, allow_zero=g.numel() == 0)
        grad[0] = 0  # ‖g_0‖ = 0: its gradient is 0
        penalty, norms = kernels.gradient_norm_penalty(grad, 10.0)
        penalty_ref, norms_ref = ref.gradient_norm_penalty(grad, 10.0)
        assert (penalty.dtype, penalty.dim(), norms.dtype) == (torch.float32, 0, torch.float32)
        assert_close(norms, norms_ref)
        assert_close(penalty, penalty_ref)
        got = kernels.gradient_norm_penalty_backward(torch.tensor(0.3), grad, norms, 10.0)
        assert_grads_close(got, ref.gradient_norm_penalty_backward(torch.tensor(0.3), grad, norms_ref, 10.0),
                           allow_zero=shape[0] == 1)  # a batch of one zero sample: all zeros
        assert got[0].abs().max() == 0


# ---- opcheck and gradcheck ------------------------------------------------------------------------------------

@pytest.mark.parametrize("want", [(True, False), (False, True), (True, True)])
def test_opcheck_interpolate(backend, want):
    real = _randn((3, 2, 3)).requires_grad_(want[0])
    fake = _randn((3, 2, 3)).requires_grad_(want[1])
    alpha = torch.rand(3)
    torch.library.opcheck(interpolate_op, (real, fake, alpha, backend))
    torch.library.opcheck(interpolate_backward_op, (_randn((3, 2, 3)), alpha, *want, backend))


def test_opcheck_penalty(backend):
    grad = _randn((3, 2, 3), scale=0.4)
    grad[0] = 0
    grad.requires_grad_()
    torch.library.opcheck(penalty_op, (grad, 10.0, backend))
    norms = grad.detach().flatten(1).norm(dim=1)
    torch.library.opcheck(penalty_backward_op, (torch.tensor(0.5), grad.detach(), norms, 10.0, backend))


def test_gradcheck_ops_float64():
    real = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r, f: interpolate_op(r, f, alpha, "reference"), (real, fake))
    grad = torch.randn(3, 2, 4, dtype=torch.float64) * 0.4
    grad[1] = 0  # at a zero gradient the penalty's central differences are 0, as is the backward
    assert torch.autograd.gradcheck(lambda g: penalty_op(g, 3.0, "reference")[0], (grad.requires_grad_(),))


# ---- torch.compile --------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_ops(backend):
    """The two ops compiled on ``backend``, forward and the compiled backward, against the eager reference."""
    real = _randn((3, 2, 4, 4)).requires_grad_()
    fake = _randn((3, 2, 4, 4)).requires_grad_()
    scale = _randn((3, 2, 4, 4), scale=0.3).requires_grad_()
    alpha = torch.rand(3)

    def loss_fn(real, fake, scale, name=backend):
        x_hat = interpolate_op(real, fake, alpha, name)
        return penalty_op(scale * x_hat, 5.0, name)[0]

    def loss_and_grads(fn):
        loss = fn(real, fake, scale)
        return (loss, *torch.autograd.grad(loss, (real, fake, scale)))  # the compiled backward graph runs here

    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    eager = loss_and_grads(lambda *args: loss_fn(*args, name="reference"))
    assert_close(compiled[0], eager[0])
    for got, want in zip(compiled[1:], eager[1:]):
        assert_grads_close(got, want)


def test_cpp_internal_op_checks_its_arguments():
    skip_unless_usable("cpp", op=OP)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"alpha must be a floating CPU tensor of 2 elements"):
        implementation("cpp", OP).interpolate(x, x, torch.rand(3))
