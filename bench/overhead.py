"""``genfast bench --overhead``: the host cost of one call of every public op, against the eager composite.

Every public function runs on tiny tensors (at most 1024 elements: the arithmetic costs next to nothing, so the
time is the Python, dispatcher and allocation work around it), with one thread (``--threads`` is not used), in two
modes: ``no grad`` (the forward under ``torch.no_grad``) and ``grad`` (inputs that require grad, the forward and
``torch.autograd.grad`` of its outputs). Implementations: ``eager``, the plain PyTorch composite of
``genfast.composite`` called directly (``bench/ops.py``'s calls), and the genfast function under each backend that
runs the op on the device ("reference", "cpp", "triton" where it is not the interpreter, and "torch": genfast's
checks in front of the composite itself), each under ``genfast.use_backend``, and ``default``: genfast as a user
calls it, with no ``use_backend`` (the backend ``$GENFAST_BACKEND`` or "auto" resolves, looked up on every call).

Timing: a case's implementations are timed in turns, ``rounds`` rounds of one block each (the order reversed
every other round), so that the machine's noise hits every side alike; a block is as many back-to-back calls as
fill ``block_s`` seconds, clocked on the CPU by the calling thread's CPU time (what other processes of a busy
machine take does not count) and on CUDA by the wall time up to one synchronize. The figure is the median over the
blocks of the per-call time; ``ratio`` is it divided by eager's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

import genfast
from genfast._backend import resolve_backend, why_not
from genfast.composite import reparameterize as composite_reparameterize

from . import ops, report
from .cli import command_line
from .ops import Case, OpBench

TARGET_BACKEND = "cpp"  # the CPU's default backend, held to TARGET_RATIO
TARGET_RATIO = 1.2
MODES = ("no grad", "grad")
BACKENDS = ("reference", "cpp", "triton", "torch")
DEFAULT = "genfast-default"  # no use_backend: what a user's call runs


def _reparameterize(name: str) -> OpBench:
    """``genfast.<name>`` (reparameterize or gaussian_kl) against its composite, with reparameterize_kl's inputs."""
    eager, fused = getattr(composite_reparameterize, name), getattr(genfast, name)
    return OpBench(module=ops.REPARAMETERIZE_KL.module, name=name, inputs=ops.REPARAMETERIZE_KL.inputs,
                   eager=lambda inp: (eager(inp["mu"], inp["logvar"]),),
                   genfast=lambda inp: (fused(inp["mu"], inp["logvar"]),),
                   grad_names=("mu", "logvar"), forward_bytes=lambda c: 0, backward_bytes=lambda c: 0)


OPS = dict(ops.OPS, reparameterize=_reparameterize("reparameterize"), gaussian_kl=_reparameterize("gaussian_kl"))
# (op, tiny shape, group-norm variant): every public function once, GroupNorm+SiLU bare and with the U-Net's add
CASES = (
    ("group_norm_silu", (2, 32, 4, 4), "plain"), ("group_norm_silu", (2, 32, 4, 4), "add"),
    ("reparameterize_kl", (4, 16), "-"), ("reparameterize", (4, 16), "-"), ("gaussian_kl", (4, 16), "-"),
    ("q_sample", (2, 3, 4, 4), "-"), ("diffusion_loss", (2, 3, 4, 4), "-"), ("ddpm_step", (2, 3, 4, 4), "-"),
    ("ddim_step", (2, 3, 4, 4), "-"), ("gradient_penalty", (2, 3, 4, 4), "-"),
)


def _call(op: OpBench, case: Case, device: torch.device, grad: bool) -> Callable[[bool], Callable[[], object]]:
    """``make(fused)``: one call of genfast's function (``fused``) or of the eager composite on the case's inputs
    (shared by both), with ``torch.autograd.grad`` of the outputs that require grad w.r.t. the inputs that do when
    ``grad``."""
    inputs = op.inputs(case, device, grad)
    leaves = [inputs[n] for n in op.grad_names if n in inputs]

    def make(fused: bool):
        fn = op.genfast if fused else op.eager
        if not grad:
            def forward():
                with torch.no_grad():
                    return fn(inputs)
            return forward
        outputs = [o for o in fn(inputs) if o.requires_grad]
        upstream = [torch.ones_like(o) for o in outputs]

        def forward_backward():
            outs = [o for o in fn(inputs) if o.requires_grad]
            return torch.autograd.grad(outs, leaves, upstream, allow_unused=True)
        return forward_backward

    return make


