"""Backend selection: which implementation the public ops run, decided by one table (:func:`why_not`).

Names: ``"auto"`` (default: the Triton kernels for CUDA tensors, the C++ kernels for CPU tensors when the extension
loads, else the pure-PyTorch reference), ``"reference"`` (``genfast/reference``: explicit formulas, any device and
dtype), ``"torch"`` (``genfast/composite``: the plain PyTorch code a user would write — ``torch.randn`` noise,
``F.group_norm`` → ``F.silu``, the autograd penalty — the baseline of every benchmark; it draws its noise from
torch's generator and so does not share genfast's Philox stream), ``"triton"`` (``kernels/``) and ``"cpp"``
(``csrc/``: every op on the CPU, GroupNorm + SiLU also on CUDA). ``"triton"`` on CPU tensors runs the kernels in the
Triton interpreter and so needs ``TRITON_INTERPRET=1`` before genfast is imported. The default comes from
``GENFAST_BACKEND``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from . import cpp
from ._shared import triton_interpret

BACKENDS = ("auto", "reference", "torch", "triton", "cpp")
OPS = ("group_norm_silu", "reparameterize", "diffusion", "gradient_penalty")  # genfast/ops/<op>.py
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the devices each backend has kernels for; "reference" and "torch" run anywhere
DEVICES = {
    "triton": {op: ("cuda", "cpu") for op in OPS},  # "cpu": the interpreter
    "cpp": {"group_norm_silu": ("cpu", "cuda"), "reparameterize": ("cpu",), "diffusion": ("cpu",),
            "gradient_penalty": ("cpu",)},
}
MODULES = {"reference": "genfast.reference", "triton": "genfast.kernels"}  # the package of an op's module

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


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc})"
    return None


def why_not(backend: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            op: str | None = None) -> str | None:
    """The one backend table: ``None`` when ``backend`` runs ``op`` (one of :data:`OPS`; None: at least one op) on
    ``dtype`` tensors (None: any kernel dtype) on ``device``, else the reason why not, in one sentence.

    ``resolve_backend``, "auto", ``genfast info`` and the benchmarks all ask it. For "cpp" it loads the extension
    (compiling it on first use if it was not built)."""
    _check_name(backend, "backend")
    device_type = torch.device(device).type
    if backend in ("auto", "reference", "torch"):
        return None
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"it takes float32, bfloat16 or float16 tensors, not {dtype} (use backend 'reference' or 'torch')"
    ops = OPS if op is None else (op,)
    if not any(device_type in DEVICES[backend][o] for o in ops):
        if backend == "triton":
            return "it needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels in the interpreter on the CPU)"
        has = ", ".join(f"{o} on {'/'.join(DEVICES[backend][o])}" for o in OPS)
        return f"it has no {device_type} kernels for {op or 'any op'} (it has {has})"
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            return error
        if device_type == "cpu" and not triton_interpret():
            return ("on CPU tensors it runs the Triton interpreter, which needs TRITON_INTERPRET=1 in the "
                    "environment before genfast is imported")
        return None
    return cpp.load_error(device_type)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the result
def _resolve(name: str, op: str, device_type: str, dtype: torch.dtype, interpret: bool) -> str:
    return _resolve_cached(name, op, device_type, dtype, interpret)


@functools.lru_cache(maxsize=None)
def _resolve_cached(name, op, device_type, dtype, interpret) -> str:
    """The concrete backend, or the error message when ``name`` cannot run (returned, not raised: an exception
    inside an assumed-constant call would reach the user wrapped by torch.compile)."""
    if name == "auto":
        candidate = "triton" if device_type == "cuda" else "cpp"
        return candidate if why_not(candidate, device_type, dtype, op) is None else "reference"
    reason = why_not(name, device_type, dtype, op)
    if reason is None:
        return name
    return f"genfast backend {name!r} cannot run {op} on {dtype} tensors on {device_type}: {reason}"


def resolve_backend(device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The concrete backend ("reference", "torch", "triton" or "cpp") for ``op`` on ``dtype`` tensors on ``device``.

    Under "auto" the Triton interpreter is never chosen (a correctness tool, not a speed-up), nor "torch"; float64
    runs on the reference. An explicit backend that cannot run raises the table's reason (TypeError for a dtype,
    RuntimeError otherwise). Cached per (backend, op, device type, dtype)."""
    resolved = _resolve(get_backend(), op, device.type, dtype, triton_interpret())
    if resolved not in BACKENDS:
        raise (TypeError if dtype not in KERNEL_DTYPES else RuntimeError)(resolved)
    return resolved


class _CppOps:
    """The C++ kernels of one op, with the reference module's function names: ``f`` is ``torch.ops.genfast.cpp_f``
    (the extension is loaded on first use)."""

    def __getattr__(self, name: str):
        return getattr(cpp.ops(), f"cpp_{name}")


@functools.lru_cache(maxsize=None)
def implementation(backend: str, op: str):
    """What runs ``op`` on a resolved ``backend``: ``genfast.kernels.<op>`` for "triton", the C++ ops for "cpp",
    ``genfast.reference.<op>`` otherwise — each with the reference module's signatures. Imported on first use, so
    genfast imports without Triton or a compiler."""
    if backend == "cpp":
        return _CppOps()
    return importlib.import_module(f"{MODULES.get(backend, MODULES['reference'])}.{op}")
