"""Backend selection and packaging."""
import importlib
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

import genfast
import genfast.cpp
from backends import skip_unless_usable
from genfast import _backend
from genfast._backend import DEVICES, OPS, resolve_backend, why_not


def test_backend_names():
    assert genfast._backend.BACKENDS == ("auto", "reference", "torch", "triton", "cpp")
    assert OPS == ("group_norm_silu", "reparameterize", "diffusion", "gradient_penalty")
    for op in OPS:  # one name per op in every layer
        module = importlib.import_module(f"genfast.ops.{op}")
        assert module.OP == op
        assert _backend.implementation("reference", op).__name__ == f"genfast.reference.{op}"
        assert _backend.implementation("triton", op).__name__ == f"genfast.kernels.{op}"


# the functions of each op's reference module that the kernel backends implement
FUNCTIONS = {
    "group_norm_silu": ("group_norm_silu", "group_norm_silu_backward"),
    "reparameterize": ("reparameterize_kl", "reparameterize_kl_backward"),
    "diffusion": ("q_sample", "q_sample_backward", "ddpm_step", "ddpm_step_backward", "ddim_step",
                  "ddim_step_backward", "dynamic_threshold", "target_mse", "target_mse_backward"),
    "gradient_penalty": ("interpolate", "interpolate_backward", "gradient_norm_penalty",
                         "gradient_norm_penalty_backward"),
}


def test_cpp_implementation_is_the_internal_ops():
    """implementation("cpp", op).f is the extension module's cpp_f (the direct call of the registered op
    torch.ops.genfast.cpp_f, which stays for torch.compile), for every kernel function of the op's reference
    module."""
    skip_unless_usable("cpp")
    assert set(FUNCTIONS) == set(OPS)
    for op, names in FUNCTIONS.items():
        for name in names:
            assert callable(getattr(_backend.implementation("reference", op), name))
            assert callable(getattr(_backend.implementation("triton", op), name))
            assert getattr(_backend.implementation("cpp", op), name) is getattr(genfast.cpp.ops(), f"cpp_{name}")
            assert hasattr(torch.ops.genfast, f"cpp_{name}")