def _block(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls (the clocks of the module docstring)."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    start = clock()
    for _ in range(number):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - start) / number


def _backend_in_force(backend: str | None):
    """``genfast.use_backend(backend)``; None (eager, or genfast's default): nothing entered."""
    return contextlib.nullcontext() if backend is None else genfast.use_backend(backend)


def _calls_per_block(fn, device, block_s: float) -> int:
    for _ in range(20):  # warm-up: lazy loads, first-call allocations
        fn()
    per_call = _block(fn, 50, device)
    return max(10, int(block_s / per_call))


def _in_backend(backend: str | None, fn: Callable[[], object]) -> Callable[[int, torch.device], float]:
    """``fn`` run under ``genfast.use_backend(backend)`` (eager and the default: None) for the length of a block."""
    def timed(number: int, device: torch.device) -> float:
        with _backend_in_force(backend):
            return _block(fn, number, device)
    return timed


def measure(name: str, shape: tuple, variant: str, mode: str, backends: list[str], device: torch.device, *,
            rounds: int, block_s: float) -> list[dict]:
    """The records of one case: eager and each backend, interleaved."""
    op = OPS[name]
    case = Case(op.name, shape, "forward" if mode == "no grad" else "forward+backward", variant,
                "nchw" if variant != "-" else "-")
    make = _call(op, case, device, mode == "grad")
    impls = {"eager": (None, make(False)), DEFAULT: (None, make(True))}
    impls.update({f"genfast-{b}": (b, make(True)) for b in backends if why_not(b, device, op=op.module) is None})
    timed, numbers, samples = {}, {}, {k: [] for k in impls}
    for impl, (backend, fn) in impls.items():
        timed[impl] = _in_backend(backend, fn)
        with _backend_in_force(backend):
            numbers[impl] = _calls_per_block(fn, device, block_s)
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        for impl in order:
            samples[impl].append(timed[impl](numbers[impl], device))
    eager = statistics.median(samples["eager"])
    recs = []
    for impl, times in samples.items():
        median = statistics.median(times)
        q25, _, q75 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (median,) * 3
        recs.append(dict(op=name, variant=variant, shape="x".join(map(str, shape)), mode=mode, impl=impl,
                         us_per_call=median * 1e6, iqr_us=(q75 - q25) * 1e6, ratio=median / eager,
                         extra_us=(median - eager) * 1e6, blocks=len(times), calls_per_block=numbers[impl]))
    return recs


