"""Fused GroupNorm + SiLU: every backend against the composite F.group_norm → scale-shift → F.silu (in float64) and
the kernels against the reference, forward and backward (random upstream gradients), on every layout, odd shape,
option combination and kernel path; the C++ internal op's argument errors."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.kernels.group_norm_silu as K
from backends import skip_unless_usable
from genfast._backend import implementation
from genfast._shared import triton_interpret
from genfast.composite.group_norm_silu import group_norm_silu as composite  # called on float64 copies
from genfast.ops.group_norm_silu import OP, _group_norm_silu_backward_op, _group_norm_silu_op
from tolerances import TOLERANCES, assert_close, assert_close_rel_norm, assert_grads_close, relative_norm_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAMES = ("x", "weight", "bias", "add", "scale", "shift")


def make_inputs(shape, dtype=torch.float32, *, add=True, scale=True, shift=True, affine=True,
                layout="contiguous", param_dtype=None):
    """x of ``shape`` in ``layout`` and the optional (C,) / (B, C) inputs (None where switched off)."""
    batch, channels = shape[:2]
    param_dtype = param_dtype or dtype
    if layout == "sliced":  # every other column of a wider tensor: spatial dims that do not collapse
        x = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    elif layout == "channel_slice":  # channels 1.. of a wider tensor: collapsible, but not dense
        x = torch.randn(batch, channels + 2, *shape[2:], dtype=dtype)[:, 1:-1]
    else:
        x = torch.randn(shape, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)

    def maybe(flag, *size):
        return torch.randn(*size, dtype=param_dtype) if flag else None

    return dict(x=x, weight=maybe(affine, channels), bias=maybe(affine, channels), add=maybe(add, batch, channels),
                scale=maybe(scale, batch, channels), shift=maybe(shift, batch, channels))


def forward_backward(fn, inputs, grad_y, dtype=None, **kwargs):
    """(y, {name: grad}) of fn(x, G, weight, bias, add=..., ...) on leaves made from ``inputs`` (cast to
    ``dtype`` when given; x keeps its strides)."""
    leaves = {k: (v.detach().to(dtype) if dtype else v.detach()).requires_grad_() for k, v in inputs.items()
              if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y = fn(args.pop("x"), kwargs.pop("num_groups"), args.pop("weight"), args.pop("bias"), **args, **kwargs)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y.to(y.dtype))
    return y, dict(zip(leaves, grads))


def check(inputs, num_groups, backend, *, long_sums=False, **kwargs):
    """genfast on ``backend`` against the float64 composite and, for a kernel backend, against the reference:
    y elementwise, the gradients of a random upstream gradient elementwise and by relative norm. ``long_sums``:
    the gradients are sums of thousands of O(1) terms, whose fp32 rounding in any order reaches ~1e-6 of their
    largest value: their elementwise atol is scaled by it."""
    x = inputs["x"]
    grad_y = torch.randn(x.shape, dtype=x.dtype)
    y, grads = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=num_groups, **kwargs)
    y64, grads64 = forward_backward(composite, inputs, grad_y, torch.float64, num_groups=num_groups, **kwargs)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y64)
    expected = [grads64]
    if backend != "reference":
        with genfast.use_backend("reference"):
            y_ref, grads_ref = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=num_groups,
                                                **kwargs)
        assert_close(y, y_ref)
        expected.append(grads_ref)
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype, name
        for want in expected:
            if not _well_conditioned(name, x, num_groups):
                assert_close(g, want[name], msg=name)
            elif long_sums:
                tol = TOLERANCES[g.dtype]
                torch.testing.assert_close(g, want[name].to(g.dtype), atol=tol["atol"] * want[name].abs().max().item(),
                                           rtol=tol["rtol"], msg=name)
                assert_close_rel_norm(g, want[name], msg=name)
            else:
                assert_grads_close(g, want[name], msg=name, allow_zero=x.numel() == 0)
    return y, grads


def _well_conditioned(name, x, num_groups):
    """Whether the gradient ``name`` is O(1) for O(1) inputs, so that its relative error is small in fp32.

    Not so for dh = dx (and d add = Σ_space dh) where two elements per group normalise to ±1 whatever x (dh is
    O(eps)), nor for d add with one channel per group (Σ over a group of dh is 0): their relative norm error is
    that of a difference of O(1) terms, large in any fp32 computation, and only the elementwise check applies."""
    if name not in ("x", "add"):
        return True
    per_group = x.shape[1:].numel() // num_groups
    return per_group > 2 and not (name == "add" and x.shape[1] == num_groups)


def _interpreter_sized(backend, shape, interpreter_shape):
    """``shape``, or the smaller ``interpreter_shape`` for the Triton interpreter (which runs a program at a time)."""
    return interpreter_shape if backend == "triton" and triton_interpret() else shape


def force_split(monkeypatch, *, max_block_c=K.MAX_BLOCK_C):
    """Send small inputs down the split path with tiles of 8 positions × 4 channels, a few splits per group."""
    monkeypatch.setattr(K, "MAX_SINGLE_TILE", 0)
    monkeypatch.setattr(K, "SPLIT_TILE", 32)
    monkeypatch.setattr(K, "DEFAULT_SMS", 3)  # with SPLIT_PROGRAMS_PER_SM = 4: about 12 programs
    monkeypatch.setattr(K, "MAX_BLOCK_C", max_block_c)


# ---- numerics against the composite and the reference ------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "channel_slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_composite(backend, dtype, layout):
    inputs = make_inputs((2, 6, 5, 7), dtype, layout=layout)
    assert K._plan(2, 35, 6).single
    y, _ = check(inputs, 3, backend)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


SHAPES = [
    ((1, 4, 1, 1), 2),  # 1x1 spatial, batch 1
    ((3, 8), 4),  # no spatial dims
    ((2, 6, 9), 3),  # (B, C, L)
    ((1, 4, 2, 3, 2), 2),  # 3 spatial dims
    ((2, 6, 5, 7), 6),  # one channel per group
    ((2, 6, 5, 7), 1),  # one group, C not a multiple of 8
    ((2, 10, 3, 3), 2),  # 5 channels per group: a tile of 8 channels, partly masked; not a multiple of a vector
    ((2, 24, 13, 11), 4),  # 143 positions: vector tails in both layouts
    ((0, 4, 3, 3), 2),  # empty batch
]


@pytest.mark.parametrize("shape, num_groups, layout",
                         [(shape, groups, layout) for shape, groups in SHAPES
                          for layout in (("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",))])
def test_shapes(backend, shape, num_groups, layout):
    check(make_inputs(shape, layout=layout), num_groups, backend)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_several_blocks_per_channel(backend, layout):
    """2115 positions: several fp32 blocks of the C++ kernels per channel, several tiles of the Triton ones; 5
    channels per group."""
    if backend == "triton" and triton_interpret():
        pytest.skip("~17 s in the Triton interpreter; its tiles are exercised by test_split_path and test_shapes")
    check(make_inputs((3, 40, 45, 47), layout=layout), 8, backend, long_sums=True)


def test_empty_spatial_extent(backend):
    """No positions (which F.group_norm refuses): y is empty and every gradient is zero."""
    inputs = make_inputs((2, 4, 0, 3))
    y, grads = forward_backward(genfast.group_norm_silu, inputs, torch.empty(2, 4, 0, 3), num_groups=2)
    assert y.shape == (2, 4, 0, 3)
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and not g.any(), name


def test_double_backward_raises_instead_of_a_silent_zero(backend):
    """The gradient is not differentiable: differentiating it (create_graph=True) raises on every backend, the C++
    autograd node of the cpp backend included, rather than leaving x without its second-order gradient."""
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    (grad,) = torch.autograd.grad(genfast.group_norm_silu(x, 2, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="group_norm_silu"):
        grad.sum().backward()


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("scale, shift", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("add", [False, True])
def test_option_combinations(backend, add, scale, shift, affine, activation):
    inputs = make_inputs((2, 4, 3, 3), add=add, scale=scale, shift=shift, affine=affine)
    _, grads = check(inputs, 2, backend, activation=activation)
    assert set(grads) == {k for k in NAMES if inputs[k] is not None}


@pytest.mark.parametrize("add, scale, shift, affine, activation", [
    (False, False, False, False, "silu"), (False, False, False, False, None), (True, False, False, True, None),
    (False, True, True, False, "silu"), (True, True, False, True, "silu")])
def test_option_combinations_channels_last(backend, add, scale, shift, affine, activation):
    inputs = make_inputs((2, 6, 4, 5), add=add, scale=scale, shift=shift, affine=affine, layout="channels_last")
    _, grads = check(inputs, 3, backend, activation=activation)
    assert set(grads) == {k for k in NAMES if inputs[k] is not None}


def test_mixed_precision_params(backend):
    """bf16 activations with fp32 parameters and conditioning (as nn.GroupNorm's parameters under autocast)."""
    check(make_inputs((2, 6, 5, 7), torch.bfloat16, param_dtype=torch.float32), 3, backend)


@pytest.mark.parametrize("constant", [False, True], ids=["random", "constant"])
def test_eps(backend, constant):
    """A large eps shrinks the output; a constant group (zero variance) is normalised by eps alone."""
    inputs = make_inputs((2, 4, 3, 3))
    if constant:
        inputs["x"] = torch.full((2, 4, 3, 3), 2.5)
    check(inputs, 2, backend, eps=0.5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_saturated_activation(backend):
    """Pre-activations of ±hundreds, where exp overflows in fp32: σ saturates to 0 or 1, nothing turns NaN."""
    inputs = make_inputs((2, 4, 3, 3))
    inputs["weight"] = 200.0 * inputs["weight"]
    y, _ = check(inputs, 2, backend)  # matched the float64 composite, so no NaN or inf either
    assert y.abs().max() > 100  # saturated indeed: σ(n) ≈ 1 for the largest n


def test_extreme_scale_tiny_eps(backend):
    """Inputs of ±1e7 normalised with eps = 1e-30: the statistics do not overflow fp32 and the tiny eps does not
    divide by zero, forward and backward."""
    x = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4]).reshape(1, 1, 5).repeat(2, 2, 1) * 1e3
    inputs = dict(x=x, weight=None, bias=None, add=None, scale=None, shift=None)
    y, _ = check(inputs, 1, backend, eps=1e-30)
    assert y.abs().max() > 1  # normalised, not zeroed


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(backend, layout):
    """Two runs give bitwise the same output and gradients."""
    shape = _interpreter_sized(backend, (4, 16, 24, 24), (2, 16, 12, 12))
    inputs = make_inputs(shape, layout=layout)
    grad_y = torch.randn(shape)
    first = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=4)
    second = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=4)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_kernels_within_a_few_ulps_of_the_reference_fp32(kernel_backend):
    """Same fp32 math as the reference, another summation order: y agrees to a few fp32 ulps."""
    shape = _interpreter_sized(kernel_backend, (4, 32, 16, 16), (4, 32, 8, 8))
    inputs = make_inputs(shape, layout="channels_last")
    grad_y = torch.randn(shape)
    y, grads = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=8)
    with genfast.use_backend("reference"):
        y_ref, grads_ref = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=8)
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=2e-6)
    for name, g in grads.items():
        assert_grads_close(g, grads_ref[name], msg=name)


