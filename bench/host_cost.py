"""``python -m genfast.bench.host_cost``: the host cost of every public op against the eager composite, measured a
second way, independent of ``genfast bench --overhead``'s clock and statistic.

The same cases, inputs and calls as ``bench/overhead.py`` (every public function on tiny CPU tensors, ``no grad``
and ``grad``), but each genfast function is called as a user calls it, under the default backend (no
``use_backend``: "auto", or ``$GENFAST_BACKEND``), and timed by the wall clock (``time.perf_counter``) over long
loops of back-to-back calls: ``repeats`` times, eager and genfast alternating (ABAB), each loop ``calls`` calls.
The figure is the minimum over the loops of the per-call time (noise from other processes only ever adds time, so
the least disturbed loop is the closest to the host cost); ``ratio`` is genfast's minimum over eager's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import genfast

from . import overhead, report
from .ops import Case

CALLS = 200  # per loop: ~2-40 ms, short enough that some loops run undisturbed on a busy machine
REPEATS = 30


def _loop(fn, calls: int) -> float:
    """Wall seconds per call of ``calls`` back-to-back calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(name: str, shape: tuple, variant: str, mode: str, *, calls: int, repeats: int) -> dict:
    """One row: eager's and genfast's (default backend) minimum per-call wall time over ABAB loops."""
    op = overhead.OPS[name]
    case = Case(op.name, shape, "forward" if mode == "no grad" else "forward+backward", variant,
                "nchw" if variant != "-" else "-")
    make = overhead._call(op, case, torch.device("cpu"), mode == "grad")
    eager, fused = make(False), make(True)
    for _ in range(20):  # warm-up: lazy loads, first-call allocations
        eager(), fused()
    times = {"eager": [], "genfast": []}
    for _ in range(repeats):
        times["eager"].append(_loop(eager, calls))
        times["genfast"].append(_loop(fused, calls))
    best = {impl: min(t) for impl, t in times.items()}
    return dict(op=name, variant=variant, shape="x".join(map(str, shape)), mode=mode,
                backend=genfast.get_backend(), eager_us=best["eager"] * 1e6, genfast_us=best["genfast"] * 1e6,
                ratio=best["genfast"] / best["eager"], calls=calls, repeats=repeats)


def table(rows: list[dict]) -> str:
    lines = ["| op | mode | eager µs | genfast µs | ×eager |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        label = r["op"] if r["variant"] == "-" else f"{r['op']} ({r['variant']})"
        lines.append(f"| {label} {r['shape']} | {r['mode']} | {r['eager_us']:.1f} | {r['genfast_us']:.1f} | "
                     f"{r['ratio']:.2f}× |")
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> str:
    worst = max(rows, key=lambda r: r["ratio"])
    ok = worst["ratio"] <= overhead.TARGET_RATIO
    return (f"default backend: {'every op within' if ok else 'NOT every op within'} {overhead.TARGET_RATIO}× of "
            f"eager; the largest ratio {worst['ratio']:.2f}× ({worst['op']} {worst['variant']} {worst['mode']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.bench.host_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--calls", type=int, default=CALLS, help="back-to-back calls per loop")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="loops of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1, as --overhead)")
    parser.add_argument("--ops", nargs="*", default=None, help="only these ops (default: every case)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    device = torch.device("cpu")
    machine = report.machine_info(device, args.threads)
    command = " ".join(["python -m genfast.bench.host_cost"] + (argv if argv is not None else sys.argv[1:]))
    print(f"# {command}; load average {os.getloadavg()[0]:.2f}; torch {machine['torch']}, CPU {machine['cpu']}, "
          f"{args.threads} thread(s), backend {genfast.get_backend()}", flush=True)
    rows = []
    for name, shape, variant in overhead.CASES:
        if args.ops and name not in args.ops:
            continue
        for mode in overhead.MODES:
            rows.append(measure(name, shape, variant, mode, calls=args.calls, repeats=args.repeats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(_verdict(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{report.device_tag(device)}-{started:%Y%m%d-%H%M%S}-host-cost"
    settings = dict(command=command, calls=args.calls, repeats=args.repeats, threads=args.threads,
                    load_average_1min_at_end=os.getloadavg()[0], target_ratio=overhead.TARGET_RATIO)
    stem.with_suffix(".json").write_text(json.dumps(dict(machine=machine, settings=settings, rows=rows), indent=1)
                                         + "\n", encoding="utf-8")
    caption = (f"Host cost per call on cpu ({machine['cpu']}, {args.threads} thread), {started:%Y-%m-%d}, wall "
               f"clock, minimum of {args.repeats} alternating loops of {args.calls} calls: `{command}`, commit "
               f"{machine['commit']}")
    stem.with_suffix(".md").write_text(f"{caption}\n\n{text}\n\n{_verdict(rows)}\n", encoding="utf-8")
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
