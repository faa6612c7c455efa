"""Backend selection: which implementation the registered ops run.

Names: ``"auto"`` (default: Triton kernels for CUDA tensors, the C++ kernels for CPU tensors when the extension
loads, else the pure-PyTorch reference), ``"reference"``, ``"triton"`` and ``"cpp"`` (the C++ kernels of
``csrc/``: every op on the CPU, GroupNorm + SiLU also on CUDA; see ``genfast.cpp``). ``"triton"`` on CPU tensors
runs the Triton kernels in the interpreter and so needs ``TRITON_INTERPRET=1`` in the environment before genfast
is imported. The default comes from ``GENFAST_BACKEND``.
"""
from __future__ import annotations

import contextlib
import importlib
import functools
import os

import torch

from . import cpp

BACKENDS = ("auto", "reference", "triton", "cpp")

_current: str | None = None


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the backend used by every genfast op from now on."""
    global _current
    _current = _check_name(name, "backend")


def get_backend() -> str:
    """The backend name in force: the last ``set_backend``, else ``$GENFAST_BACKEND``, else ``"auto"``."""
    if _current is not None:
        return _current
    return _check_name(os.environ.get("GENFAST_BACKEND", "auto"), "GENFAST_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager that selects a backend for the ops called inside it."""
    global _current
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        _current = previous


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> str | None:
    """``None`` when Triton can be imported, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc})"
    return None


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the result
def _cpp_reason(kernels: str, device_type: str) -> str | None:
    """None when the C++ kernels run the ops of ``kernels`` on ``device_type`` tensors, else why not."""
    if not cpp.has_kernels(kernels, device_type):
        return (f"it has no {device_type} kernels for the {kernels} ops (it runs every op on the CPU and "
                "group_norm_silu on CUDA)")
    return cpp.unavailable_reason(torch.device(device_type))


def _resolve_cpp(device: torch.device, dtype: torch.dtype, kernels: str) -> str:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"genfast backend 'cpp' takes float32, bfloat16 or float16 tensors, got {dtype}; "
                        "use backend 'reference' for float64")
    reason = _cpp_reason(kernels, device.type)
    if reason is not None:
        raise RuntimeError(f"genfast backend 'cpp' cannot run the {kernels} ops on {device.type} tensors: {reason}")
    return "cpp"


def resolve_backend(device: torch.device, dtype: torch.dtype, kernels: str) -> str:
    """The concrete backend ("reference", "triton" or "cpp") for the op of ``genfast.kernels.<kernels>`` on
    tensors of ``dtype`` on ``device``.

    The kernels take fp32, bf16 and fp16; float64 runs on the reference (under "auto") or is refused."""
    name = get_backend()
    if name == "reference":
        return name
    if name == "auto":
        if dtype not in KERNEL_DTYPES:
            return "reference"
        if device.type == "cuda":
            return "triton" if triton_unavailable_reason() is None else "reference"
        # The Triton interpreter is a correctness tool, not a speed-up: on the CPU auto takes the C++ kernels.
        return "cpp" if device.type == "cpu" and _cpp_reason(kernels, "cpu") is None else "reference"
    if name == "cpp":
        return _resolve_cpp(device, dtype, kernels)
    # name == "triton"
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"genfast backend 'triton' takes float32, bfloat16 or float16 tensors, got {dtype}; "
                        "use backend 'reference' for float64")
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"genfast backend 'triton' is not available: {reason}")
    if device.type == "cuda":
        return name
    if device.type == "cpu" and triton_interpret():
        return name
    raise RuntimeError(
        f"genfast backend 'triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 before "
        "importing genfast to run the Triton kernels in the interpreter on the CPU, or use backend 'reference'"
    )


def implementation(backend: str, reference, kernels: str):
    """The module that runs an op for a resolved ``backend``: ``genfast.kernels.<kernels>`` for "triton",
    ``genfast.cpp.<kernels>`` for "cpp" (both imported on first use, so genfast imports without Triton or a
    compiler), else the ``reference`` module."""
    if backend in ("triton", "cpp"):
        package = "genfast.kernels" if backend == "triton" else "genfast.cpp"
        return importlib.import_module(f"{package}.{kernels}")
    return reference


def unavailable_reason(name: str, device: str | torch.device = "cpu") -> str | None:
    """``None`` when backend ``name`` can run ops on tensors on ``device``, else why not, in one sentence.

    This is what ``genfast info`` prints and how the benchmarks pick the backends to time. For "cpp" it loads the
    extension (compiling it on first use if it was not built); on CUDA the "cpp" backend runs group_norm_silu
    only."""
    _check_name(name, "backend")
    device = torch.device(device)
    if name in ("auto", "reference"):
        return None
    if name == "cpp":
        return cpp.unavailable_reason(device)
    # name == "triton"
    reason = triton_unavailable_reason()
    if reason is not None:
        return reason
    if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
        return None
    return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them in the interpreter on {device})"
