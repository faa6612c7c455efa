"""Runs the per-op cases: which implementations to time on a device, the callables for each mode, and one result
row per (case, implementation)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import genfast
from genfast import _backend

from .ops import OPS, Case, OpBench, minimal_bytes
from .timing import input_copies, profile_call, time_call

EAGER, COMPILE = "eager", "compile"


def genfast_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(the genfast backends to time on ``device``, {skipped backend: why}), discovered from
    ``genfast._backend.BACKENDS`` at run time. "auto" is skipped as a duplicate of a concrete backend, and "triton"
    on the CPU, which is the interpreter: a test tool, not a speed-up."""
    usable, skipped = [], {}
    for name in _backend.BACKENDS:
        if name == "auto":
            skipped[name] = "a duplicate: it resolves to one of the others"
            continue
        if name == "triton" and device.type == "cpu":
            skipped[name] = "on the CPU it is the Triton interpreter, a test tool"
            continue
        reason = _backend.unavailable_reason(name, device)
        if reason is None:
            usable.append(name)
        else:
            skipped[name] = reason
    return usable, skipped


def runs_op(backend: str, kernels: str, device: torch.device) -> bool:
    """Whether ``backend`` has kernels for an op of the kernel module ``kernels`` on ``device``: the C++ backend
    has only GroupNorm+SiLU on CUDA, every other backend that is usable at all runs every op."""
    if backend != "cpp":
        return True
    from genfast import cpp

    return cpp.has_kernels(kernels, device.type)


def first_line(text: str, limit: int = 160) -> str:
    """The first line of a message, cut at ``limit`` characters (build logs and tracebacks run long)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "…"


def genfast_impl(backend: str) -> str:
    return f"genfast-{backend}"


@dataclass
class Row:
    """One measured (case, implementation) pair. Times in seconds, memory in bytes; ``error`` when it failed."""

    case: Case
    impl: str
    bytes: int
    median_s: Optional[float] = None
    iqr_s: Optional[float] = None
    runs: Optional[int] = None
    first_call_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    kernel_launches: Optional[int] = None
    error: Optional[str] = None


def _grad_outputs(outputs: tuple) -> tuple:
    """Upstream gradients: ones for scalars and per-sample vectors (a loss, the KL), Gaussian for tensors."""
    return tuple(torch.ones_like(o) if o.dim() <= 1 else torch.randn_like(o) for o in outputs)


def _targets(op: OpBench, inputs: dict) -> list:
    return [inputs[name] for name in op.grad_names if name in inputs]


def make_call(op: OpBench, case: Case, fn: Callable[[dict], tuple], device: torch.device) -> Callable[[], object]:
    """The timed callable for ``case.mode``, rotating through enough input copies to miss the cache.

    forward: ``fn(inputs)`` under no_grad; backward: ``autograd.grad`` of outputs recorded once per copy
    (retain_graph); forward+backward: both. The first call happens here (it compiles a torch.compile'd ``fn``)."""
    grad = case.mode != "forward"
    copies = input_copies(device, minimal_bytes(op, case))
    inputs = [op.inputs(case, device, grad) for _ in range(copies)]
    if case.mode == "forward":
        cycle = itertools.cycle(inputs)

        def call():
            with torch.no_grad():
                return fn(next(cycle))

        call()
        return call
    first = fn(inputs[0])
    grad_outputs = _grad_outputs(first)
    if case.mode == "backward":
        cycle = itertools.cycle([(inp, first if i == 0 else fn(inp)) for i, inp in enumerate(inputs)])

        def call():
            inp, outputs = next(cycle)
            return torch.autograd.grad(outputs, _targets(op, inp), grad_outputs, retain_graph=True)
    else:
        torch.autograd.grad(first, _targets(op, inputs[0]), grad_outputs)
        cycle = itertools.cycle(inputs)

        def call():
            inp = next(cycle)
            return torch.autograd.grad(fn(inp), _targets(op, inp), grad_outputs)
    call()
    return call


def implementation(op: OpBench, impl: str) -> Callable[[dict], tuple]:
    """The function an implementation name stands for: the eager formula, torch.compile of it, or genfast's op
    under one backend."""
    if impl == EAGER:
        return op.eager
    if impl == COMPILE:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no cache shared between rows
        return torch.compile(op.eager)
    backend = impl.removeprefix("genfast-")

    def run(inputs):
        with genfast.use_backend(backend):
            return op.genfast(inputs)

    return run


def fill(row: Row, build: Callable[[], Callable[[], object]], device: torch.device, *, threads: int,
         min_run_time: float) -> Row:
    """Fills ``row``: ``build()`` returns the timed callable (its set-up and first call are ``first_call_s``), which
    is timed and then profiled once more. An exception becomes the row's ``error``: one failing row (a compile
    torch does not support, an out-of-memory) must not end the run."""
    torch.manual_seed(0)
    try:
        start = time.perf_counter()
        call = build()
        row.first_call_s = time.perf_counter() - start
        timing = time_call(call, device, threads=threads, min_run_time=min_run_time)
        row.median_s, row.iqr_s, row.runs = timing.median, timing.iqr, timing.runs
        profiled = profile_call(call, device)
        row.peak_memory_bytes, row.kernel_launches = profiled.peak_bytes, profiled.kernel_launches
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {first_line(str(exc))}"
    return row


def measure(case: Case, impl: str, device: torch.device, *, threads: int, min_run_time: float) -> Row:
    """Times and profiles one (per-op case, implementation)."""
    op = OPS[case.op]
    row = Row(case=case, impl=impl, bytes=minimal_bytes(op, case))
    return fill(row, lambda: make_call(op, case, implementation(op, impl), device), device, threads=threads,
                min_run_time=min_run_time)
