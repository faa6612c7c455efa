"""``genfast bench`` (and ``python -m genfast.bench``): run the per-op and end-to-end benchmarks, print the table,
write JSON, CSV and plots under bench/results/."""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import e2e, ops, report, runner
from .timing import copy_bandwidth

DEFAULT_OUT = report.BENCH_DIR / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``genfast bench``."""
    parser.add_argument("--ops", nargs="+", choices=sorted(ops.OPS), metavar="OP",
                        help=f"ops to time (default: all of {', '.join(sorted(ops.OPS))})")
    parser.add_argument("--quick", action="store_true",
                        help="small set for a CPU in under two minutes: the C++ target rows, one row per other op, "
                             f"torch.compile on {len(ops.QUICK_COMPILE_CASES)} rows only, small models end to end, "
                             "no compile end to end")
    parser.add_argument("--targets", action="store_true",
                        help="the C++ CPU backend's target rows only: GroupNorm+SiLU, reparameterize_kl and the "
                             "diffusion loss against eager and torch.compile, and a training step of the 64x64 VAE "
                             "and a small DDPM against eager")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training steps")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile row")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for the ops and the timer (default: number of cores)")


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return device


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def quick_backends(backends: list[str]) -> list[str]:
    """The backends --quick times: the "reference" backend (the PyTorch oracle, slow by design: its noise is Philox
    in PyTorch ops) only when no other backend runs on the device, so that the run still has a genfast row."""
    fast = [b for b in backends if b != "reference"]
    return fast or backends


def _op_tasks(args, backends: list[str], device: torch.device) -> list[tuple]:
    if args.quick or args.targets:
        backends = quick_backends(backends)
    cases = list(ops.TARGET_CASES) if args.targets else ops.quick_cases() if args.quick else ops.full_cases()
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    tasks = []
    for case in cases:
        compile_here = not args.no_compile and (not args.quick or case in ops.QUICK_COMPILE_CASES)
        impls = [runner.EAGER] + ([runner.COMPILE] if compile_here else [])
        kernels = ops.OPS[case.op].kernels
        impls += [runner.genfast_impl(b) for b in backends if runner.runs_op(b, kernels, device)]
        tasks += [("op", case, impl) for impl in impls]
    return tasks


def _e2e_tasks(args, backends: list[str], device: torch.device) -> list[tuple]:
    if args.no_e2e:
        return []
    # a training step calls every kind of op: only backends that run them all on the device
    backends = [b for b in backends if all(runner.runs_op(b, op.kernels, device) for op in ops.OPS.values())]
    sizes = e2e.TARGET_SIZES if args.targets else e2e.QUICK_SIZES if args.quick else e2e.FULL_SIZES
    impls = e2e.e2e_impls(backends, compile_too=not (args.no_compile or args.quick or args.targets))
    return [("e2e", (name, size), impl) for name, size in sizes.items() for impl in impls]


def run(args: argparse.Namespace) -> int:
    """Runs the suite; returns 0 (failed rows are reported in the table, not fatal), 2 on a bad argument."""
    from tqdm import tqdm

    try:
        device = _device(args.device)
        if args.threads is None or args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    except ValueError as exc:
        print(f"genfast bench: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started, cpu_started, load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    backends, skipped = runner.genfast_backends(device)
    # seconds of timed calls per row: do_bench's default 100 ms on CUDA; on the CPU 0.2 s (--quick) or 1 s
    min_run_time = 0.1 if device.type == "cuda" else 0.2 if args.quick else 1.0
    timing = dict(threads=args.threads, min_run_time=min_run_time)
    print(f"genfast bench on {device} ({args.threads} threads): genfast backends {backends}; skipped "
          + "; ".join(f"{k}: {runner.first_line(v)}" for k, v in skipped.items()))

    copy_bytes = (64 if args.quick else 256) * 2**20 if device.type == "cpu" else 2**30
    peak = copy_bandwidth(device, nbytes=copy_bytes, **timing)
    print(f"copy bandwidth (dst.copy_(src), {copy_bytes >> 20} MiB, counted 2x): {peak / 1e9:.2f} GB/s")

    tasks = _op_tasks(args, backends, device) + _e2e_tasks(args, backends, device)
    rows = []
    for kind, what, impl in tqdm(tasks, desc="genfast bench", unit="row", file=sys.stderr):
        if kind == "op":
            rows.append(runner.measure(what, impl, device, **timing))
        else:
            rows.append(e2e.measure(*what, impl, device, **timing))

    wall_s, cpu_s = time.perf_counter() - started, _cpu_seconds() - cpu_started
    recs = report.records(rows, peak)
    print(report.table(recs, launches=device.type == "cuda"))
    machine = report.machine_info(device, args.threads)
    stamp = datetime.now(timezone.utc)
    settings = dict(quick=args.quick, targets=args.targets, ops=args.ops, no_e2e=args.no_e2e, no_compile=args.no_compile,
                    min_run_time_s=min_run_time, finished_utc=stamp.isoformat(timespec="seconds"),
                    wall_s=round(wall_s, 1), cpu_s=round(cpu_s, 1), load_average_1min_at_start=load)
    info = dict(machine=machine, settings=settings, copy_bandwidth_gbps=peak / 1e9,
                backends=dict(timed=backends, skipped=skipped))
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "-targets" if args.targets else "-quick" if args.quick else ""
    stem = args.out / f"{report.device_tag(device)}-{stamp:%Y%m%d-%H%M%S}{kind}"
    report.write_json(stem.with_suffix(".json"), info, recs)
    report.write_csv(stem.with_suffix(".csv"), machine, recs)
    plots = report.plot(recs, peak / 1e9, stem)
    failed = sum(1 for r in recs if r["error"])
    print(f"{len(recs)} rows ({failed} failed) in {wall_s:.0f} s wall, {cpu_s:.0f} s CPU (this process and its "
          "children; on a busy machine the CPU time is the better guide to the run's cost); wrote "
          + ", ".join(str(p) for p in [stem.with_suffix(".json"), stem.with_suffix(".csv"), *plots]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