# ---- kernel paths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_path(monkeypatch, dtype, layout):
    skip_unless_usable("triton")
    force_split(monkeypatch)
    plan = K._plan(2, 35, 6)
    assert not plan.single and plan.n_sp > 1 and plan.per_split > 1  # several splits of several tiles
    inputs = make_inputs((2, 6, 5, 7), dtype, layout=layout)
    with genfast.use_backend("triton"):
        y, _ = check(inputs, 3, "triton")
        grad_y = torch.randn(y.shape, dtype=dtype)
        again = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=3)
        twice = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=3)
    assert torch.equal(again[0], twice[0])  # merges run in a fixed order: bitwise reproducible
    assert all(torch.equal(again[1][k], twice[1][k]) for k in again[1])


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_path_channel_blocks(monkeypatch, layout, activation):
    """6 channels per group: NHWC in blocks of 4 (a full and a partial channel block per group), NCHW in blocks of
    2 (the largest power of two dividing 6)."""
    skip_unless_usable("triton")
    force_split(monkeypatch, max_block_c=4)
    plan = K._plan(6, 15, 4, channels_contiguous=layout == "channels_last")
    assert not plan.single and plan.n_cblocks == (2 if layout == "channels_last" else 3)
    with genfast.use_backend("triton"):
        check(make_inputs((2, 12, 3, 5), layout=layout), 2, "triton", activation=activation)


