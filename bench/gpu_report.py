"""The files of a ``make gpu-check`` run (bench/gpu_check.py), at most 8 of at most 16 MB each, in its folder:

- ``gpu-check.log``: everything every stage printed, with nvidia-smi, the versions and the commit (written as the
  run goes), and the summary last;
- ``gpu-check.json``: the run, the stages (status, exit code, seconds, timeout, commands), the environment, each
  stage's results (bench rows, test outcomes, the static and overhead reports) and the static predictions next to
  the measured times (genfast's rows, and the calibration kernels of bench/calibration.py with the copy sweep);
- ``gpu-check.csv``: one line per measurement, test and comparison, with a ``stage`` column;
- ``gpu-check-speedup.png``, ``gpu-check-bandwidth.png`` (bench/report.py's charts of the per-op rows, drawn by
  the ops stage), ``gpu-check-sampling.png`` (images/s) and ``gpu-check-static-vs-measured.png``; a chart with
  nothing to show is not written.

It imports neither torch nor genfast (only matplotlib, for two charts), so a broken build cannot lose the report.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import traceback
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

MAX_FILES, MAX_BYTES = 8, 16 * 2**20
BENCH_STAGES = ("ops", "ops-compile", "training", "training-compile")  # their rows are bench/report.py records
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # bench's dtype names -> the static's
OPS_PLOTS = {"ops-speedup.png": "gpu-check-speedup.png", "ops-bandwidth.png": "gpu-check-bandwidth.png"}


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return dict(error=f"{path.name} unreadable: {type(exc).__name__}: {exc}")


def junit_cases(path: Path) -> list[dict]:
    """pytest's JUnit XML as one dict per test: name, outcome (passed / failed / error / skipped), seconds and
    the first line of the message."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        return [dict(name="junit.xml", outcome="error", seconds=None, message=f"unreadable: {exc}")]
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        cases.append(dict(name=f"{case.get('classname', '')}::{case.get('name', '')}", outcome=outcome,
                          seconds=float(case.get("time") or 0), message=message))
    return cases


def collect(run) -> dict:
    """stage name -> what its folder holds: ``result`` (result.json), ``outputs`` (other JSON files: the static
    and overhead reports) and ``tests`` (junit.xml)."""
    results = {}
    for record in run.records:
        folder = run.work / record["name"]
        entry = {}
        if (folder / "result.json").is_file():
            entry["result"] = _load(folder / "result.json")
        outputs = {p.name: _load(p) for p in sorted(folder.glob("*.json")) if p.name != "result.json"}
        if outputs:
            entry["outputs"] = outputs
        if (folder / "junit.xml").is_file():
            entry["tests"] = junit_cases(folder / "junit.xml")
        if entry:
            results[record["name"]] = entry
    return results


def _rows(results: dict, stage: str) -> list[dict]:
    result = results.get(stage, {}).get("result")
    return list(result.get("rows", [])) if isinstance(result, dict) else []


def _output_rows(results: dict, stage: str) -> list[dict]:
    return [row for out in results.get(stage, {}).get("outputs", {}).values() if isinstance(out, dict)
            for row in out.get("rows", [])]


STATIC_FIELDS = {"op", "shape", "dtype", "direction"}  # what a static row needs to be matched (and layout, variant)


def static_rows(paths: list) -> tuple[list[dict], str | None]:
    """The rows (those with STATIC_FIELDS) of the newest readable ``static-sm90-*.json`` in the first of ``paths``
    (files or folders) that has one, and its path; ([], None) when none has."""
    for path in map(Path, paths):
        found = [path] if path.is_file() else sorted(path.glob("static-sm90-*.json"), key=lambda p: p.stat().st_mtime)
        for candidate in reversed(found):
            report = _load(candidate)
            if isinstance(report, dict) and isinstance(report.get("rows"), list):
                return [r for r in report["rows"] if isinstance(r, dict) and STATIC_FIELDS <= set(r)], str(candidate)
            print(f"gpu-check: {candidate} is not a static report", flush=True)
    return [], None


def static_key(row: dict) -> tuple:
    """A static row's (op, shape, variant, layout, dtype, direction), spelt as bench/ops.py spells them."""
    variant = row.get("variant", "-")
    return (row["op"], row["shape"], variant if variant == "-" else variant.replace("-", "_"),
            row.get("layout", "-").lower(), row["dtype"], row["direction"])


def measured_key(rec: dict) -> tuple:
    """A bench record's key, spelt as :func:`static_key` spells it."""
    return (rec["op"], rec["shape"], rec["variant"], rec["layout"], DTYPE_NAMES.get(rec["dtype"], rec["dtype"]),
            rec["mode"])


