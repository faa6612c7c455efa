"""Every Triton kernel, in every configuration its launcher can pick, compiles ahead of time for Hopper (sm_90)
and Ampere (sm_80) without a GPU, with no local-memory spills. The interpreter proves the maths; this proves the
kernels build for a GPU. Runs ``tests/aot_compile.py`` in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNEL_MODULES = ("random", "reparameterize", "diffusion", "group_norm_silu", "gradient_penalty")
ARCHS = (90, 80)
SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_kernels_compile_for_gpu(module_name, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), module_name, str(arch)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
