"""Backend selection: which implementation the registered ops run.

Names: ``"auto"`` (default: Triton kernels for CUDA tensors, the pure-PyTorch reference elsewhere), ``"reference"``
and ``"triton"``. ``"triton"`` on CPU tensors runs the Triton kernels in the interpreter and so needs
``TRITON_INTERPRET=1`` in the environment before genfast is imported. The default comes from ``GENFAST_BACKEND``.
"""
from __future__ import annotations

import contextlib
import importlib
import functools
import os

import torch

BACKENDS = ("auto", "reference", "triton")

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


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ("reference" or "triton") for tensors of ``dtype`` on ``device``.

    The kernels take fp32, bf16 and fp16; float64 runs on the reference (under "auto") or is refused ("triton")."""
    name = get_backend()
    if name == "reference":
        return name
    if name == "auto":
        # The interpreter is a correctness tool, not a speed-up: auto keeps the reference on the CPU.
        usable = device.type == "cuda" and dtype in KERNEL_DTYPES and triton_unavailable_reason() is None
        return "triton" if usable else "reference"
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
    """The module that runs an op for a resolved ``backend``: ``genfast.kernels.<kernels>`` for "triton" (imported
    on first use, so genfast imports without Triton), else the ``reference`` module."""
    if backend == "triton":
        return importlib.import_module(f"genfast.kernels.{kernels}")
    return reference


def unavailable_reason(name: str, device: str | torch.device = "cpu") -> str | None:
    """``None`` when backend ``name`` can run ops on tensors on ``device``, else why not, in one sentence.

    This is what ``genfast info`` prints and how the benchmarks pick the backends to time."""
    _check_name(name, "backend")
    device = torch.device(device)
    if name in ("auto", "reference"):
        return None
    # name == "triton"
    reason = triton_unavailable_reason()
    if reason is not None:
        return reason
    if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
        return None
    return f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them in the interpreter on {device})"