def static_vs_measured(results: dict, static_paths: list, gpu: str) -> dict:
    """Each static prediction (from the first of ``static_paths`` with a report: this run's static stage first)
    next to the measured genfast row of the same op, shape, layout, variant, dtype and direction (the Triton one
    where there are several)."""
    rows, source = static_rows(static_paths)
    measured = {}
    for rec in _rows(results, "ops"):
        if rec["impl"].startswith("genfast-") and rec["median_ms"] is not None and not rec["error"]:
            key = measured_key(rec)
            if key not in measured or rec["impl"] == "genfast-triton":
                measured[key] = rec
    kind = "h100" if "h100" in gpu.lower() else "h200"
    out = []
    for row in rows:
        rec = measured.get(static_key(row))
        predicted = row.get(f"predicted_us_{kind}")
        if rec is None or not predicted:
            continue
        measured_us = rec["median_ms"] * 1e3
        out.append(dict(op=row["op"], shape=row["shape"], layout=row.get("layout", "-"), dtype=row["dtype"],
                        variant=row.get("variant", "-"), direction=row["direction"], impl=rec["impl"],
                        predicted_for=kind, predicted_us=predicted, measured_us=measured_us,
                        measured_over_predicted=measured_us / predicted,
                        predicted_fraction=row.get(f"predicted_fraction_{kind}"),
                        measured_fraction=rec["fraction_of_peak"]))
    return dict(source=source, predicted_for=kind, static_rows=len(rows), matched=len(out), rows=out)


def _static_calibration(paths: list) -> list[dict]:
    """The "calibration" list of the newest static report in the first of ``paths`` that has one."""
    for path in map(Path, paths):
        found = [path] if path.is_file() else sorted(path.glob("static-sm90-*.json"), key=lambda p: p.stat().st_mtime)
        for candidate in reversed(found):
            report = _load(candidate)
            if isinstance(report, dict) and report.get("calibration"):
                return [p for p in report["calibration"] if isinstance(p, dict)]
    return []


def calibration_vs_measured(results: dict, static_paths: list, kind: str) -> list[dict]:
    """Each calibration kernel the calibration stage timed on this GPU, next to its published time (another GPU:
    the point's ``published_gpu``) and the static model's prediction for this GPU (``kind``: "h100" or "h200"); and
    the second of two dependent calls (measured twice − once)."""
    stage = results.get("calibration", {}).get("result") or {}
    predicted = {(p.get("kernel"), p.get("shape"), p.get("dtype")): p for p in _static_calibration(static_paths)}
    out = []
    for row in stage.get("points", []):
        if row.get("error") or row.get("measured_us") is None:
            continue
        point = predicted.get((row["kernel"], row["shape"], row["dtype"]), {})
        out.append(dict(row, second_call_us=row["measured_twice_us"] - row["measured_us"],
                        predicted_for=kind, predicted_us=point.get(f"predicted_us_{kind}"),
                        measured_over_predicted=(row["measured_us"] / point[f"predicted_us_{kind}"]
                                                 if point.get(f"predicted_us_{kind}") else None)))
    return out


def _csv_rows(results: dict, comparison: dict) -> list[dict]:
    rows = [dict(stage=stage, **r) for stage in (*BENCH_STAGES, "sampling") for r in _rows(results, stage)]
    rows += [dict(stage="overhead", **r) for r in _output_rows(results, "overhead")]
    rows += [dict(stage="tests", **case) for case in results.get("tests", {}).get("tests", [])]
    rows += [dict(stage="static-vs-measured", **r) for r in comparison["rows"]]
    rows += [dict(stage="calibration", **r) for r in comparison.get("calibration", [])]
    copies = (results.get("calibration", {}).get("result") or {}).get("copy", [])
    rows += [dict(stage="copy-sweep", **r) for r in copies]
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["stage"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})


