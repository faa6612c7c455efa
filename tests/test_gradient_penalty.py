"""gradient_penalty (WGAN-GP): the interpolate and penalty ops (kernels vs reference vs the textbook formulas),
critic parameter gradients vs the textbook penalty, reproducible α, layouts, autograd, compile, validation."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import genfast
from genfast.reference import gradient_penalty as ref
from tolerances import TOLERANCES, assert_close

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
def test_interpolate_op_matches_reference(shape, layout, dtype):
    real, fake, grad = (_randn(shape, dtype, layout) for _ in range(3))
    alpha = torch.rand(shape[0])
    out = {b: interpolate_op(real, fake, alpha, b) for b in ("reference", "triton")}
    bwd = {b: interpolate_backward_op(grad, alpha, True, True, b) for b in ("reference", "triton")}
    assert_close(out["triton"], out["reference"], dtype)
    for got, want in zip(bwd["triton"], bwd["reference"]):
        assert_close(got, want, dtype)
    assert out["triton"].stride() == real.stride() and bwd["triton"][0].stride() == grad.stride()
    # the reference is the textbook x̂ = α·real + (1 − α)·fake, d real = α·g, d fake = (1 − α)·g
    a = _per_sample(alpha.double(), real)
    assert_close(out["reference"], a * real.double() + (1 - a) * fake.double(), dtype)
    assert_close(bwd["reference"][0], a * grad.double(), dtype)
    assert_close(bwd["reference"][1], (1 - a) * grad.double(), dtype)


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
        assert_close(real.grad, a * grad)
    if want_fake:
        assert_close(fake.grad, (1 - a) * grad)


# ---- the penalty op ------------------------------------------------------------------------------------------

def _textbook_penalty_of_grad(grad, weight):
    """weight·mean_b(‖g_b‖ − 1)² with torch.linalg.vector_norm, in fp64: value and dp/dg."""
    g = grad.detach().double().requires_grad_()
    norms = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
    p = weight * (norms - 1).square().mean()
    return p, torch.autograd.grad(p, g)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", OP_CASES)
def test_penalty_op_matches_reference(shape, layout, dtype):
    grad = _randn(shape, dtype, layout, scale=0.3)
    if shape[0] > 1:
        grad[-1] = 0  # a sample whose gradient is zero: its norm is 0 and it gets a zero (not NaN) gradient
    weight = 7.5
    fwd = {b: penalty_op(grad, weight, b) for b in ("reference", "triton")}
    dp = torch.tensor(1.7)
    bwd = {b: penalty_backward_op(dp, grad, fwd[b][1], weight, b) for b in ("reference", "triton")}
    for got, want in zip(fwd["triton"], fwd["reference"]):
        assert got.dtype == torch.float32
        assert_close(got, want, torch.float32)  # fp32 sums of the same values, in another order
    assert_close(bwd["triton"], bwd["reference"], dtype)
    assert bwd["triton"].stride() == grad.stride() and bwd["triton"].dtype == dtype
    # the reference is the textbook formula, its gradient included (vector_norm's 0 at a zero norm)
    p, dg = _textbook_penalty_of_grad(grad, weight)
    assert_close(fwd["reference"][0], p, torch.float32)
    assert_close(bwd["reference"], 1.7 * dg, dtype)
    if shape[0] > 1:
        assert torch.equal(bwd["triton"][-1], torch.zeros_like(grad[-1]))


def test_penalty_autograd_and_norms(backend):
    grad = _randn((4, 3, 5, 5), scale=0.2)
    grad[1] = 0
    grad.requires_grad_()
    p, norms = penalty_op(grad, 10.0, backend)
    assert not norms.requires_grad  # the saved norms are an auxiliary output
    assert_close(norms, grad.detach().flatten(1).norm(dim=1))
    p.backward()
    assert_close(grad.grad, _textbook_penalty_of_grad(grad, 10.0)[1], torch.float32)
    assert torch.isfinite(grad.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_statistics_in_fp32(backend, dtype):
    """bf16/fp16 gradients: norms and penalty are fp32 sums of their values, not half-precision sums."""
    grad = _randn((2, 3000), dtype, scale=0.05)
    p, norms = penalty_op(grad, 10.0, backend)
    want_p, _ = _textbook_penalty_of_grad(grad, 10.0)
    torch.testing.assert_close(norms.double(), grad.double().norm(dim=1), **TOLERANCES[torch.float32])
    torch.testing.assert_close(p.double(), want_p, **TOLERANCES[torch.float32])


def test_penalty_sample_without_elements(backend):
    """Samples of 0 elements have norm 0: the penalty is weight·1 and there is no NaN."""
    p, norms = penalty_op(torch.zeros(3, 0), 2.0, backend)
    assert_close(p, torch.tensor(2.0))
    assert torch.equal(norms, torch.zeros(3))


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


# ---- the public gradient_penalty -----------------------------------------------------------------------------

class ConvCritic(nn.Module):
    """conv → SiLU → conv → spatial mean, output (B,); remembers the x̂ it was given."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach()
        return self.conv2(F.silu(self.conv1(x))).flatten(1).mean(1)


