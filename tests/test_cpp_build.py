"""The loader of the "cpp" backend's extension: without a built ``genfast._C`` and without a compiler, "auto" falls
back to the reference and the backend table says why; with a compiler, the first use builds csrc/ just-in-time."""
import os
import re
import subprocess
import sys

import genfast.cpp
from backends import skip_unless_usable


def _run(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)


HIDE_BUILT = ("import importlib.util\n"
              "find_spec = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'genfast._C' else find_spec(name, *a)\n")


def test_without_compiler_auto_falls_back_with_a_reason():
    code = HIDE_BUILT + ("import torch, genfast\n"
                         "from genfast._backend import resolve_backend, why_not\n"
                         "print(why_not('cpp'))\n"
                         "print(resolve_backend(torch.device('cpu'), torch.float32, 'group_norm_silu'))\n"
                         "genfast.set_backend('cpp')\n"
                         "try:\n"
                         "    genfast.group_norm_silu(torch.randn(2, 4, 3), 2)\n"
                         "except RuntimeError as exc:\n"
                         "    print(exc)\n")
    proc = _run(code, CXX="/nonexistent/c++")
    assert proc.returncode == 0, proc.stderr
    reason, chosen, error = proc.stdout.strip().splitlines()
    assert reason == ("the C++ extension genfast._C is not built and no C++ compiler (/nonexistent/c++) is available "
                      "to compile it")
    assert chosen == "reference"
    assert error == f"genfast backend 'cpp' cannot run group_norm_silu on torch.float32 tensors on cpu: {reason}"


def test_just_in_time_build_when_the_extension_is_not_built():
    """Without genfast._C the first use compiles csrc/ with torch.utils.cpp_extension.load (cached by torch: only
    the first run of a source version compiles) and the ops run on it."""
    skip_unless_usable("cpp")  # a machine that cannot run the built extension cannot run a just-in-time one
    code = HIDE_BUILT + ("import torch, genfast\n"
                         "x = torch.randn(2, 8, 5, 5)\n"
                         "with genfast.use_backend('cpp'):\n"
                         "    y = genfast.group_norm_silu(x, 4)\n"
                         "with genfast.use_backend('reference'):\n"
                         "    torch.testing.assert_close(y, genfast.group_norm_silu(x, 4))\n"
                         "print(genfast.cpp._load().__file__)\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"{genfast.cpp.JIT_NAME}(_v\d+)?\.so$", proc.stdout.strip()), proc.stdout