def test_default_and_context_manager(monkeypatch):
    monkeypatch.setattr(genfast._backend, "_current", None)
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    assert genfast.get_backend() == "auto"
    with genfast.use_backend("triton"):
        assert genfast.get_backend() == "triton"
        with genfast.use_backend("reference"):
            assert genfast.get_backend() == "reference"
        assert genfast.get_backend() == "triton"
    assert genfast.get_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setattr(genfast._backend, "_current", None)
    monkeypatch.setenv("GENFAST_BACKEND", "reference")
    assert genfast.get_backend() == "reference"
    monkeypatch.setenv("GENFAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="GENFAST_BACKEND"):
        genfast.get_backend()


def test_set_backend_rejects_unknown_names(monkeypatch):
    monkeypatch.setattr(genfast._backend, "_current", None)
    with pytest.raises(ValueError, match="backend"):
        genfast.set_backend("fast")
    genfast.set_backend("reference")
    assert genfast.get_backend() == "reference"


def _resolve(name, device, dtype, op):
    with genfast.use_backend(name):
        return resolve_backend(torch.device(device), dtype, op)


@pytest.fixture
def fresh_resolution():
    """resolve_backend caches its answers: clear them around a test that changes what why_not says."""
    _backend._resolve_cached.cache_clear()
    yield
    _backend._resolve_cached.cache_clear()


def test_why_not_table():
    """The one backend table: None where a backend runs, else one sentence saying why not."""
    for name in ("auto", "reference", "torch"):
        for device, dtype, op in itertools.product(("cpu", "cuda", "meta"), (torch.float64, torch.float16, None),
                                                   OPS + (None,)):
            assert why_not(name, device, dtype, op) is None
    for name in ("triton", "cpp"):
        assert why_not(name, "cpu", torch.float64) == ("it takes float32, bfloat16 or float16 tensors, not "
                                                       "torch.float64 (use backend 'reference' or 'torch')")
    assert why_not("triton", "meta") == ("it needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels in the "
                                         "interpreter on the CPU)")
    assert DEVICES["cpp"] == {"group_norm_silu": ("cpu", "cuda"), "reparameterize": ("cpu",),
                              "diffusion": ("cpu",), "gradient_penalty": ("cpu",)}
    has = ("it has group_norm_silu on cpu/cuda, reparameterize on cpu, diffusion on cpu, gradient_penalty on cpu")
    for op in OPS[1:]:
        assert why_not("cpp", "cuda", op=op) == f"it has no cuda kernels for {op} ({has})"
    assert why_not("cpp", "meta") == f"it has no meta kernels for any op ({has})"
    # what the C++ extension can run is its loader's answer
    assert why_not("cpp", "cpu", torch.bfloat16, "diffusion") == genfast.cpp.load_error("cpu")
    assert why_not("cpp", "cuda", op="group_norm_silu") == genfast.cpp.load_error("cuda")
    with pytest.raises(ValueError, match="backend"):
        why_not("fast")


def test_resolution(monkeypatch):
    cpp_cpu = "cpp" if why_not("cpp", "cpu") is None else "reference"
    assert _resolve("auto", "cpu", torch.float32, "group_norm_silu") == cpp_cpu
    assert _resolve("auto", "cpu", torch.float64, "group_norm_silu") == "reference"
    assert _resolve("auto", "cuda", torch.float64, "group_norm_silu") == "reference"
    assert _resolve("auto", "cuda", torch.bfloat16, "group_norm_silu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreter = why_not("triton", "cpu", torch.float16, "group_norm_silu")  # None, or Triton 3.6 with numpy ≥ 2.4
    if interpreter is None:
        assert _resolve("triton", "cpu", torch.float16, "group_norm_silu") == "triton"
    else:
        with pytest.raises(RuntimeError, match=re.escape(interpreter)):
            _resolve("triton", "cpu", torch.float16, "group_norm_silu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    message = ("genfast backend 'triton' cannot run group_norm_silu on torch.float32 tensors on cpu: on CPU tensors "
               "it runs the Triton interpreter, which needs TRITON_INTERPRET=1 in the environment before genfast is "
               "imported")
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        _resolve("triton", "cpu", torch.float32, "group_norm_silu")
    with pytest.raises(TypeError, match="^genfast backend 'triton' cannot run group_norm_silu on torch.float64 "
                                        "tensors on cuda: it takes float32"):
        _resolve("triton", "cuda", torch.float64, "group_norm_silu")


def test_cpp_resolution():
    if why_not("cpp", "cpu") is None:
        assert _resolve("cpp", "cpu", torch.bfloat16, "reparameterize") == "cpp"
    with pytest.raises(TypeError, match=re.escape("genfast backend 'cpp' cannot run group_norm_silu on "
                                                  "torch.float64 tensors on cpu: it takes float32, bfloat16 or "
                                                  "float16 tensors, not torch.float64")):
        _resolve("cpp", "cpu", torch.float64, "group_norm_silu")
    with pytest.raises(RuntimeError, match=re.escape("genfast backend 'cpp' cannot run diffusion on torch.float32 "
                                                     "tensors on cuda: it has no cuda kernels for diffusion (it "
                                                     "has group_norm_silu on cpu/cuda, ")):
        _resolve("cpp", "cuda", torch.float32, "diffusion")


def test_torch_backend_runs_anything():
    for device, dtype, op in itertools.product(("cpu", "cuda", "meta"), (torch.float64, torch.bfloat16), OPS):
        assert _resolve("torch", device, dtype, op) == "torch"


def test_auto_never_picks_torch_nor_the_interpreter(monkeypatch, fresh_resolution):
    """"auto" is triton on CUDA, cpp on the CPU, else the reference: never the composites of "torch" (a baseline,
    not a speed-up) nor the Triton interpreter, even with TRITON_INTERPRET=1 and no C++ extension."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for device, dtype, op in itertools.product(("cpu", "cuda", "meta"), _backend.KERNEL_DTYPES + (torch.float64,),
                                               OPS):
        assert _resolve("auto", device, dtype, op) in ("triton", "cpp", "reference")
    monkeypatch.setattr(genfast.cpp, "load_error", lambda device_type: "no extension here")
    _backend._resolve_cached.cache_clear()
    assert why_not("cpp", "cpu") == "no extension here"
    for op in OPS:
        assert _resolve("auto", "cpu", torch.float32, op) == "reference"
        assert _resolve("auto", "meta", torch.float32, op) == "reference"


def _run_outside_repo(code, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environ, capture_output=True, text=True)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(tmp_path):
    code = ("import torch, genfast\n"
            "genfast.set_backend('triton')\n"
            "genfast.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3))\n")
    proc = _run_outside_repo(code, tmp_path)
    assert proc.returncode != 0
    assert ("RuntimeError: genfast backend 'triton' cannot run reparameterize on torch.float32 tensors on cpu: on "
            "CPU tensors it runs the Triton interpreter, which needs TRITON_INTERPRET=1 in the environment before "
            "genfast is imported") in proc.stderr


def test_installed_as_genfast_kernels_with_no_top_level_kernels(tmp_path):
    code = ("import importlib.util, genfast.kernels\n"
            "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels module is installed'\n"
            "print(genfast.kernels.__name__)\n")
    proc = _run_outside_repo(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "genfast.kernels"