# ---- plots -----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sampling(rows: list[dict], path: Path) -> bool:
    """Images/s per implementation, one bar each."""
    ok = [r for r in rows if r.get("images_per_s")]
    if not ok:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * len(ok)))
    ax.barh([r["impl"] for r in ok], [r["images_per_s"] for r in ok])
    ax.invert_yaxis()
    ax.set_xlabel("images/s")
    ax.set_title(f"DDIM sampling, {ok[0]['mode']}, {ok[0]['shape']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_static(rows: list[dict], path: Path) -> bool:
    """Measured against predicted µs per call (log-log), the diagonal where they agree."""
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for dtype in sorted({r["dtype"] for r in rows}):
        chosen = [r for r in rows if r["dtype"] == dtype]
        ax.scatter([r["predicted_us"] for r in chosen], [r["measured_us"] for r in chosen], label=dtype, s=14)
    values = [v for r in rows for v in (r["predicted_us"], r["measured_us"])]
    ax.plot([min(values), max(values)], [min(values), max(values)], color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted µs ({rows[0]['predicted_for']}, genfast bench --static)")
    ax.set_ylabel("measured µs (median)")
    ax.set_title("static prediction vs measured time, genfast rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plots(run, results: dict, comparison: dict) -> None:
    """The ops stage's charts copied under their final names, then the sampling and static-vs-measured charts."""
    for name, final in OPS_PLOTS.items():
        if (run.work / "ops" / name).is_file():
            shutil.copyfile(run.work / "ops" / name, run.out / final)
    plot_sampling(_rows(results, "sampling"), run.out / "gpu-check-sampling.png")
    plot_static(comparison["rows"], run.out / "gpu-check-static-vs-measured.png")


# ---- the summary and the files ---------------------------------------------------------------------------------


def summary(records: list[dict], results: dict, comparison: dict) -> list[str]:
    """The lines printed last: each stage's status, the test outcomes and the headline numbers."""
    lines = ["", "==== summary ====", f"{'stage':<18}{'status':<9}{'seconds':>8}  note"]
    for r in records:
        lines.append(f"{r['name']:<18}{r['status']:<9}{r.get('seconds', ''):>8}  {r.get('reason', '')}")
    tests = results.get("tests", {}).get("tests", [])
    if tests:
        counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
        lines.append("tests: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
        lines += [f"  {t['outcome']}: {t['name']}: {t['message']}" for t in tests
                  if t["outcome"] in ("failed", "error")]
    for r in _rows(results, "sampling"):
        value = f"{r['images_per_s']:.1f} images/s" if r.get("images_per_s") else f"error: {r.get('error')}"
        lines.append(f"sampling {r['impl']}: {value}")
    ops_rows = [r for r in _rows(results, "ops") if r.get("vs_eager") and r["impl"].startswith("genfast-")]
    if ops_rows:
        speedups = sorted(r["vs_eager"] for r in ops_rows)
        lines.append(f"ops: {len(ops_rows)} genfast rows, speed-up over eager min {speedups[0]:.2f}x, median "
                     f"{speedups[len(speedups) // 2]:.2f}x, max {speedups[-1]:.2f}x")
    lines.append(f"static vs measured: {comparison['matched']} of {comparison['static_rows']} predictions matched "
                 f"({comparison['source'] or 'no static report'})")
    for r in comparison.get("calibration", []):
        versus = f", {r['measured_over_predicted']:.2f}x predicted" if r["measured_over_predicted"] else ""
        lines.append(f"calibration {r['kernel']} {r['shape']} {r['dtype']}: {r['measured_us']:.1f} µs "
                     f"(published {r['published_us']:.1f} on {r['published_gpu']}{versus}; second dependent call "
                     f"{r['second_call_us']:.1f} µs)")
    copies = (results.get("calibration", {}).get("result") or {}).get("copy", [])
    if copies:
        lines.append("copy sweep: " + ", ".join(f"{c['megabytes']} MB {c['bandwidth_gbps']:.0f} GB/s" for c in copies))
    return lines


def _fit_log(path: Path) -> None:
    """Keeps the log under MAX_BYTES: its first and last halves, with a line saying what was cut."""
    data = path.read_bytes()
    if len(data) <= MAX_BYTES:
        return
    half = MAX_BYTES // 2 - 1024
    note = f"\n[gpu-check: {len(data) - 2 * half} bytes cut to keep the log under {MAX_BYTES >> 20} MB]\n".encode()
    path.write_bytes(data[:half] + note + data[-half:])


def write(run, stamp: datetime, command: str) -> int:
    """Writes gpu-check.json, .csv and the plots, prints the summary into the log; returns 0 when no stage
    failed or timed out, else 1. A failing step here is reported and loses neither the JSON nor the log."""
    results = collect(run)
    comparison = dict(source=None, predicted_for=None, static_rows=0, matched=0, rows=[])
    gpu = (results.get("info", {}).get("result") or {}).get("gpu") or "cpu"
    static_paths = [run.work / "static", *run.static_json, Path(__file__).resolve().parent / "results"]
    try:
        comparison = static_vs_measured(results, static_paths, gpu)
        comparison["calibration"] = calibration_vs_measured(results, static_paths, comparison["predicted_for"])
    except Exception:  # a broken comparison must not lose the run
        run.say("gpu-check: the comparison failed:\n" + traceback.format_exc())
    finished = datetime.now(timezone.utc)
    environment = results.pop("environment", {}).get("result")
    info = dict(run=dict(command=command, dry_run=run.dry_run, started_utc=stamp.isoformat(),
                         finished_utc=finished.isoformat(), wall_s=round((finished - stamp).total_seconds(), 1),
                         budget_s=run.budget_s, out=str(run.out), python=sys.executable, gpu=gpu),
                stages=run.records, environment=environment, results=results, static_vs_measured=comparison)
    (run.out / "gpu-check.json").write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
    write_csv(run.out / "gpu-check.csv", _csv_rows(results, comparison))
    try:
        _plots(run, results, comparison)
    except Exception:
        run.say("gpu-check: the plots failed:\n" + traceback.format_exc())
    for line in summary(run.records, results, comparison):
        run.say(line)
    files = sorted(p for p in run.out.iterdir() if p.is_file())
    run.say(f"wrote {len(files)} files into {run.out}: " + ", ".join(p.name for p in files))
    run.log.flush()
    _fit_log(run.out / "gpu-check.log")
    too_big = [p.name for p in files if p.stat().st_size > MAX_BYTES]
    if len(files) > MAX_FILES or too_big:
        print(f"gpu-check: more than {MAX_FILES} files, or files over {MAX_BYTES >> 20} MB ({too_big}), in "
              f"{run.out}", file=sys.stderr)
        return 1
    return 0 if all(r["status"] in ("ok", "skipped") for r in run.records) else 1