# channels per group that are not a power of two (10, 12, 20, 40), 8 groups: NHWC windows of 16, 32, 32, 64
# channels (C & -C) spanning several groups and parts of groups at their edges; NCHW channel blocks of 2, 4, 4, 8
# (dividing the group); 9 positions (odd: 3 × 3)
WINDOW_CASES = [(80, 10, "channels_last"), (96, 12, "channels_last"), (160, 20, "channels_last"),
                (320, 40, "channels_last"), (80, 10, "contiguous"), (96, 12, "contiguous")]


@pytest.mark.parametrize("channels, cpg, layout", WINDOW_CASES, ids=[f"cpg{c}-{lay}" for _, c, lay in WINDOW_CASES])
def test_split_path_windows(monkeypatch, layout, channels, cpg):
    """NHWC groups of a width that is not a power of two take window tiles (every lane a channel); NCHW keeps
    channel blocks dividing the group. Forward and backward (all options, a random upstream gradient) against the
    float64 composite and the reference; NHWC windows of 10 channels a group also bitwise reproducible."""
    skip_unless_usable("triton")
    force_split(monkeypatch)
    plan = K._plan(cpg, 9, 16, channels_contiguous=layout == "channels_last", channels=channels)
    assert not plan.single and plan.window == (layout == "channels_last")
    if plan.window:  # several splits of several tiles
        assert plan.n_sp > 1 and plan.block_c == channels & -channels >= cpg
        assert plan.n_cblocks * plan.block_c == channels
    inputs = make_inputs((2, channels, 3, 3), layout=layout)
    with genfast.use_backend("triton"):
        check(inputs, channels // cpg, "triton")
        if plan.window and cpg == 10:
            grad_y = torch.randn(2, channels, 3, 3)
            again = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=channels // cpg)
            twice = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=channels // cpg)
            assert torch.equal(again[0], twice[0])
            assert all(torch.equal(again[1][k], twice[1][k]) for k in again[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_path_windows_half(monkeypatch, dtype):
    """Window tiles in 16-bit dtypes, plain (no add / scale-shift), with and without SiLU."""
    skip_unless_usable("triton")
    force_split(monkeypatch)
    with genfast.use_backend("triton"):
        for activation in ("silu", None):
            check(make_inputs((1, 80, 3, 3), dtype, add=False, scale=False, shift=False, layout="channels_last"), 8,
                  "triton", activation=activation)


def test_split_path_windows_large_mean(monkeypatch):
    """x = 1000 + noise on the window path: each group's statistics are taken about its own first element."""
    skip_unless_usable("triton")
    force_split(monkeypatch)
    inputs = make_inputs((1, 80, 3, 3), add=False, layout="channels_last")
    inputs["x"] = 1000.0 + inputs["x"]
    with genfast.use_backend("triton"):
        y, _ = forward_backward(genfast.group_norm_silu, inputs, torch.randn(1, 80, 3, 3), num_groups=8)
    y64, _ = forward_backward(composite, inputs, torch.randn(1, 80, 3, 3), torch.float64, num_groups=8)
    assert_close(y, y64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend_name, path", [("reference", "single"), ("triton", "single"), ("triton", "split"),
                                                ("cpp", "single")])
def test_large_mean(monkeypatch, backend_name, path, layout):
    """x = 1000 + noise: y keeps full fp32 accuracy, where E[h²] − E[h]² in fp32 is off by ~10%."""
    skip_unless_usable(backend_name)
    if path == "split":
        force_split(monkeypatch)
    # (x + add near 1000 would round in fp32 before any statistic)
    inputs = make_inputs((2, 6, 5, 7), add=False, layout=layout)
    inputs["x"] = 1000.0 + inputs["x"]
    groups = inputs["x"].reshape(2, 3, -1)
    naive_var = (groups * groups).mean(-1) - groups.mean(-1) ** 2
    assert (naive_var - groups.double().var(-1, unbiased=False)).abs().max() > 1e-2
    grad_y = torch.randn(2, 6, 5, 7)
    with genfast.use_backend(backend_name):
        y, grads = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=3)
    y64, grads64 = forward_backward(composite, inputs, grad_y, torch.float64, num_groups=3)
    assert_close(y, y64)
    # The backward recomputes x̂ from the saved fp32 mean, which near 1000 is rounded by up to ulp(1000)/2 = 3e-5 of
    # the unit spread: the gradients carry that relative error.
    for name, g in grads.items():
        scale = grads64[name].abs().max().item()
        torch.testing.assert_close(g, grads64[name].float(), atol=1e-4 * scale, rtol=1e-4, msg=name)
        assert relative_norm_error(g, grads64[name]) < 1e-4, name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_1d"])
def test_dense_layouts_read_in_place(monkeypatch, layout):
    """NCHW, channels_last and a channels-last (B, C, L) x reach the kernels as they are (their own storage and
    strides: no layout copy), forward and backward, and y and dx come back in x's layout."""
    skip_unless_usable("triton")
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(x, *args, **kwargs):
                seen.append((x.data_ptr(), x.stride()))
                return self.kernel[grid](x, *args, **kwargs)

            return launch

    monkeypatch.setattr(K, "_fwd_single_kernel", Spy(K._fwd_single_kernel))
    monkeypatch.setattr(K, "_bwd_single_kernel", Spy(K._bwd_single_kernel))
    x = {"contiguous": lambda: torch.randn(2, 8, 3, 5),
         "channels_last": lambda: torch.randn(2, 8, 3, 5).to(memory_format=torch.channels_last),
         "channels_last_1d": lambda: torch.randn(2, 15, 8).transpose(1, 2)}[layout]().requires_grad_()
    with genfast.use_backend("triton"):
        y = genfast.group_norm_silu(x, 4)
        y.backward(torch.randn(y.shape))
    assert seen == [(x.data_ptr(), x.stride())] * 2
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


# ---- registered ops, autograd, compile ----------------------------------------------------------------------
def op_args(dtype=torch.float32, **flags):
    inputs = make_inputs((2, 4, 3, 3), dtype, **flags)
    return [inputs[k] for k in NAMES]


@pytest.mark.parametrize("with_options", [True, False])
def test_opcheck(backend, with_options):
    flags = dict(add=with_options, scale=with_options, shift=with_options, affine=with_options)
    inputs = [t if t is None else t.requires_grad_() for t in op_args(**flags)]
    torch.library.opcheck(_group_norm_silu_op, (*inputs, 2, 1e-5, True, backend))
    inputs = [t if t is None else t.detach() for t in inputs]
    _, mean, rstd = _group_norm_silu_op(*inputs, 2, 1e-5, True, backend)
    grad_y = torch.randn_like(inputs[0])
    torch.library.opcheck(_group_norm_silu_backward_op, (grad_y, *inputs, mean, rstd, 2, True, backend))


@pytest.mark.parametrize("activation", ["silu", None])
def test_gradcheck(activation):
    inputs = [t.double().requires_grad_() for t in op_args()]
    x, weight, bias, add, scale, shift = inputs

    def fn(x, weight, bias, add, scale, shift):
        return genfast.group_norm_silu(x, 2, weight, bias, add=add, scale=scale, shift=shift, activation=activation)

    with genfast.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradcheck(fn, [x.detach().to(memory_format=torch.channels_last).requires_grad_(),
                                             *inputs[1:]])


def test_torch_compile(backend):
    """torch.compile(fullgraph=True) of the forward and its backward (a random upstream gradient) on ``backend``
    against the eager reference."""
    inputs = [t.requires_grad_() for t in op_args()]
    grad_y = torch.randn(inputs[0].shape)

    def fn(x, weight, bias, add, scale, shift):
        y = genfast.group_norm_silu(x, 2, weight, bias, add=add, scale=scale, shift=shift)
        return (y.detach(), *torch.autograd.grad(y, (x, weight, bias, add, scale, shift), grad_y))

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(fn, fullgraph=True)(*inputs)
    with genfast.use_backend("reference"):
        eager = fn(*inputs)
    assert_close(compiled[0], eager[0])
    for name, c, e in zip(NAMES, compiled[1:], eager[1:]):
        assert_grads_close(c, e, msg=name)


# ---- the module ---------------------------------------------------------------------------------------------
def test_module_matches_groupnorm_silu(backend):
    fused = genfast.nn.GroupNormSiLU(3, 6, eps=1e-4)
    plain = nn.Sequential(nn.GroupNorm(3, 6, eps=1e-4), nn.SiLU())
    assert set(fused.state_dict()) == set(plain[0].state_dict()) == {"weight", "bias"}
    assert_close(fused.weight, plain[0].weight)
    assert_close(fused.bias, plain[0].bias)
    assert repr(fused).replace("GroupNormSiLU", "GroupNorm") == repr(plain[0])
    with torch.no_grad():
        plain[0].weight.normal_()
        plain[0].bias.normal_()
    fused.load_state_dict(plain[0].state_dict())
    x = torch.randn(2, 6, 5, 7)
    assert_close(fused(x), plain(x))
    plain[0].load_state_dict(genfast.nn.GroupNormSiLU(3, 6).state_dict())
    assert_close(plain[0].weight, torch.ones(6))
    emb, scale, shift = torch.randn(3, 2, 6).unbind(0)
    expected = composite(x, 3, fused.weight, fused.bias, 1e-4, add=emb, scale=scale, shift=shift)
    assert_close(fused(x, add=emb, scale=scale, shift=shift), expected)


@pytest.mark.parametrize("options", [dict(affine=False), dict(bias=False)], ids=["no_affine", "no_bias"])
def test_module_options(backend, options):
    if "bias" in options and not genfast.nn.GROUP_NORM_TAKES_BIAS:
        pytest.skip(f"torch {torch.__version__}'s nn.GroupNorm has no bias argument to compare with")
    fused = genfast.nn.GroupNormSiLU(2, 4, **options)
    plain = nn.GroupNorm(2, 4, **options)
    assert fused._parameters.keys() == plain._parameters.keys()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert repr(fused).replace("GroupNormSiLU", "GroupNorm") == repr(plain)
    x = torch.randn(2, 4, 3, 3)
    assert_close(fused(x), F.silu(plain(x)))


def test_module_validation():
    with pytest.raises(ValueError, match="num_channels"):
        genfast.nn.GroupNormSiLU(3, 8)


# ---- validation ---------------------------------------------------------------------------------------------
def call(**overrides):
    inputs = make_inputs((2, 4, 3, 3))
    kwargs = dict(num_groups=2, eps=1e-5, activation="silu", **inputs)
    kwargs.update(overrides)
    return genfast.group_norm_silu(kwargs.pop("x"), kwargs.pop("num_groups"), **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(x=[1.0, 2.0]), TypeError, "^x "),
    (dict(x=torch.ones(2, 4, 3, dtype=torch.int32)), TypeError, "^x "),
    (dict(x=torch.ones(4)), ValueError, "^x "),
    (dict(num_groups=3), ValueError, "num_groups.*C=4|C=4.*num_groups"),
    (dict(num_groups=0), ValueError, "^num_groups"),
    (dict(num_groups=2.0), TypeError, "^num_groups"),
    (dict(weight=torch.ones(3)), ValueError, "^weight"),
    (dict(bias=torch.ones(4, dtype=torch.int64)), TypeError, "^bias"),
    (dict(bias=torch.ones(4, device="meta")), ValueError, "^bias"),
    (dict(add=torch.ones(2, 3)), ValueError, "^add"),
    (dict(scale=torch.ones(4)), ValueError, "^scale"),
    (dict(shift=torch.ones(2, 4, device="meta")), ValueError, "^shift"),
    (dict(eps=0.0), ValueError, "^eps"),
    (dict(eps=float("nan")), ValueError, "^eps"),
    (dict(eps="1e-5"), TypeError, "^eps"),
    (dict(activation="relu"), ValueError, "^activation"),
])
def test_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def test_kernel_backends_refuse_float64(kernel_backend):
    match = (f"genfast backend '{kernel_backend}' cannot run group_norm_silu on torch.float64 tensors on cpu: it "
             "takes float32, bfloat16 or float16 tensors")
    with pytest.raises(TypeError, match=match):
        genfast.group_norm_silu(torch.randn(2, 4, 3, dtype=torch.float64), 2)


def test_cpp_internal_op_checks_its_arguments():
    """The C++ op checks what the public function already checked, for a caller that reaches it directly."""
    skip_unless_usable("cpp", op=OP)
    cpp = implementation("cpp", OP)
    with pytest.raises(RuntimeError, match="num_groups must be a positive divisor of the number of channels 6"):
        cpp.group_norm_silu(torch.randn(2, 6, 3), None, None, None, None, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"add must have shape \[2, 6\]"):
        cpp.group_norm_silu(torch.randn(2, 6, 3), None, None, torch.randn(6), None, None, 3, 1e-5, True)
