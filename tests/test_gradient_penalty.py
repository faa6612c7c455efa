"""gradient_penalty (WGAN-GP), the public function on every backend: critic parameter gradients (and those of real
and fake) against the textbook penalty, half precision, layouts, mixed dtypes, reproducible α, empty batches,
no_grad, gradcheck, torch.compile and validation. Its two ops are tested in test_gradient_penalty_ops.py."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import genfast
from backends import skip_unless_usable
from genfast.ops.gradient_penalty import OP
from genfast.reference import gradient_penalty as ref
from test_gradient_penalty_ops import _per_sample, _randn, _textbook_penalty_of_grad
from tolerances import TOLERANCES, assert_close, assert_grads_close


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


# the kernels take fp32/bf16/fp16: float64 runs on the reference only
@pytest.mark.parametrize("backend_name, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                                 ("cpp", torch.float32), ("reference", torch.float64)])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_critic_parameter_gradients(backend_name, kind, dtype):
    skip_unless_usable(backend_name, op=OP)
    shape = (3, 2, 5, 6)
    critic = _critic(kind, shape, dtype)
    params = list(critic.parameters())
    real, fake = _randn(shape, dtype), _randn(shape, dtype)
    alpha = torch.rand(shape[0], dtype=dtype)
    with genfast.use_backend(backend_name):
        penalty = genfast.gradient_penalty(critic, real, fake, weight=4.0, alpha=alpha)
    assert penalty.dim() == 0 and penalty.dtype == dtype and penalty.requires_grad
    got = _backward_grads(penalty, params)
    # the textbook formula in float64 (a float64 copy of the critic) and, for the kernels, the reference
    critic64 = copy.deepcopy(critic).double()
    want_penalty = _textbook_penalty(critic64, real.double(), fake.double(), alpha.double(), weight=4.0)
    expected = [(want_penalty.detach(), _backward_grads(want_penalty, list(critic64.parameters())))]
    if backend_name != "reference":
        with genfast.use_backend("reference"):
            penalty_ref = genfast.gradient_penalty(critic, real, fake, weight=4.0, alpha=alpha)
        expected.append((penalty_ref.detach(), _backward_grads(penalty_ref, params)))
    for want_penalty, want in expected:
        assert_close(penalty, want_penalty, dtype)
        for g, w in zip(got, want):  # a parameter that does not reach the penalty: zero in both
            assert_grads_close(g, w, dtype, allow_zero=True)
        assert any(w.abs().sum() > 0 for w in want)


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
    for g, w in zip(got[:2], want[:2]):
        assert_grads_close(g, w)
    for g, w in zip(got[2:], want[2:]):
        assert_grads_close(g, w, allow_zero=True)


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
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    torch.testing.assert_close(penalty.double(), _textbook_penalty_of_grad(g, 10.0)[0], **TOLERANCES[torch.float32])
    # the parameter gradients: the same math with the norms in fp32 on the critic's half gradient
    params = list(critic.parameters())
    got = _backward_grads(penalty, params)
    want = _backward_grads(10.0 * (g.float().flatten(1).norm(dim=1) - 1).square().mean(), params)
    for p, w in zip(got, want):
        assert_grads_close(p, w, dtype, allow_zero=True)
    assert any(w.abs().sum() > 0 for w in want)


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
        assert_grads_close(g, w, allow_zero=True)


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

def _dynamo_traces_requires_grad_on_an_intermediate() -> bool:
    """torch 2.14's dynamo traces ``x.requires_grad_()`` on a tensor made inside the compiled function; torch 2.11's
    refuses it (a graph break, so an error under fullgraph)."""
    def make_leaf(x):
        return (x * 2).requires_grad_()

    try:
        torch.compile(make_leaf, fullgraph=True)(torch.ones(2))
    except torch._dynamo.exc.Unsupported:
        return False
    finally:
        torch._dynamo.reset()
    return True


@pytest.mark.parametrize("inputs_require_grad", [False, True], ids=["detached", "real_requires_grad"])
def test_torch_compile_fullgraph_gradient_penalty(backend, inputs_require_grad):
    """The whole penalty, its backward to the critic's parameters inside the compiled function. Dynamo traces
    torch.autograd.grad only with ``trace_autograd_ops`` on (off by default: without it, a graph break). With
    inputs that do not require grad, x̂ is made a leaf by ``requires_grad_()`` inside the function, which torch
    2.11's dynamo cannot trace."""
    if not inputs_require_grad and not _dynamo_traces_requires_grad_on_an_intermediate():
        pytest.skip(f"torch {torch.__version__}'s dynamo cannot trace requires_grad_() on an intermediate tensor")
    shape = (3, 2, 4, 4)
    critic = _critic("conv", shape, torch.float32)
    params = list(critic.parameters())[:3]  # conv2's bias does not reach the penalty
    real, fake = _randn(shape).requires_grad_(inputs_require_grad), _randn(shape)
    alpha = torch.rand(3)

    def step(real, fake, alpha):
        penalty = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
        return (penalty.detach(), *torch.autograd.grad(penalty, params))

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)(real, fake, alpha)
    with genfast.use_backend("reference"):
        eager = step(real, fake, alpha)
    assert_close(compiled[0], eager[0])
    for got, want in zip(compiled[1:], eager[1:]):
        assert_grads_close(got, want)


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


def test_kernel_backends_refuse_float64(kernel_backend):
    critic = nn.Linear(3, 1).double()
    match = f"genfast backend '{kernel_backend}' cannot run gradient_penalty on torch.float64 tensors on cpu"
    with pytest.raises(TypeError, match=match):
        genfast.gradient_penalty(critic, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
