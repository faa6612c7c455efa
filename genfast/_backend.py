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
import importlib.util
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
_ENVIRONMENT_KEY = os.environ.encodekey("GENFAST_BACKEND")  # os.environ's key in its raw mapping (bytes on POSIX)


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
    # every op asks: os.environ's raw mapping is read directly (os.environ.get encodes the key and decodes the value,
    # ~1.5 µs a call); a change through os.environ, monkeypatch.setenv included, is seen at the next call. A plain
    # dict holds the checked names (dynamo traces it; it warns about an lru_cache, whose cache it bypasses).
    raw = os.environ._data.get(_ENVIRONMENT_KEY)
    name = _environment_names.get(raw)
    if name is None:
        name = _environment_names[raw] = _check_name("auto" if raw is None else os.environ.decodevalue(raw),
                                                     "GENFAST_BACKEND")
    return name


_environment_names: dict = {}  # $GENFAST_BACKEND's raw value (None: unset, "auto") -> its checked backend name


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
    if importlib.util.find_spec(MODULES["triton"]) is None:  # kernels/ is mapped to genfast.kernels by the install
        return (f"{MODULES['triton']} cannot be imported: genfast is not installed (the repository's kernels/ "
                "becomes genfast.kernels with `pip install -e .`)")
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_error() -> str | None:
    return importlib.import_module(f"{MODULES['triton']}.interpreter_probe").interpreter_error()


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
        if device_type == "cpu":
            return _interpreter_error()
        return None
    return cpp.load_error(device_type)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the result
def _resolve(name: str, op: str, device: torch.device, dtype: torch.dtype, interpret: bool) -> str:
    return _resolve_cached(name, op, device, dtype, interpret)


@functools.lru_cache(maxsize=None)
def _resolve_cached(name, op, device, dtype, interpret) -> str:
    """The concrete backend, or the error message when ``name`` cannot run (returned, not raised: an exception
    inside an assumed-constant call would reach the user wrapped by torch.compile)."""
    device_type = device.type
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
    RuntimeError otherwise). Cached per (backend, op, device, dtype), and per ``TRITON_INTERPRET`` for "triton" (the
    only name it changes); outside torch.compile the cache is read directly (the assumed-constant wrapper costs more
    than the lookup)."""
    name = get_backend()
    interpret = name == "triton" and triton_interpret()
    resolve = _resolve if torch.compiler.is_compiling() else _resolve_cached
    resolved = resolve(name, op, device, dtype, interpret)
    if resolved not in BACKENDS:
        raise (TypeError if dtype not in KERNEL_DTYPES else RuntimeError)(resolved)
    return resolved


class _CppOps:
    """The C++ kernels of one op, with the reference module's function names: ``f`` is the extension module's
    ``cpp_f``, the direct call of the registered op ``genfast::cpp_f`` (the extension is loaded on first use; each
    op is looked up once, then kept as an attribute)."""

    def __getattr__(self, name: str):
        kernel = getattr(cpp.ops(), f"cpp_{name}")
        setattr(self, name, kernel)
        return kernel


@functools.lru_cache(maxsize=None)
def implementation(backend: str, op: str):
    """What runs ``op`` on a resolved ``backend``: ``genfast.kernels.<op>`` for "triton", the C++ ops for "cpp",
    ``genfast.reference.<op>`` otherwise — each with the reference module's signatures. Imported on first use, so
    genfast imports without Triton or a compiler."""
    if backend == "cpp":
        return _CppOps()
    return importlib.import_module(f"{MODULES.get(backend, MODULES['reference'])}.{op}")


def _launch(fn, args: tuple):
    """``fn(*args)`` on the device of the first tensor in ``args``: Triton and the CUDA C++ kernels launch on the
    current CUDA device, so tensors on another one run under ``torch.cuda.device`` (entered only then: the check
    reads two integers)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.is_cuda and arg.get_device() != torch.cuda.current_device():
                with torch.cuda.device(arg.get_device()):
                    return fn(*args)
            break
    return fn(*args)


def run(op: str, name: str, *args):
    """``implementation(backend, op).<name>(*args')`` on its tensors' device, where ``args = (*args', backend)``:
    the body of every registered op, and of its direct eager call (:class:`FusedOp`)."""
    return _launch(getattr(implementation(args[-1], op), name), args[:-1])


# _traced's checks, bound once: every eager call runs them all, and each ``torch._C.…`` lookup costs about as much as
# the call it looks up
_CHECKS = (torch._C._len_torch_dispatch_stack, torch._C._is_torch_function_mode_enabled,
           torch._C._functorch.peek_interpreter_stack, torch._C._get_tracing_state, torch._C._has_torch_function)


def _traced(args: tuple) -> bool:
    """Something traces or intercepts a call on ``args``: torch.compile / export / jit tracing, a dispatch mode
    (FakeTensorMode, FunctionalTensorMode, ...: the __torch_dispatch__ subclasses come with theirs), a function mode
    (e.g. ``with torch.device(...)``), a functorch transform, or a tensor with a __torch_function__ override."""
    dispatch_modes, function_mode, transforms, tracing, torch_function = _CHECKS
    return (torch.compiler.is_compiling() or dispatch_modes() > 0 or function_mode()
            or transforms() is not None or tracing() is not None or torch_function(args))


class FusedOp:
    """A registered op (``torch.library.custom_op`` whose last argument is the resolved backend and whose body is
    ``run(op, name, ...)``) and the way the public functions call it.

    In plain eager mode (not :func:`_traced`) a call runs the body itself: directly when no gradient is recorded,
    else in a ``torch.autograd.Function`` made of the op's own ``setup_context`` and ``backward`` — or, on the
    "cpp" backend of an op built with ``cpp_autograd=True``, the extension's ``cpp_<name>_autograd``, which records
    the same backward as a C++ autograd node (``csrc/cpu/bindings.cpp``; a Python node costs ~20 µs a call). That is the same
    code the registered op runs, without the dispatcher's two Python kernels (~20 µs a call on a CPU). Otherwise —
    torch.compile, export, a mode, a tensor subclass, or a gradient through an op that has none (its registered
    form raises a clear error on backward) — it calls the registered op."""

    def __init__(self, op, family: str, name: str, *, setup_context=None, backward=None, cpp_autograd: bool = False):
        self.op, self.family, self.name = op, family, name
        # the C++ extension's ``cpp_<name>_autograd``: the same op and backward with its autograd node in C++
        self._cpp_autograd = f"{name}_autograd" if cpp_autograd else None
        self._autograd = None
        self._kernels = {}  # backend -> what run(family, name, ...) calls: see _kernel
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)

            def forward(ctx, *args):
                output = _launch(self._kernel(args[-1]), args[:-1])
                setup_context(ctx, args, output)
                return output

            self._autograd = type(f"{name}_function", (torch.autograd.Function,),
                                  dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    def __call__(self, *args):
        if _traced(args):
            return self.op(*args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if self._cpp_autograd is not None and args[-1] == "cpp":
                return run(self.family, self._cpp_autograd, *args)
            return self.op(*args) if self._autograd is None else self._autograd.apply(*args)
        return _launch(self._kernels.get(args[-1]) or self._kernel(args[-1]), args[:-1])

    def _kernel(self, backend: str):
        """``run``'s ``implementation(backend, family).<name>``, looked up once per backend (every eager call
        needs it)."""
        kernel = self._kernels.get(backend)
        if kernel is None:
            kernel = self._kernels[backend] = getattr(implementation(backend, self.family), self.name)
        return kernel
