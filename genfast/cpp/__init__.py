"""The "cpp" backend: C++ kernels (CPU, plus CUDA C++ for GroupNorm + SiLU) registered as internal torch ops.

Build. ``setup.py`` compiles every ``csrc/cpu/*.cpp`` (and, where ``cuda_skip_reason()`` is None, every
``csrc/cuda/*.cu``) into one extension, ``genfast/_C.*.so``. When that file is absent (a plain ``pip install .``,
whose isolated build cannot import torch: the wheel then carries the sources as ``genfast/csrc``) or older than a
source in ``csrc/`` (a checkout edited since the build), the first use compiles the sources just-in-time with
``torch.utils.cpp_extension.load`` into torch's extension cache (once; later runs reuse it). The flags are
``compile_flags()`` in both cases. On x86-64 the CPU code is compiled for AVX2 + FMA, so that ``at::vec::Vectorized``
uses 256-bit registers and a vectorised ``exp``; on a CPU without AVX2 the extension is not loaded and "auto"
keeps the reference (``load_error`` says why).

Registration pattern (one per op; the C++ function names are those of the op's reference module
``genfast/reference/<op>.py``, prefixed ``cpp_``):

1. ``csrc/cpu/<op>.cpp`` defines the internal ops and their CPU kernels::

       TORCH_LIBRARY_FRAGMENT(genfast, m) {
         m.def("cpp_group_norm_silu(Tensor x, Tensor? weight, ..., int num_groups, float eps, bool silu)"
               " -> (Tensor, Tensor, Tensor)");
       }
       TORCH_LIBRARY_IMPL(genfast, CPU, m) { m.impl("cpp_group_norm_silu", &group_norm_silu_cpu); }

   with the signatures and returns of the reference functions. A CUDA kernel goes in ``csrc/cuda/<op>.cu`` with
   ``TORCH_LIBRARY_IMPL(genfast, CUDA, m)`` only (the schema stays in the .cpp file, which is always compiled). The
   build globs the folders: adding a file is enough. Include ``<ATen/core/Tensor.h>``, ``<ATen/ops/<name>.h>``,
   ``<ATen/Parallel.h>``, ``<ATen/cpu/vec/vec.h>`` and ``<torch/library.h>``, not ``<ATen/ATen.h>`` or
   ``<torch/extension.h>``: those cost ~30 s of compile per file.
2. ``csrc/cpu/bindings.cpp`` lists each op's C++ signature once more: the extension is a Python module whose
   ``cpp_f`` is the dispatcher's typed call of ``genfast::cpp_f`` (the registered CPU or CUDA kernel), ~2 µs a
   call cheaper than ``torch.ops.genfast.cpp_f``, which converts every argument through the schema. A signature
   that does not match the schema fails the import, so every test catches it. The only file including the
   pybind11 / Python headers (~60 s of compile).
3. The devices go in the backend table (``genfast._backend.DEVICES["cpp"]``). Nothing else:
   ``genfast._backend.implementation("cpp", op).f`` is the module's ``cpp_f``. The internal ops run only inside
   the public ``genfast::*`` custom ops (which have the fake implementations torch.compile needs): there is no
   second public API.
"""
from __future__ import annotations

import functools
import logging
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

EXTENSION = "genfast._C"  # built by setup.py
JIT_NAME = "genfast_cpp"  # the just-in-time build in torch's extension cache
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root, in a source checkout
IN_CHECKOUT = (CHECKOUT / "setup.py").is_file() and (CHECKOUT / "csrc" / "cpu").is_dir()
# where csrc/ is: the checkout's, else the copy an installed package carries (genfast/csrc, for the JIT build)
SOURCE_ROOT = CHECKOUT if IN_CHECKOUT else Path(__file__).resolve().parents[1]
JIT_SECONDS = 60  # about how long the just-in-time build of the CPU sources takes on 2 idle cores


def x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def compile_flags() -> dict[str, list[str]]:
    """Compiler flags by language ("cxx", "nvcc"); one place for setup.py and the just-in-time build."""
    cxx = ["-O3", "-g0", "-Wno-unknown-pragmas"]
    if x86_64():
        # at::vec picks its implementation from CPU_CAPABILITY_*; the loader refuses CPUs without AVX2 (every
        # AVX2 CPU also has FMA and F16C, which ATen's AVX2 code uses).
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return {"cxx": cxx + _openmp(), "nvcc": ["-O3"]}


def link_flags() -> list[str]:
    """Linker flags; one place for setup.py and the just-in-time build."""
    return _openmp()


def _openmp() -> list[str]:
    """-fopenmp where ATen's parallel backend is OpenMP: at::parallel_for is a header template whose
    ``#pragma omp parallel`` a compile without -fopenmp silently drops, running every kernel on one thread."""
    return ["-fopenmp"] if torch._C.has_openmp else []


def sources(root: Path = SOURCE_ROOT, *, cuda: bool) -> list[str]:
    """Every C++ source of the extension under ``root``, sorted: csrc/cpu/*.cpp, and csrc/cuda/*.cu with ``cuda``."""
    found = sorted((root / "csrc" / "cpu").glob("*.cpp"))
    if cuda:
        found += sorted((root / "csrc" / "cuda").glob("*.cu"))
    return [str(p) for p in found]


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found, using CUDA_HOME=…" warning
    (it is printed at import time on every machine without a CUDA runtime; genfast reports CUDA itself)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _nvcc() -> str | None:
    CUDA_HOME = _cpp_extension().CUDA_HOME  # noqa: N806

    candidate = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    if candidate is not None and candidate.exists():
        return str(candidate)
    return shutil.which("nvcc")


