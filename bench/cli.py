"""``genfast bench`` (and ``python -m genfast.bench``): run the per-op, end-to-end or diffusers benchmarks, print the
table, write JSON, CSV, the log and plots under ``--out`` (default ``./bench-results/`` under the current
directory; the repository's committed runs are written with ``--out bench/results``)."""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import e2e, integrations, ops, report, runner
from .timing import OtherLoad, copy_bandwidth, wait_for_quiet

DEFAULT_OUT = Path("bench-results")
BUSY_CORES = 0.25  # --retry-busy: a case timed while other processes used more than this many cores is re-timed
QUIET_WAIT_S = 60.0
ENV_RECORDED = ("MALLOC_MMAP_THRESHOLD_", "GENFAST_BACKEND", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS",
                "TRITON_INTERPRET", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``genfast bench``."""
    parser.add_argument("--ops", nargs="+", choices=sorted(ops.OPS), metavar="OP",
                        help=f"ops to time (default: all of {', '.join(sorted(ops.OPS))})")
    parser.add_argument("--quick", action="store_true",
                        help="small set for a CPU in a few minutes: the C++ target rows, one row per other op, "
                             f"torch.compile on {len(ops.QUICK_COMPILE_CASES)} rows only, small models end to end, "
                             "no compile end to end (with --integrations: small diffusers models)")
    parser.add_argument("--targets", action="store_true",
                        help="the C++ CPU backend's target rows only: GroupNorm+SiLU, reparameterize_kl and the "
                             "diffusion loss, and a training step of the 64x64 VAE and a small DDPM, against eager "
                             "and torch.compile")
    parser.add_argument("--integrations", action="store_true",
                        help="only the diffusers rows: UNet2DModel training step and AutoencoderKL decode, patched "
                             "with apply_genfast against unpatched (needs diffusers)")
    parser.add_argument("--static", action="store_true",
                        help="no timing: compile for sm_90 the Triton variants the launchers pick for the shape "
                             "table, read their machine code and predict time and bandwidth on an H200 and an H100 "
                             "(see bench/README.md); with --quick the subset the tests check")
    parser.add_argument("--overhead", action="store_true",
                        help="host cost per call: every op on tiny tensors, each backend against the eager "
                             "composite, with and without grad, interleaved")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"results folder (default: ./{DEFAULT_OUT}/ under the current directory)")
    parser.add_argument("--tag", default="", help="appended to the file names of this run (e.g. reused-memory)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training steps")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile row")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for the ops and the timer (default: number of cores)")
    parser.add_argument("--retry-busy", type=int, default=0, metavar="N",
                        help=f"re-time a case up to N times when other processes kept more than {BUSY_CORES} cores "
                             f"busy during its timing, after waiting up to {QUIET_WAIT_S:.0f} s for a quiet moment; "
                             "the least disturbed attempt is kept (default: 0)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the interleaved timing: each round times one block of every "
                             "implementation of a case in turn (default: 5 with --quick, else 10)")


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


def _check(args) -> torch.device:
    device = _device(args.device)
    if args.threads is None or args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds must be a positive integer, got {args.rounds}")
    if args.retry_busy < 0:
        raise ValueError(f"--retry-busy must be >= 0, got {args.retry_busy}")
    if args.integrations and args.targets:
        raise ValueError("--integrations and --targets are separate sets: give one")
    return device


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


Task = Callable[[], "list[runner.Row]"]


def _op_tasks(args, backends: list[str], device: torch.device, timing: dict) -> list[Task]:
    """One callable per per-op case; it times the case's implementations in turns and returns their rows."""
    if args.quick or args.targets:
        backends = runner.fast_backends(backends)
    cases = list(ops.TARGET_CASES) if args.targets else ops.quick_cases() if args.quick else ops.full_cases()
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    tasks = []
    for case in cases:
        compile_here = not args.no_compile and (not args.quick or case in ops.QUICK_COMPILE_CASES)
        impls = [runner.EAGER] + ([runner.COMPILE] if compile_here else [])
        impls += [runner.genfast_impl(b) for b in backends if runner.runs_op(b, ops.OPS[case.op].module, device)]
        tasks.append(functools.partial(runner.measure_case, case, impls, device, **timing))
    return tasks


def _e2e_tasks(args, backends: list[str], device: torch.device, timing: dict) -> list[Task]:
    if args.no_e2e:
        return []
    # a training step calls every kind of op: only backends that run them all on the device
    backends = [b for b in backends if all(runner.runs_op(b, op.module, device) for op in ops.OPS.values())]
    sizes = e2e.TARGET_SIZES if args.targets else e2e.QUICK_SIZES if args.quick else e2e.FULL_SIZES
    impls = e2e.e2e_impls(backends, compile_too=not (args.no_compile or args.quick))
    return [functools.partial(e2e.measure, name, size, impls, device, **timing) for name, size in sizes.items()]


def _disturbance(rows: list) -> float:
    return max((r.other_cores or 0.0 for r in rows), default=0.0)


def _measured(task: Task, retries: int) -> list:
    """``task()``, re-run up to ``retries`` times (each after waiting for a quiet moment) while other processes
    kept more than BUSY_CORES cores busy during it; the least disturbed attempt's rows, with ``attempts`` set."""
    rows, attempt = task(), 1
    while attempt <= retries and _disturbance(rows) > BUSY_CORES:
        wait_for_quiet(BUSY_CORES, QUIET_WAIT_S)
        again = task()
        attempt += 1
        if _disturbance(again) < _disturbance(rows):
            rows = again
    for row in rows:
        row.attempts = attempt
    return rows


def _tasks(args, backends: list[str], device: torch.device, timing: dict) -> list[Task]:
    if args.integrations:
        return integrations.tasks(backends, device, quick=args.quick, compile_too=not args.no_compile, **timing)
    return _op_tasks(args, backends, device, timing) + _e2e_tasks(args, backends, device, timing)


class _Tee:
    """A text stream that writes to ``stream`` and to ``log``: the run's printed output becomes its log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()


def command_line(argv=None) -> str:
    """The command as typed: ``genfast bench …`` for the console script and ``python -m genfast``, else
    ``python -m genfast.bench …``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    prog = "python -m genfast.bench" if sys.argv[0].endswith(os.path.join("bench", "__main__.py")) else "genfast bench"
    return " ".join([prog] + [shlex.quote(a) for a in argv])


def _stem(args, device: torch.device, stamp: datetime) -> Path:
    kinds = [k for k, on in (("quick", args.quick), ("targets", args.targets), ("integrations", args.integrations))
             if on] + ([args.tag] if args.tag else [])
    return args.out / "-".join([report.device_tag(device), f"{stamp:%Y%m%d-%H%M%S}"] + kinds)


def run(args: argparse.Namespace) -> int:
    """Runs the suite; returns 0 (failed rows are reported in the table, not fatal), 2 on a bad argument."""
    if args.static:
        from . import static
        return static.run(args)
    if args.overhead:
        from . import overhead
        return overhead.run(args)
    try:
        device = _check(args)
    except ValueError as exc:
        print(f"genfast bench: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    stem = _stem(args, device, started)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".log"), "w", encoding="utf-8") as log, \
            contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        print(f"# command: {getattr(args, 'command', None) or command_line()}")
        env = " ".join(f"{k}={v}" for k, v in _env().items()) or f"none of {', '.join(ENV_RECORDED)} set"
        print(f"# started {started.isoformat(timespec='seconds')}, load average {os.getloadavg()[0]:.2f}; env: {env}")
        return _run(args, device, stem)


def _env() -> dict:
    return {k: os.environ[k] for k in ENV_RECORDED if k in os.environ}


def _settings(args, timing: dict) -> dict:
    return dict(command=getattr(args, "command", None) or command_line(), quick=args.quick, targets=args.targets,
                integrations=args.integrations, ops=args.ops, no_e2e=args.no_e2e, no_compile=args.no_compile,
                min_run_time_s=timing["min_run_time"], rounds=timing["rounds"], retry_busy=args.retry_busy,
                busy_cores=BUSY_CORES, env=_env(),
                finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _run(args, device: torch.device, stem: Path) -> int:
    from tqdm import tqdm

    started, cpu_started, load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    machine = report.machine_info(device, args.threads)  # at the start: the code this run imported
    backends, skipped = runner.genfast_backends(device)
    # seconds of timed calls per row: 0.1 s on CUDA (do_bench's default); on the CPU 0.2 s (--quick) or 1 s
    min_run_time = 0.1 if device.type == "cuda" else 0.2 if args.quick else 1.0
    rounds = args.rounds or (5 if args.quick else 10)
    timing = dict(threads=args.threads, min_run_time=min_run_time, rounds=rounds)
    print(f"# commit {machine['commit']}, uncommitted-tree digest {machine['tree']}; torch {machine['torch']}, "
          f"CPU {machine['cpu']} ({machine['cores']} cores)")
    print(f"genfast bench on {device} ({args.threads} threads): genfast backends {backends}; skipped "
          + "; ".join(f"{k}: {runner.first_line(v)}" for k, v in skipped.items()))
    copy_bytes = (64 if args.quick else 256) * 2**20 if device.type == "cpu" else 2**30
    peak = copy_bandwidth(device, nbytes=copy_bytes, threads=args.threads, min_run_time=min_run_time)
    print(f"copy bandwidth (dst.copy_(src), {copy_bytes >> 20} MiB, counted 2x): {peak / 1e9:.2f} GB/s")

    try:
        tasks = _tasks(args, backends, device, timing)
    except ImportError as exc:  # --integrations without diffusers
        print(f"genfast bench: {exc}", file=sys.stderr)
        return 2
    rows = []
    with OtherLoad() as others:
        for task in tqdm(tasks, desc="genfast bench", unit="case", file=sys.stderr):
            rows += _measured(task, args.retry_busy)

    wall_s, cpu_s = time.perf_counter() - started, _cpu_seconds() - cpu_started
    recs = report.records(rows, peak)
    print(report.table(recs, launches=device.type == "cuda"))
    settings = dict(_settings(args, timing), wall_s=round(wall_s, 1), cpu_s=round(cpu_s, 1),
                    load_average_1min_at_start=load, load_average_1min_at_end=os.getloadavg()[0],
                    other_cores_mean=others.cores)
    info = dict(machine=machine, settings=settings, copy_bandwidth_gbps=peak / 1e9,
                backends=dict(timed=backends, skipped=skipped))
    report.write_json(stem.with_suffix(".json"), info, recs)
    report.write_csv(stem.with_suffix(".csv"), machine, recs)
    plots = report.plot(recs, peak / 1e9, stem)
    failed = sum(1 for r in recs if r["error"])
    busy = "" if others.cores is None else f"; other processes kept {others.cores:.1f} cores busy on average"
    print(f"{len(recs)} rows ({failed} failed) in {wall_s:.0f} s wall, {cpu_s:.0f} s CPU (this process and its "
          f"children; on a busy machine the CPU time is the better guide to the run's cost){busy}; wrote "
          + ", ".join(str(p) for p in [stem.with_suffix(".json"), stem.with_suffix(".csv"),
                                       stem.with_suffix(".log"), *plots]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is not None:
        args.command = command_line(argv)
    return run(args)