class MLPCritic(nn.Module):
    """Linear → tanh → Linear, output (B, 1); remembers the x̂ it was given."""

    def __init__(self, features):
        super().__init__()
        self.fc1 = nn.Linear(features, 16)
        self.fc2 = nn.Linear(16, 1)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach()
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _critic(kind, shape, dtype):
    net = ConvCritic(shape[1]) if kind == "conv" else MLPCritic(shape[1] * shape[2] * shape[3])
    return net.to(dtype)


def _textbook_penalty(critic, real, fake, alpha, weight=10.0):
    """The WGAN-GP formula as usually written: (‖∇_x̂ critic(x̂)‖ − 1)² averaged, times weight."""
    a = _per_sample(alpha.to(real.dtype), real)
    x_hat = a * real + (1 - a) * fake
    if not x_hat.requires_grad:
        x_hat.requires_grad_()
    out = critic(x_hat)
    (g,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
    return weight * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()


def _backward_grads(penalty, tensors):
    """penalty.backward(), then the .grad of each tensor (zeros for one the penalty does not reach)."""
    for t in tensors:
        t.grad = None
    penalty.backward()
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


# the Triton kernels take fp32/bf16/fp16: float64 runs on the reference only
@pytest.mark.parametrize("backend_name, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                                 ("reference", torch.float64)])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_critic_parameter_gradients(backend_name, kind, dtype):
    shape = (3, 2, 5, 6)
    critic = _critic(kind, shape, dtype)
    params = list(critic.parameters())
    real, fake = _randn(shape, dtype), _randn(shape, dtype)
    alpha = torch.rand(shape[0], dtype=dtype)
    with genfast.use_backend(backend_name):
        penalty = genfast.gradient_penalty(critic, real, fake, weight=4.0, alpha=alpha)
    assert penalty.dim() == 0 and penalty.dtype == dtype and penalty.requires_grad
    got = _backward_grads(penalty, params)
    want_penalty = _textbook_penalty(critic, real, fake, alpha, weight=4.0)
    want = _backward_grads(want_penalty, params)
    assert_close(penalty, want_penalty.detach(), dtype)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    assert any(g.abs().sum() > 0 for g in got)


def test_gradients_reach_real_and_fake(backend):
    """A fake that is not detached (and a real that requires grad) get the textbook gradients too: through the
    interpolate op's backward and through g's second-order graph."""
    shape = (2, 3, 4, 4)
    critic = _critic("conv", shape, torch.float32)
    real = _randn(shape).requires_grad_()
    fake = _randn(shape).requires_grad_()
    alpha = torch.rand(2)
    tensors = [real, fake, *critic.parameters()]
    got = _backward_grads(genfast.gradient_penalty(critic, real, fake, alpha=alpha), tensors)
    want = _backward_grads(_textbook_penalty(critic, real, fake, alpha), tensors)
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_penalty_in_fp32(backend, dtype):
    """bf16/fp16 inputs and critic: the penalty is fp32 and equals the fp32 formula on the critic's half gradient."""
    shape = (3, 2, 4, 5)
    critic = _critic("mlp", shape, dtype)
    real, fake = _randn(shape, dtype), _randn(shape, dtype)
    alpha = torch.rand(3)
    penalty = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
    assert penalty.dtype == torch.float32
    assert_close(critic.seen, ref.interpolate(real, fake, alpha), dtype)
    x_hat = critic.seen.clone().requires_grad_()
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
    torch.testing.assert_close(penalty.double(), _textbook_penalty_of_grad(g, 10.0)[0], **TOLERANCES[torch.float32])
    penalty.backward()
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, layout):
    shape = (2, 3, 4, 5)
    critic = _critic("conv", shape, torch.float32)
    params = list(critic.parameters())
    real = _randn(shape, layout=layout)
    fake = _randn(shape)  # contiguous: copied to real's layout
    alpha = torch.rand(2)
    got = _backward_grads(genfast.gradient_penalty(critic, real, fake, alpha=alpha), params)
    if layout == "channels_last":
        assert critic.seen.is_contiguous(memory_format=torch.channels_last)
    want = _backward_grads(_textbook_penalty(critic, real.contiguous(), fake, alpha), params)
    for g, w in zip(got, want):
        assert_close(g, w)


def test_mixed_dtypes_are_promoted(backend):
    shape = (2, 4, 3, 3)
    critic = _critic("conv", shape, torch.float32)
    real, fake = _randn(shape), _randn(shape, torch.bfloat16)
    alpha = torch.rand(2)
    penalty = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
    assert critic.seen.dtype == torch.float32
    assert_close(penalty, _textbook_penalty(critic, real, fake.float(), alpha).detach())


def test_alpha_from_seeded_generator(backend):
    shape = (4, 2, 3, 3)
    critic = _critic("conv", shape, torch.float32)
    real, fake = _randn(shape), _randn(shape)

    def penalty(seed):
        return genfast.gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(penalty(11), penalty(11))
    assert not torch.equal(penalty(11), penalty(12))
    # α is torch.rand(B) from that generator
    alpha = torch.rand(4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(penalty(11), genfast.gradient_penalty(critic, real, fake, alpha=alpha))
    # without a generator, torch's default one (torch.manual_seed) draws α
    torch.manual_seed(5)
    first = genfast.gradient_penalty(critic, real, fake)
    torch.manual_seed(5)
    assert torch.equal(genfast.gradient_penalty(critic, real, fake), first)


def test_empty_batch(backend):
    critic = _critic("mlp", (0, 2, 2, 2), torch.float32)
    real, fake = torch.randn(0, 2, 2, 2), torch.randn(0, 2, 2, 2)
    penalty = genfast.gradient_penalty(critic, real, fake)
    assert penalty.requires_grad and penalty.item() == 0.0
    grads = _backward_grads(penalty, list(critic.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_batch_of_one_critic_output_shapes(backend):
    """A batch of one, and critic outputs of shape (B,), (B, 1) and (B, 2, 2): the gradient of their sum."""
    shape = (1, 2, 3, 3)
    conv = _critic("conv", shape, torch.float32)
    real, fake = _randn(shape), _randn(shape)
    alpha = torch.rand(1)
    for critic in (conv, lambda x: conv(x)[:, None], lambda x: conv.conv1(x)[:, :2, :2, 0].tanh()):
        assert_close(genfast.gradient_penalty(critic, real, fake, alpha=alpha),
                     _textbook_penalty(critic, real, fake, alpha).detach())


def test_no_grad_gives_the_value(backend):
    shape = (3, 2, 3, 3)
    critic = _critic("conv", shape, torch.float32)
    real, fake = _randn(shape), _randn(shape)
    alpha = torch.rand(3)
    with torch.no_grad():
        value = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
    assert not value.requires_grad
    assert_close(value, genfast.gradient_penalty(critic, real, fake, alpha=alpha).detach())


def test_gradcheck_parameters_float64():
    """The whole penalty as a function of the critic's parameters: second-order path included."""
    shape = (3, 2, 2, 2)
    critic = _critic("mlp", shape, torch.float64)
    names = [name for name, _ in critic.named_parameters()]
    real, fake = _randn(shape, torch.float64), _randn(shape, torch.float64)
    alpha = torch.rand(3, dtype=torch.float64)

    def penalty(*params):
        def functional_critic(x):
            return torch.func.functional_call(critic, dict(zip(names, params)), (x,))

        return genfast.gradient_penalty(functional_critic, real, fake, alpha=alpha)

    params = tuple(p.detach().clone().requires_grad_() for p in critic.parameters())
    with genfast.use_backend("reference"):
        assert torch.autograd.gradcheck(penalty, params[:3])  # fc2's bias does not reach the penalty


# ---- torch.compile --------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_ops():
    real = _randn((3, 2, 4, 4)).requires_grad_()
    fake = _randn((3, 2, 4, 4)).requires_grad_()
    scale = _randn((3, 2, 4, 4), scale=0.3).requires_grad_()
    alpha = torch.rand(3)

    def loss_fn(real, fake, scale):
        x_hat = interpolate_op(real, fake, alpha, "reference")
        return penalty_op(scale * x_hat, 5.0, "reference")[0]

    def loss_and_grads(fn):
        loss = fn(real, fake, scale)
        return (loss, *torch.autograd.grad(loss, (real, fake, scale)))  # the compiled backward graph runs here

    eager = loss_and_grads(loss_fn)
    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    for got, want in zip(compiled, eager):
        assert_close(got, want)


def test_torch_compile_fullgraph_gradient_penalty():
    """The whole penalty, its backward to the critic's parameters inside the compiled function. Dynamo traces
    torch.autograd.grad only with ``trace_autograd_ops`` on (off by default: without it, a graph break)."""
    shape = (3, 2, 4, 4)
    critic = _critic("conv", shape, torch.float32)
    params = list(critic.parameters())[:3]  # conv2's bias does not reach the penalty
    real, fake = _randn(shape), _randn(shape)
    alpha = torch.rand(3)

    def step(real, fake, alpha):
        penalty = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
        return (penalty.detach(), *torch.autograd.grad(penalty, params))

    with genfast.use_backend("reference"), torch._dynamo.config.patch(trace_autograd_ops=True):
        eager = step(real, fake, alpha)
        compiled = torch.compile(step, fullgraph=True)(real, fake, alpha)
    for got, want in zip(compiled, eager):
        assert_close(got, want)


# ---- validation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(critic="not a critic"), TypeError, "critic"),
        (dict(critic=lambda x: 3.0), TypeError, "critic"),
        (dict(real=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "real"),
        (dict(real=torch.zeros(())), ValueError, "real"),
        (dict(real=[[0.0] * 3] * 2), TypeError, "real"),
        (dict(fake=torch.zeros(2, 4)), ValueError, "fake"),
        (dict(fake=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "fake"),
        (dict(fake=torch.zeros(2, 3, device="meta")), ValueError, "fake"),
        (dict(alpha=torch.zeros(3)), ValueError, "alpha"),
        (dict(alpha=torch.zeros(2, 1)), ValueError, "alpha"),
        (dict(alpha=torch.zeros(2, dtype=torch.int64)), TypeError, "alpha"),
        (dict(alpha=torch.zeros(2, requires_grad=True)), ValueError, "alpha"),
        (dict(weight=-1.0), ValueError, "weight"),
        (dict(weight=float("nan")), ValueError, "weight"),
        (dict(weight="10"), TypeError, "weight"),
        (dict(weight=True), TypeError, "weight"),
        (dict(generator=123), TypeError, "generator"),
    ],
)
def test_validation(kwargs, exc, match):
    linear = nn.Linear(3, 1)
    args = dict(critic=linear, real=torch.zeros(2, 3), fake=torch.zeros(2, 3))
    args.update(kwargs)
    critic, real, fake = args.pop("critic"), args.pop("real"), args.pop("fake")
    with pytest.raises(exc, match=match):
        genfast.gradient_penalty(critic, real, fake, **args)


def test_triton_backend_refuses_float64():
    critic = nn.Linear(3, 1).double()
    with genfast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        genfast.gradient_penalty(critic, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
