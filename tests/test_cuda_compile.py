"""The CUDA C++ sources compile with nvcc for sm_90 (they cannot run on the CPU CI, so this keeps them from rotting)."""
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from genfast.cpp import SOURCE_ROOT

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted((SOURCE_ROOT / "csrc" / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
           "-gencode", "arch=compute_90,code=sm_90", *cpp_extension.COMMON_NVCC_FLAGS, *includes]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
