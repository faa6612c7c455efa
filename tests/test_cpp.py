"""The "cpp" backend (C++ kernels of csrc/cpu) for GroupNorm + SiLU: numerics against the float64 composite and the
reference, layouts, odd sizes, options, determinism, opcheck, torch.compile, backend selection and the loader (large
means are in test_group_norm.test_large_mean, with the other backends)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import genfast
import genfast.cpp
from genfast._backend import resolve_backend, unavailable_reason
from genfast.ops.group_norm_silu import _group_norm_silu_backward_op, _group_norm_silu_op
from test_group_norm import DTYPES, NAMES, check, composite, forward_backward, make_inputs, op_args
from tolerances import assert_close

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(genfast.cpp.unavailable_reason(CPU) is not None,
                                reason=f"C++ kernels unavailable: {genfast.cpp.unavailable_reason(CPU)}")


@pytest.fixture(autouse=True)
def _cpp_backend():
    with genfast.use_backend("cpp"):
        yield


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "channel_slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_composite(dtype, layout):
    inputs = make_inputs((2, 12, 5, 7), dtype, layout=layout)
    y, _ = check(inputs, 3, "cpp")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape, num_groups", [
    ((1, 4, 1, 1), 2),  # 1x1 spatial, batch 1
    ((3, 8), 4),  # no spatial dims
    ((2, 6, 9), 3),  # (B, C, L)
    ((2, 10, 3, 3), 2),  # 5 channels per group (not a multiple of the vector width)
    ((2, 6, 5, 7), 1),  # one group, C not a multiple of 8
    ((2, 6, 5, 7), 6),  # one channel per group
    ((2, 24, 13, 11), 4),  # 143 positions: vector tails in both layouts
    ((3, 40, 45, 47), 8),  # 2115 positions: several fp32 blocks per channel
    ((0, 4, 3, 3), 2),  # empty batch
])
def test_shapes(shape, num_groups, layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4 dims")
    check(make_inputs(shape, layout=layout), num_groups, "cpp")


def test_empty_spatial_extent():
    """No positions (which F.group_norm refuses): y is empty and every gradient is zero."""
    inputs = make_inputs((2, 4, 0, 3))
    y, grads = forward_backward(genfast.group_norm_silu, inputs, torch.empty(2, 4, 0, 3), num_groups=2)
    assert y.shape == (2, 4, 0, 3)
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and not g.any(), name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("add, scale, shift, affine, activation", [
    (False, False, False, False, "silu"), (False, False, False, False, None), (True, False, False, True, None),
    (False, True, True, False, "silu"), (True, True, False, True, "silu")])
def test_option_combinations(add, scale, shift, affine, activation, layout):
    inputs = make_inputs((2, 6, 4, 5), add=add, scale=scale, shift=shift, affine=affine, layout=layout)
    _, grads = check(inputs, 3, "cpp", activation=activation)
    assert set(grads) == {k for k in NAMES if inputs[k] is not None}


def test_mixed_precision_params():
    check(make_inputs((2, 6, 4, 5), torch.bfloat16, param_dtype=torch.float32), 3, "cpp")


def test_against_reference_bitwise_close_fp32():
    """Same fp32 math as the reference, different summation order: agreement to a few fp32 ulps."""
    inputs = make_inputs((4, 32, 16, 16), layout="channels_last")
    grad_y = torch.randn(4, 32, 16, 16)
    y, grads = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=8)
    with genfast.use_backend("reference"):
        y_ref, grads_ref = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=8)
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=2e-6)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], msg=name)


def test_saturated_activation():
    x = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4]).reshape(1, 1, 5).repeat(1, 2, 1)
    y = genfast.group_norm_silu(x * 1e3, 1, eps=1e-30)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(layout):
    inputs = make_inputs((4, 16, 24, 24), layout=layout)
    grad_y = torch.randn(4, 16, 24, 24)
    first = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=4)
    second = forward_backward(genfast.group_norm_silu, inputs, grad_y, num_groups=4)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@pytest.mark.parametrize("with_options", [True, False])
def test_opcheck(with_options):
    flags = dict(add=with_options, scale=with_options, shift=with_options, affine=with_options)
    inputs = [t if t is None else t.requires_grad_() for t in op_args(**flags)]
    torch.library.opcheck(_group_norm_silu_op, (*inputs, 2, 1e-5, True, "cpp"))
    inputs = [t if t is None else t.detach() for t in inputs]
    _, mean, rstd = _group_norm_silu_op(*inputs, 2, 1e-5, True, "cpp")
    grad_y = torch.randn_like(inputs[0])
    torch.library.opcheck(_group_norm_silu_backward_op, (grad_y, *inputs, mean, rstd, 2, True, "cpp"))


def test_torch_compile_fullgraph():
    inputs = op_args()

    def fn(x, weight, bias, add, scale, shift):
        return genfast.group_norm_silu(x, 2, weight, bias, add=add, scale=scale, shift=shift)

    compiled = torch.compile(fn, fullgraph=True)(*inputs)
    with genfast.use_backend("reference"):
        expected = fn(*inputs)
    assert_close(compiled, expected)


def test_selection():
    with genfast.use_backend("auto"):
        assert resolve_backend(CPU, torch.bfloat16, "group_norm_silu") == "cpp"
        assert resolve_backend(CPU, torch.float64, "group_norm_silu") == "reference"
        assert resolve_backend(CPU, torch.float32, "no_such_kernels") == "reference"
    assert unavailable_reason("cpp") is None
    with pytest.raises(TypeError, match="backend 'cpp' takes float32, bfloat16 or float16 tensors, got "
                                        "torch.float64"):
        resolve_backend(CPU, torch.float64, "group_norm_silu")
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run the diffusion ops on cuda tensors: it has no "
                                           "cuda kernels"):
        resolve_backend(torch.device("cuda"), torch.float32, "diffusion")
    with pytest.raises(TypeError, match="float64"):
        genfast.group_norm_silu(torch.randn(2, 4, 3, dtype=torch.float64), 2)


def test_internal_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="num_groups must be a positive divisor of the number of channels 6"):
        torch.ops.genfast.cpp_group_norm_silu(torch.randn(2, 6, 3), None, None, None, None, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"add must have shape \[2, 6\]"):
        torch.ops.genfast.cpp_group_norm_silu(torch.randn(2, 6, 3), None, None, torch.randn(6), None, None, 3,
                                              1e-5, True)


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)


HIDE_BUILT = ("import importlib.util\n"
              "find_spec = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'genfast._C' else find_spec(name, *a)\n")


def test_without_compiler_auto_falls_back_with_a_reason():
    code = HIDE_BUILT + ("import torch, genfast\n"
                         "from genfast._backend import resolve_backend, unavailable_reason\n"
                         "print(unavailable_reason('cpp'))\n"
                         "print(resolve_backend(torch.device('cpu'), torch.float32, 'group_norm_silu'))\n")
    proc = _run(code, CXX="/nonexistent/c++")
    assert proc.returncode == 0, proc.stderr
    reason, chosen = proc.stdout.strip().splitlines()
    assert "not built and no C++ compiler (/nonexistent/c++) is available" in reason
    assert chosen == "reference"


def test_just_in_time_build_when_the_extension_is_not_built():
    """Without genfast._C the first use compiles csrc/ with torch.utils.cpp_extension.load (cached by torch: only
    the first run of a source version compiles) and the ops run on it."""
    code = HIDE_BUILT + ("import torch, genfast\n"
                         "x = torch.randn(2, 8, 5, 5)\n"
                         "with genfast.use_backend('cpp'):\n"
                         "    y = genfast.group_norm_silu(x, 4)\n"
                         "with genfast.use_backend('reference'):\n"
                         "    torch.testing.assert_close(y, genfast.group_norm_silu(x, 4))\n"
                         "print(genfast.cpp._load())\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"{genfast.cpp.JIT_NAME}(_v\d+)?\.so$", proc.stdout.strip()), proc.stdout
