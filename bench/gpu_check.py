"""``make gpu-check``: one validation run on a GPU machine, ready for the first issue that is lent one.

``python -m bench.gpu_check [--dry-run] [--out DIR]`` (from the repository root, with the machine's own python: no
venv, nothing downloaded) runs the stages of :data:`STAGES` in order of value, each in its own process under its
own timeout, the whole within ``--budget-s`` (8 minutes), going on past a failing or timed-out stage; a stage left
without time is skipped. It writes everything — the raw log (every stage's output, ``nvidia-smi``, the versions and
the commit), one JSON, one CSV and the plots — into ``bench/results/<gpu>-<date>/``, at most 8 files of at most
16 MB (bench/gpu_report.py). ``--dry-run`` runs the same stages on the CPU with tiny shapes (no install, no
Inductor compiles, no sm_90 compiles) into a temporary folder: CI runs it (tests/test_gpu_check.py).

This module and its report use the standard library only (and matplotlib for two charts): the install stage
builds genfast first, and a broken build cannot lose the report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0  # the whole run on an H200
REPORT_RESERVE_S = 20.0  # kept back for the report
MIN_STAGE_S = 10.0  # a stage is skipped when less than this is left of the budget
WAIT_FOR_BACKGROUND_S = 30.0  # how long a stage that uses a background stage's output waits for it
OPS_MARGIN_S = 15.0  # the ops stage stops starting cases this long before its timeout
TEST_TIMEOUT_S = 120  # one test of tests/test_gpu.py (with pytest-timeout)
SOURCE_FOLDERS = ("genfast", "kernels", "csrc", "bench", "tests")
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".cu"}
WHEELS = ROOT / ".whl"  # wheels carried to a machine without network (ignored by git); installed by the install stage


Commands = Callable[["Run", Path, float], list]


@dataclass(frozen=True)
class Stage:
    """A stage: ``commands(run, folder, timeout_s)`` gives the command lines it runs in turn, all within
    ``timeout_s``, its files in ``folder`` (its own, under the run's scratch folder);
    ``dry_run_skip`` says why the dry run skips it (None: it runs there too); a ``background`` stage is started
    and left running beside the next ones, and joined before the report; a stage that ``waits_for`` one waits up
    to WAIT_FOR_BACKGROUND_S for it to finish before it starts; a stage that ``needs_install`` is skipped, with the
    install stage's last line as the reason, where that stage failed or timed out."""

    name: str
    timeout_s: float
    commands: Commands
    dry_run_skip: Optional[str] = None
    background: bool = False
    waits_for: Optional[str] = None
    needs_install: bool = True


@dataclass
class Run:
    """One gpu-check run: its settings, scratch folder, log and the stages' records."""

    out: Path
    work: Path
    dry_run: bool
    budget_s: float
    static_json: list
    commit: Optional[str]
    log: object = None
    started: float = 0.0
    records: list = None

    @property
    def python(self) -> str:
        return sys.executable

    def folder(self, stage: str) -> Path:
        path = self.work / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started) - REPORT_RESERVE_S

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()


def _stage_module(stage: str, *extra: str) -> Commands:
    """The commands of a stage of bench/gpu_stages.py."""
    def commands(run: Run, folder: Path, timeout_s: float) -> list:
        return [[run.python, "-m", "bench.gpu_stages", stage, "--dir", str(folder)]
                + (["--dry-run"] if run.dry_run else []) + list(extra)]
    return commands


def _environment(run: Run, folder: Path, timeout_s: float) -> list:
    return [[run.python, "-m", "bench.gpu_check", "--environment", str(folder)]
            + (["--commit", run.commit] if run.commit else [])]


def _install(run: Run, folder: Path, timeout_s: float) -> list:
    """The prerequisites first (one line naming what is missing), the wheels carried in WHEELS (the calibration
    stage's liger-kernel: the GPU machine has no network), then the offline editable install."""
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    return ([[run.python, "-m", "bench.gpu_check", "--prerequisites"]]
            + ([[run.python, "-m", "pip", "install", "--no-index", "--no-deps", *wheels]] if wheels else [])
            + [[run.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]])