def cuda_library_dir() -> Path | None:
    """The toolkit's lib64 holding libcudart.so: under CUDA_HOME as torch finds it (from an nvcc on the PATH,
    /usr/local/bin/nvcc gives /usr/local), else under the real path of nvcc, else /usr/local/cuda; None if none."""
    CUDA_HOME = _cpp_extension().CUDA_HOME  # noqa: N806

    nvcc = _nvcc()
    roots = [CUDA_HOME, Path(nvcc).resolve().parents[1] if nvcc else None, "/usr/local/cuda"]
    for root in roots:
        if root is not None and (Path(root) / "lib64" / "libcudart.so").exists():
            return Path(root) / "lib64"
    return None


def cuda_skip_reason() -> str | None:
    """None when the CUDA sources can be compiled for this torch, else why not (one sentence)."""
    if os.environ.get("GENFAST_BUILD_CUDA", "1") == "0":
        return "GENFAST_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    nvcc = _nvcc()
    if nvcc is None:
        return "no CUDA toolkit (nvcc) was found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"could not read the version of {nvcc}"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return (f"nvcc {found.group(1)}.{found.group(2)} does not match the CUDA major version "
                f"{torch.version.cuda} of torch")
    if cuda_library_dir() is None:
        return "the CUDA runtime library (lib64/libcudart.so) was not found next to nvcc or in /usr/local/cuda"
    return None


def _stale(library: Path, root: Path) -> bool:
    """The built library is older than a source file of the checkout it was built from."""
    newest = max((p.stat().st_mtime for p in (root / "csrc").rglob("*") if p.is_file()), default=0.0)
    return library.stat().st_mtime < newest


def _jit_build():
    """Compile the sources just-in-time (once; torch caches the build) and import the module; returns it."""
    cpp_extension = _cpp_extension()
    if not sources(cuda=False):
        raise RuntimeError(f"the C++ extension {EXTENSION} is not built and no sources were found under "
                           f"{SOURCE_ROOT / 'csrc'} to compile it")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the C++ extension {EXTENSION} is not built and no C++ compiler ({compiler}) is "
                           "available to compile it")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        raise RuntimeError(f"the C++ extension {EXTENSION} is not built and the Python development headers "
                           "(Python.h, e.g. the python3-dev package) needed to compile it are not installed")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"the C++ extension {EXTENSION} is not built and ninja (needed to compile it "
                           "just-in-time) is not installed")
    cuda = torch.cuda.is_available() and cuda_skip_reason() is None
    flags = compile_flags()
    # torch names the library genfast_cpp.so, then genfast_cpp_v1.so, ... as the sources change.
    build_dir = Path(cpp_extension._get_build_directory(JIT_NAME, verbose=False))  # where load() builds
    cached = sorted(build_dir.glob(f"{JIT_NAME}*.so"), key=lambda p: p.stat().st_mtime)
    announce = not cached or _stale(cached[-1], SOURCE_ROOT)
    if announce:
        print(f"genfast: compiling the C++ {'CPU and CUDA' if cuda else 'CPU'} kernels (once, ~{JIT_SECONDS} s)…",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = cpp_extension.load(name=JIT_NAME, sources=sources(cuda=cuda), extra_cflags=flags["cxx"],
                                extra_cuda_cflags=flags["nvcc"], verbose=False,
                                extra_ldflags=link_flags() + ([f"-L{cuda_library_dir()}"] if cuda else []))
    if announce:
        print(f"genfast: C++ kernels ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return module


@functools.lru_cache(maxsize=None)
def _load():
    """Import the extension module (the built one, else a just-in-time build) once, which registers the ops;
    returns the module (its ``__file__``: the library loaded)."""
    if x86_64() and not torch.cpu._is_avx2_supported():
        raise RuntimeError("the C++ CPU kernels are compiled for AVX2 and this CPU does not support it")
    spec = importlib.util.find_spec(EXTENSION)
    if spec is not None and spec.origin is not None:
        if not IN_CHECKOUT or not _stale(Path(spec.origin), SOURCE_ROOT):  # an installed copy is never stale
            return importlib.import_module(EXTENSION)
    return _jit_build()


@functools.lru_cache(maxsize=None)
def _load_error() -> str | None:
    try:
        _load()
    except Exception as exc:  # no compiler, a failed build, an unsupported CPU: "auto" falls back to the reference
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def ops():
    """The extension module: ``cpp_f`` calls the registered op ``genfast::cpp_f`` (loads or builds the extension
    on first use)."""
    return _load()


@functools.lru_cache(maxsize=None)
def load_error(device_type: str) -> str | None:
    """None when the C++ kernels can run on ``device_type`` tensors, else why not, in one sentence (loads the
    extension)."""
    if device_type not in ("cpu", "cuda"):
        return f"the C++ kernels run on CPU and CUDA tensors, not on {device_type}"
    error = _load_error()
    if error is not None:
        return error
    if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "genfast::cpp_group_norm_silu", "CUDA"):
        why = cuda_skip_reason() or ("no CUDA device was available when the kernels were compiled just-in-time"
                                     if not torch.cuda.is_available() else "the CUDA sources were not compiled")
        return f"the C++ extension was built without its CUDA kernels ({why})"
    return None
