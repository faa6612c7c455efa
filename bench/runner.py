"""Runs the cases: which genfast backends to time on a device (``genfast._backend.why_not``), the callables for each
per-op mode, and one result row per (case, implementation), the implementations of a case timed in turns. The
end-to-end and diffusers rows (bench/e2e.py, bench/integrations.py) go through :func:`measure_group` too."""
from __future__ import annotations

import functools
import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import genfast
from genfast import _backend

from .ops import OPS, Case, OpBench, minimal_bytes
from .timing import OtherLoad, input_copies, profile_call, time_interleaved

EAGER, COMPILE = "eager", "compile"


def genfast_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(the genfast backends to time on ``device``, {skipped backend: why}), from ``genfast._backend.BACKENDS`` and
    its table ``why_not`` at run time. Skipped: "auto" (a duplicate of a concrete backend), "torch" (the plain
    PyTorch composites: they are the eager baseline itself), and "triton" on the CPU (the interpreter, a test tool).
    """
    usable, skipped = [], {}
    for name in _backend.BACKENDS:
        if name == "auto":
            skipped[name] = "a duplicate: it resolves to one of the others"
            continue
        if name == "torch":
            skipped[name] = "the plain PyTorch composites: the eager and compile rows are this code"
            continue
        if name == "triton" and device.type == "cpu":
            skipped[name] = "on the CPU it is the Triton interpreter, a test tool"
            continue
        reason = _backend.why_not(name, device)
        if reason is None:
            usable.append(name)
        else:
            skipped[name] = reason
    return usable, skipped


def runs_op(backend: str, module: str, device: torch.device) -> bool:
    """Whether ``backend`` has kernels for the op module ``module`` (one of ``genfast._backend.OPS``) on
    ``device``: ``why_not`` with the op, which reads ``genfast._backend.DEVICES`` (e.g. "cpp" has only
    GroupNorm+SiLU on CUDA)."""
    return _backend.why_not(backend, device, op=module) is None


def fast_backends(backends: list[str]) -> list[str]:
    """The backends a comparison times: not the "reference" backend (the PyTorch oracle, slow by design: its noise
    is Philox computed with int64 PyTorch ops) unless no other backend runs, so that there is still a genfast row."""
    fast = [b for b in backends if b != "reference"]
    return fast or list(backends)


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
    load_average: Optional[float] = None  # the machine's 1-minute load average when the case started
    other_cores: Optional[float] = None  # mean cores other processes kept busy during the case's timed rounds
    attempts: int = 1  # times the case was timed (see ``cli --retry-busy``); the row is the least disturbed one
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
    """The function an implementation name stands for: the eager composite (``genfast.composite``, the code a user
    writes), torch.compile of it, or genfast's public op under one backend. The caller resets dynamo once per case
    (:func:`measure_group`), not here: a case's implementations are timed in turns and must keep their compiles."""
    if impl == EAGER:
        return op.eager
    if impl == COMPILE:
        return torch.compile(op.eager)
    backend = impl.removeprefix("genfast-")

    def run(inputs):
        with genfast.use_backend(backend):
            return op.genfast(inputs)

    return run


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(str(exc))}"


def measure_group(case: Case, builds: dict[str, Callable[[], Callable[[], object]]], device: torch.device, *,
                  nbytes: int, threads: int, min_run_time: float, rounds: int) -> list[Row]:
    """One row per implementation of ``case``: ``builds[impl]()`` returns its timed callable (set-up and first call:
    ``first_call_s``); the callables are then timed in turns (:func:`timing.time_interleaved`) and each profiled
    once more. An exception becomes that row's ``error``: one failing implementation (a compile torch does not
    support, an out-of-memory) must not end the case or the run."""
    torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no cache shared between cases
    load = os.getloadavg()[0]
    rows = {impl: Row(case=case, impl=impl, bytes=nbytes, load_average=load) for impl in builds}
    calls = {}
    for impl, build in builds.items():
        torch.manual_seed(0)
        try:
            start = time.perf_counter()
            calls[impl] = build()
            rows[impl].first_call_s = time.perf_counter() - start
        except Exception as exc:
            rows[impl].error = _error(exc)
    with OtherLoad() as others:
        timings, errors = time_interleaved(calls, device, threads=threads, min_run_time=min_run_time, rounds=rounds)
    for row in rows.values():
        row.other_cores = others.cores
    for impl, exc in errors.items():
        rows[impl].error = _error(exc)
    for impl, timing in timings.items():
        row = rows[impl]
        row.median_s, row.iqr_s, row.runs = timing.median, timing.iqr, timing.runs
        try:
            profiled = profile_call(calls[impl], device)
            row.peak_memory_bytes, row.kernel_launches = profiled.peak_bytes, profiled.kernel_launches
        except Exception as exc:
            row.error = _error(exc)
    return list(rows.values())


def _build_op(op: OpBench, case: Case, impl: str, device: torch.device) -> Callable[[], object]:
    return make_call(op, case, implementation(op, impl), device)


def measure_case(case: Case, impls: list[str], device: torch.device, *, threads: int, min_run_time: float,
                 rounds: int) -> list[Row]:
    """Times and profiles the implementations ``impls`` of one per-op case, in turns."""
    op = OPS[case.op]
    builds = {impl: functools.partial(_build_op, op, case, impl, device) for impl in impls}
    return measure_group(case, builds, device, nbytes=minimal_bytes(op, case), threads=threads,
                         min_run_time=min_run_time, rounds=rounds)


def measure(case: Case, impl: str, device: torch.device, *, threads: int, min_run_time: float,
            rounds: int = 3) -> Row:
    """Times and profiles one (per-op case, implementation)."""
    return measure_case(case, [impl], device, threads=threads, min_run_time=min_run_time, rounds=rounds)[0]