def _static(run: Run, folder: Path, timeout_s: float) -> list:
    return [[run.python, "-m", "genfast", "bench", "--static", "--quick", "--out", str(folder)]]


def _tests(run: Run, folder: Path, timeout_s: float) -> list:
    """pytest on tests/test_gpu.py: -v, so that the log has each outcome even when the stage is cut off (the JUnit
    XML is written at the end); pytest-xdist workers (they compile the Triton kernels in parallel) and a per-test
    timeout where those plugins are installed."""
    workers = min(8, (os.cpu_count() or 1) // 2)
    plugins = (["-n", str(workers)] if workers > 1 and _importable("xdist") else []) + (
        [f"--timeout={TEST_TIMEOUT_S}"] if _importable("pytest_timeout") else [])
    return [[run.python, "-m", "pytest", "tests/test_gpu.py", "-v", "-rfEs", "-p", "no:cacheprovider",
             "--junitxml", str(folder / "junit.xml")] + plugins]


def _ops(compile_too: bool = False) -> Commands:
    """The ops stage's commands (with torch.compile, on the cases the ops stage timed): it stops starting cases
    OPS_MARGIN_S before its timeout."""
    def commands(run: Run, folder: Path, timeout_s: float) -> list:
        extra = ["--compile", "--cases-from", str(run.folder("ops") / "result.json")] if compile_too else []
        static = [run.folder("static"), *run.static_json, ROOT / "bench" / "results"]
        return _stage_module("ops", *extra, "--budget-s", f"{max(1.0, timeout_s - OPS_MARGIN_S):.0f}",
                             "--static-json", *map(str, static))(run, folder, timeout_s)
    return commands


def _overhead(run: Run, folder: Path, timeout_s: float) -> list:
    return [[run.python, "-m", "genfast", "bench", "--overhead", "--out", str(folder)]
            + (["--quick"] if run.dry_run else [])]


NO_INDUCTOR = "dry run: Inductor compiles take minutes on a CPU"
# In order of value: the environment and the build first (everything needs them), the correctness tests, then
# the timings. The static report compiles on the CPU only, so it runs beside the tests and timings.
STAGES = (
    Stage("environment", 60, _environment, needs_install=False),
    Stage("install", 240, _install, dry_run_skip="dry run: CI's venv has genfast installed (make install)",
          needs_install=False),
    Stage("info", 60, _stage_module("info")),
    Stage("static", 360, _static, background=True,
          dry_run_skip="dry run: the sm_90 compiles take minutes on a CPU (tests/test_static.py checks the report)"),
    Stage("tests", 180, _tests),
    Stage("ops", 100, _ops(), waits_for="static"),  # its shapes are the static report's
    Stage("calibration", 90, _stage_module("calibration")),  # the static model's calibration kernels, a copy sweep
    Stage("sampling", 100, _stage_module("sampling")),
    Stage("training", 60, _stage_module("training")),
    Stage("overhead", 60, _overhead),
    Stage("ops-compile", 100, _ops(compile_too=True), dry_run_skip=NO_INDUCTOR),
    Stage("training-compile", 100, _stage_module("training", "--compile"), dry_run_skip=NO_INDUCTOR),
)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _env(run: Run) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", MAX_JOBS=str(os.cpu_count() or 1))
    if run.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
    return env


def _start(run: Run, command: list, output) -> subprocess.Popen:
    # its own process group, so that a timeout ends its children too (pytest workers, compiler jobs)
    return subprocess.Popen(command, cwd=ROOT, env=_env(run), stdout=output, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """Ends ``process`` and its process group (:func:`_start` made one): SIGTERM, up to 5 s for it to exit, then
    SIGKILL to whatever is left of the group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _pump(stream, run: Run, last: list) -> None:
    for line in stream:
        run.say(line.rstrip("\n"))
        if line.strip():
            last[:] = [line.strip()]


def _run_command(run: Run, command: list, deadline: float) -> tuple[str, Optional[int], str]:
    """(status, rc, its last line of output) of one command, its output streamed into the log; "timeout" when
    ``deadline`` passes."""
    run.say(f"$ {' '.join(command)}")
    try:
        process = _start(run, command, subprocess.PIPE)
    except OSError as exc:
        run.say(f"gpu-check: cannot start it: {exc}")
        return "failed", None, f"cannot start {command[0]}: {exc}"
    last = [""]
    pump = threading.Thread(target=_pump, args=(process.stdout, run, last), daemon=True)
    pump.start()
    try:
        rc = process.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        _stop(process)
        pump.join(timeout=5)
        return "timeout", None, last[0]
    pump.join(timeout=5)
    return ("ok" if rc == 0 else "failed"), rc, last[0]


def _record(stage: Stage, status: str, **fields) -> dict:
    return dict(name=stage.name, status=status, **fields)


def run_stage(run: Run, stage: Stage) -> dict:
    """Runs a foreground stage (or skips it) and returns its record; never raises for the stage's own failure."""
    if run.dry_run and stage.dry_run_skip:
        return _record(stage, "skipped", reason=stage.dry_run_skip)
    if run.left_s() < MIN_STAGE_S:
        return _record(stage, "skipped", reason=f"no time left in the {run.budget_s:.0f} s budget")
    timeout_s = min(stage.timeout_s, run.left_s())
    run.say(f"\n==== {stage.name} (timeout {timeout_s:.0f} s) ====")
    start = time.perf_counter()
    deadline = start + timeout_s
    status, rc, last, commands = "ok", 0, "", stage.commands(run, run.folder(stage.name), timeout_s)
    for command in commands:
        status, rc, last = _run_command(run, command, deadline)
        if status != "ok":
            break
    seconds = time.perf_counter() - start
    run.say(f"---- {stage.name}: {status} in {seconds:.1f} s" + (f" (exit code {rc})" if rc else ""))
    return _record(stage, status, rc=rc, seconds=round(seconds, 1), timeout_s=round(timeout_s),
                   commands=[" ".join(c) for c in commands], **({"last_line": last} if status != "ok" else {}))


class Background:
    """A background stage: started now with its output to a file, joined (or ended at its deadline) later."""

    def __init__(self, run: Run, stage: Stage):
        self.run, self.stage = run, stage
        self.timeout_s = min(stage.timeout_s, run.left_s())
        self.start = time.perf_counter()
        self.commands = stage.commands(run, run.folder(stage.name), self.timeout_s)
        self.output = run.folder(stage.name) / "output.log"
        self.file = open(self.output, "w", encoding="utf-8")
        run.say(f"\n==== {stage.name}: started in the background (timeout {self.timeout_s:.0f} s): "
                f"{' '.join(self.commands[0])}")
        self.process = _start(run, self.commands[0], self.file)

    def wait(self, seconds: float) -> None:
        """Waits up to ``seconds`` for the stage to finish, leaving it running after that."""
        try:
            self.process.wait(timeout=max(0.0, seconds))
        except subprocess.TimeoutExpired:
            self.run.say(f"gpu-check: {self.stage.name} still runs after {seconds:.0f} s; going on without it")

    def join(self) -> dict:
        remaining = self.start + self.timeout_s - time.perf_counter()
        try:
            rc = self.process.wait(timeout=max(0.0, min(remaining, self.run.left_s() + REPORT_RESERVE_S / 2)))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(self.process)
            status, rc = "timeout", None
        self.file.close()
        seconds = time.perf_counter() - self.start
        self.run.say(f"\n==== {self.stage.name} (background) output ====\n"
                     + self.output.read_text(encoding="utf-8", errors="replace").rstrip())
        self.run.say(f"---- {self.stage.name}: {status} in {seconds:.1f} s" + (f" (exit code {rc})" if rc else ""))
        return _record(self.stage, status, rc=rc, seconds=round(seconds, 1), timeout_s=round(self.timeout_s),
                       commands=[" ".join(c) for c in self.commands])


def _install_failure(records: dict) -> Optional[str]:
    """Why the stages that need the install cannot run (None: the install ran, was skipped or has not run yet)."""
    install = records.get("install")
    if install is None or install["status"] not in ("failed", "timeout"):
        return None
    return f"the install stage {install['status']}: {install.get('last_line') or 'see the log'}"


def run_stages(run: Run, stages=STAGES) -> list[dict]:
    """Every stage in order (background ones beside the rest); a list of records in the order of ``stages``."""
    records, background = {}, {}
    for stage in stages:
        failure = _install_failure(records) if stage.needs_install else None
        if failure is not None:
            run.say(f"\n==== {stage.name}: skipped ({failure})")
            records[stage.name] = _record(stage, "skipped", reason=failure)
            continue
        if stage.background and not (run.dry_run and stage.dry_run_skip) and run.left_s() >= MIN_STAGE_S:
            background[stage.name] = Background(run, stage)
            continue
        if stage.waits_for in background:
            background[stage.waits_for].wait(min(WAIT_FOR_BACKGROUND_S, run.left_s() - MIN_STAGE_S))
        records[stage.name] = run_stage(run, stage)
    for name, job in background.items():
        records[name] = job.join()
    return [records[stage.name] for stage in stages]


# ---- the environment stage -------------------------------------------------------------------------------------


def _output(command: list) -> str:
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({command[0]}: {exc})"
    return (done.stdout + done.stderr).rstrip() or f"(exit code {done.returncode}, no output)"


def source_digest() -> str:
    """A short SHA-256 of the sources (genfast/, kernels/, csrc/, bench/, tests/): with no git checkout on the GPU
    machine, it ties a run to the code it ran."""
    digest = hashlib.sha256()
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and "results" not in path.parts:
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(folder: Path, commit: Optional[str]) -> int:
    """Prints and saves (``folder/result.json``) nvidia-smi, the commit, the source digest, the machine and the
    Python packages."""
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,clocks.mem,power.limit,temperature.gpu"
    has_smi = shutil.which("nvidia-smi") is not None
    head = _output(["git", "rev-parse", "HEAD"])
    data = dict(
        nvidia_smi=_output(["nvidia-smi"]) if has_smi else "(no nvidia-smi)",
        gpus=_output(["nvidia-smi", f"--query-gpu={query}", "--format=csv"]) if has_smi else "(no nvidia-smi)",
        commit=commit or (head if re.fullmatch(r"[0-9a-f]{40}", head) else None),
        git=_output(["git", "log", "-1", "--format=%H %cI %s"]), git_status=_output(["git", "status", "--short"]),
        source_digest=source_digest(), python=sys.version, platform=platform.platform(), cores=os.cpu_count(),
        packages=_output([sys.executable, "-m", "pip", "list", "--format=freeze"]).splitlines(),
    )
    for key, value in data.items():
        text = "\n".join(value) if isinstance(value, list) else str(value)
        print(f"{key}:" + ("\n" + text if "\n" in text else f" {text}"))
    (folder / "result.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 0


# ---- the install stage's prerequisites ---------------------------------------------------------------------------

SETUPTOOLS_EDITABLE = (64,)  # the first setuptools with PEP 660 editable installs (no setup.py develop)
SETUPTOOLS_OWN_WHEEL = (70, 1)  # the first that builds wheels without the wheel package


def _version(distribution: str) -> Optional[tuple]:
    from importlib import metadata

    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version(distribution))[:3])
    except metadata.PackageNotFoundError:
        return None


def _cuda_skip_reason() -> str:
    """Why the CUDA C++ kernels would not be built here ("" where they would), by the build's own check
    (genfast/cpp/__init__.py, loaded by path as setup.py does: genfast itself may not import yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_genfast_cpp_build", ROOT / "genfast" / "cpp" / "__init__.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.cuda_skip_reason() or ""


def missing_prerequisites() -> tuple[list[str], list[str]]:
    """(what the offline ``pip install --no-deps --no-build-isolation -e .`` cannot do without, what it builds
    without at a cost), each item a short phrase with the fix."""
    import importlib.util
    import sysconfig

    missing, degraded = [], []
    if _version("pip") is None:  # (not find_spec("pip"): setuptools' distutils shim turns itself off on that)
        missing.append("pip (python -m ensurepip)")
    setuptools = _version("setuptools")
    if setuptools is None or setuptools < SETUPTOOLS_EDITABLE:
        missing.append(f"setuptools >= 64 ({'none' if setuptools is None else '.'.join(map(str, setuptools))} "
                       "installed)")
    elif setuptools < SETUPTOOLS_OWN_WHEEL and _version("wheel") is None:
        missing.append("wheel (setuptools < 70.1 needs it)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler} is not on PATH; set CXX)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("the Python headers (Python.h)")
    if importlib.util.find_spec("torch") is None:
        missing.append("torch")
        return missing, degraded
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        degraded.append("ninja (the build runs one compile at a time)")
    cuda = _cuda_skip_reason()
    if cuda:
        degraded.append(f"the CUDA C++ kernels ({cuda}; the Triton and C++ CPU kernels are still built)")
    return missing, degraded


def prerequisites() -> int:
    """The install stage's first command: one line, and exit code 1 where the install cannot work."""
    missing, degraded = missing_prerequisites()
    if degraded:
        print("gpu-check install: building without " + "; ".join(degraded))
    if missing:
        print("gpu-check install: missing " + "; ".join(missing))
        return 1
    print("gpu-check install: prerequisites present")
    return 0


# ---- the run ---------------------------------------------------------------------------------------------------


def gpu_name() -> str:
    """The first GPU's name as a file-name slug (e.g. "nvidia-h200"), "cpu" without nvidia-smi or a GPU."""
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    name = _output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if slug and "nvidia-smi" not in name and "(" not in name else "cpu"


def _out(args, stamp: datetime) -> Path:
    if args.out is not None:
        return args.out
    if args.dry_run:
        return Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))
    return ROOT / "bench" / "results" / f"{gpu_name()}-{stamp:%Y%m%d-%H%M%S}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny shapes (CI)")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<gpu>-<date>/; a "
                                                 "temporary folder with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time for the whole run (default 480)")
    parser.add_argument("--static-json", type=Path, action="append", default=[],
                        help="a static report (or folder of them) to use when this run's static stage made none")
    parser.add_argument("--commit", help="the commit this tree is (where it is no git checkout)")
    parser.add_argument("--environment", type=Path, help=argparse.SUPPRESS)  # the environment stage itself
    parser.add_argument("--prerequisites", action="store_true", help=argparse.SUPPRESS)  # the install's first step
    args = parser.parse_args(argv)
    if args.environment is not None:
        return environment(args.environment, args.commit)
    if args.prerequisites:
        return prerequisites()
    stamp = datetime.now(timezone.utc)
    out = _out(args, stamp)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-stages-") as work, \
            open(out / "gpu-check.log", "w", encoding="utf-8") as log:
        run = Run(out=out, work=Path(work), dry_run=args.dry_run, budget_s=args.budget_s,
                  static_json=args.static_json, commit=args.commit, log=log, started=time.perf_counter())
        run.say(f"# gpu-check{' --dry-run' if args.dry_run else ''} started {stamp.isoformat(timespec='seconds')} "
                f"into {out}; budget {args.budget_s:.0f} s; python {sys.executable}")
        run.records = run_stages(run)
        from . import gpu_report

        return gpu_report.write(run, stamp, "python -m bench.gpu_check " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
