"""Backend selection and packaging."""
import os
import subprocess
import sys

import pytest
import torch

import genfast
from genfast._backend import resolve_backend

CPU = torch.device("cpu")


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


def test_resolution(monkeypatch):
    with genfast.use_backend("auto"):
        assert resolve_backend(CPU, torch.float32, "group_norm_silu") == "cpp"
        assert resolve_backend(CPU, torch.float64, "group_norm_silu") == "reference"
        assert resolve_backend(torch.device("cuda"), torch.float64, "group_norm_silu") == "reference"
        assert resolve_backend(torch.device("cuda"), torch.bfloat16, "group_norm_silu") == "triton"
    with genfast.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert resolve_backend(CPU, torch.float16, "group_norm_silu") == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend(CPU, torch.float32, "group_norm_silu")
        with pytest.raises(TypeError, match="float64"):
            resolve_backend(torch.device("cuda"), torch.float64, "group_norm_silu")


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
    assert "RuntimeError: genfast backend 'triton' needs CUDA tensors" in proc.stderr


def test_installed_as_genfast_kernels_with_no_top_level_kernels(tmp_path):
    code = ("import importlib.util, genfast.kernels\n"
            "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels module is installed'\n"
            "print(genfast.kernels.__name__)\n")
    proc = _run_outside_repo(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "genfast.kernels"