def table(recs: list[dict], impls: list[str]) -> str:
    """Markdown: one line per (op, mode), µs per call and the ratio to eager for each implementation."""
    head = ["op", "mode", "eager µs"] + [f"{i.removeprefix('genfast-')} µs (×eager)" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    keyed = {(r["op"], r["variant"], r["mode"], r["impl"]): r for r in recs}
    for name, shape, variant in CASES:
        for mode in MODES:
            eager = keyed.get((name, variant, mode, "eager"))
            if eager is None:
                continue
            label = name if variant == "-" else f"{name} ({variant})"
            cells = [f"{label} {'x'.join(map(str, shape))}", mode, f"{eager['us_per_call']:.1f}"]
            for impl in impls:
                r = keyed.get((name, variant, mode, impl))
                cells.append("—" if r is None else f"{r['us_per_call']:.1f} ({r['ratio']:.2f}×)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"--device must be cpu or an available cuda[:N], got {name!r}")
    return device


def _backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends timed on ``device`` and the reasons the others are not: "triton" on the CPU is the
    interpreter (a test tool, not a host path a user runs)."""
    timed, skipped = [], {}
    for b in BACKENDS:
        reason = why_not(b, device)
        if b == "triton" and device.type == "cpu":
            reason = "on the CPU it is the Triton interpreter, a test tool"
        if reason is None:
            timed.append(b)
        else:
            skipped[b] = reason
    return timed, skipped


def _stem(args, device: torch.device, stamp: datetime) -> Path:
    kinds = ["overhead"] + (["quick"] if args.quick else []) + ([args.tag] if args.tag else [])
    return args.out / "-".join([report.device_tag(device), f"{stamp:%Y%m%d-%H%M%S}"] + kinds)


def _target_impls(device: torch.device) -> tuple:
    """The columns held to TARGET_RATIO: the target backend's, and the default's where it resolves to the target."""
    default = all(resolve_backend(device, torch.float32, op.module) == TARGET_BACKEND for op in OPS.values())
    return (f"genfast-{TARGET_BACKEND}",) + ((DEFAULT,) if default else ())


def _verdict(recs: list[dict], device: torch.device) -> str:
    impls = _target_impls(device)
    target = [r for r in recs if r["impl"] in impls]
    if not target:
        return f"backend {TARGET_BACKEND!r} did not run here: no verdict on the {TARGET_RATIO}× target"
    worst = max(target, key=lambda r: r["ratio"])
    ok = worst["ratio"] <= TARGET_RATIO
    names = " and ".join(i.removeprefix("genfast-") for i in impls)
    return (f"{names}: {'every op within' if ok else 'NOT every op within'} {TARGET_RATIO}× of eager; the largest "
            f"ratio {worst['ratio']:.2f}× ({worst['op']} {worst['variant']} {worst['impl'].removeprefix('genfast-')} "
            f"{worst['mode']})")


def run(args: argparse.Namespace) -> int:
    """Measures every case and writes ``<device>-<stamp>-overhead[-quick][-tag]`` ``.json``, ``.md`` (the table)
    and ``.log`` (everything printed) under ``args.out``; returns 0, or 2 on a bad argument."""
    try:
        device = _device(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"genfast bench: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # one thread's host work; tiny tensors never use more
    rounds = getattr(args, "rounds", None) or (5 if args.quick else 40)
    block_s = 0.004 if args.quick else 0.008  # short blocks, many rounds: load changes hit every side alike
    started = datetime.now(timezone.utc)
    stem = _stem(args, device, started)
    args.out.mkdir(parents=True, exist_ok=True)
    backends, skipped = _backends(device)
    machine = report.machine_info(device, 1)
    lines = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    command = getattr(args, "command", None) or command_line()
    say(f"# command: {command}")
    say(f"# started {started.isoformat(timespec='seconds')}, load average {os.getloadavg()[0]:.2f}; commit "
        f"{machine['commit']}, tree {machine['tree']}; torch {machine['torch']}, CPU {machine['cpu']} "
        f"({machine['cores']} cores), 1 thread")
    say(f"host cost per call on {device}: eager vs genfast under its default backend and backends {backends}; "
        "skipped " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    recs = []
    wall = time.perf_counter()
    for name, shape, variant in CASES:
        for mode in MODES:
            recs += measure(name, shape, variant, mode, backends, device, rounds=rounds, block_s=block_s)
    wall = time.perf_counter() - wall
    impls = [DEFAULT] + [f"genfast-{b}" for b in backends]
    text = table(recs, impls)
    say(text)
    say(_verdict(recs, device))
    say(f"{len(recs)} rows in {wall:.0f} s; {rounds} interleaved rounds of {block_s * 1e3:.0f} ms blocks per "
        f"implementation, median per call")
    settings = dict(command=command, rounds=rounds, block_s=block_s, threads=1,
                    quick=args.quick, wall_s=round(wall, 1), load_average_1min_at_end=os.getloadavg()[0],
                    finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    target=dict(backend=TARGET_BACKEND, ratio=TARGET_RATIO))
    info = dict(machine=machine, settings=settings, backends=dict(timed=backends, skipped=skipped), rows=recs)
    stem.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    caption = (f"Host cost per call on {device} ({machine['cpu']}, 1 thread), {started:%Y-%m-%d}: `{command}`, "
               f"commit {machine['commit']}")
    stem.with_suffix(".md").write_text(f"{caption}\n\n{text}\n\n{_verdict(recs, device)}\n", encoding="utf-8")
    say(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}, {stem.with_suffix('.log')}")
    stem.with_suffix(".log").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0
