"""Derived figures (bandwidth, fraction of peak, speed-ups), the terminal table, the JSON and CSV files and the
plots of one run."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from genfast._machine import cpu_model

from .runner import COMPILE, EAGER, Row

BENCH_DIR = Path(__file__).resolve().parent


def _git_commit() -> Optional[str]:
    """HEAD of the checkout bench/ lives in, with "-dirty" when tracked files differ from it; None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _tree_digest() -> Optional[str]:
    """A short SHA-256 of the uncommitted state of the checkout (``git diff HEAD`` plus the untracked files, the
    committed results left out): two runs with the same commit and digest measured the same code. None outside git."""
    try:
        root = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        git, results = ["git", "-C", root], ":(exclude)bench/results"  # pathspecs relative to the root
        diff = subprocess.run(git + ["diff", "HEAD", "--binary", "--", results], capture_output=True, check=True,
                              timeout=60).stdout
        untracked = subprocess.run(git + ["ls-files", "--others", "--exclude-standard", "-z", "--", results],
                                   capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    digest = hashlib.sha256(diff)
    for name in sorted(n for n in untracked.decode().split("\0") if n):
        path = Path(root) / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:12]


def machine_info(device: torch.device, threads: int) -> dict:
    """CPU model and cores, GPU name, torch / Triton versions, git commit and the digest of uncommitted changes,
    timing threads."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # Triton is optional off Linux
        triton_version = None
    return dict(
        device=str(device), cpu=cpu_model(), cores=os.cpu_count(), threads=threads,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        torch=torch.__version__, triton=triton_version, python=platform.python_version(), commit=_git_commit(),
        tree=_tree_digest(),
    )


def device_tag(device: torch.device) -> str:
    """"cpu", or the GPU's name as a file-name slug (e.g. "nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


@dataclass
class Figures:
    """A row's derived figures (None where not defined: failed rows, end-to-end rows have no bytes)."""

    gbps: Optional[float]
    fraction_of_peak: Optional[float]
    vs_eager: Optional[float]
    vs_compile: Optional[float]
    steps_per_s: Optional[float]


def figures(rows: list[Row], peak_bandwidth: float) -> list[Figures]:
    """Bandwidth = bytes / median; fraction of the copy bandwidth; speed-up = baseline median / median (> 1:
    faster than eager / compile on the same case); steps/s = 1 / median for training steps."""
    medians = {(r.case, r.impl): r.median_s for r in rows if r.median_s}
    out = []
    for r in rows:
        if not r.median_s:
            out.append(Figures(None, None, None, None, None))
            continue
        rate = r.bytes / r.median_s if r.bytes else None
        eager, compiled = medians.get((r.case, EAGER)), medians.get((r.case, COMPILE))
        out.append(Figures(
            gbps=rate / 1e9 if rate else None,
            fraction_of_peak=rate / peak_bandwidth if rate else None,
            vs_eager=eager / r.median_s if eager else None,
            vs_compile=compiled / r.median_s if compiled else None,
            steps_per_s=1.0 / r.median_s if not r.bytes else None,
        ))
    return out


def _record(row: Row, fig: Figures) -> dict:
    c = row.case
    return dict(
        op=c.op, variant=c.variant, layout=c.layout, shape="x".join(map(str, c.shape)),
        dtype=str(c.dtype).removeprefix("torch."), mode=c.mode, impl=row.impl, bytes=row.bytes or None,
        median_ms=_scaled(row.median_s, 1e3), iqr_ms=_scaled(row.iqr_s, 1e3), runs=row.runs, gbps=fig.gbps,
        fraction_of_peak=fig.fraction_of_peak, vs_eager=fig.vs_eager, vs_compile=fig.vs_compile,
        steps_per_s=fig.steps_per_s, peak_memory_mb=_scaled(row.peak_memory_bytes, 2.0 ** -20),
        kernel_launches=row.kernel_launches, first_call_s=row.first_call_s, load_average=row.load_average,
        other_cores=row.other_cores, attempts=row.attempts,
        error=row.error,
    )


def _scaled(value, factor):
    return None if value is None else value * factor


def records(rows: list[Row], peak_bandwidth: float) -> list[dict]:
    return [_record(r, f) for r, f in zip(rows, figures(rows, peak_bandwidth))]


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


TABLE_COLUMNS = ("case", "impl", "median ms", "IQR ms", "GB/s", "% peak", "x eager", "x compile", "steps/s",
                 "peak MB", "others", "launches")


def table(recs: list[dict], *, launches: bool) -> str:
    """The terminal table: one line per row, failed rows show their error."""
    columns = TABLE_COLUMNS if launches else TABLE_COLUMNS[:-1]
    lines = []
    for r in recs:
        parts = [r["variant"], r["layout"]]
        case = "/".join([r["op"]] + [p for p in parts if p != "-"]) + f" {r['shape']} {r['mode']}"
        if r["error"]:
            lines.append((case, r["impl"], f"error: {r['error']}"))
            continue
        cells = (case, r["impl"], _fmt(r["median_ms"], ".3f"), _fmt(r["iqr_ms"], ".3f"), _fmt(r["gbps"], ".2f"),
                 _fmt(r["fraction_of_peak"] and 100 * r["fraction_of_peak"], ".0f"), _fmt(r["vs_eager"], ".2f"),
                 _fmt(r["vs_compile"], ".2f"), _fmt(r["steps_per_s"], ".2f"), _fmt(r["peak_memory_mb"], ".1f"),
                 _fmt(r["other_cores"], ".1f"), _fmt(r["kernel_launches"], "d"))
        lines.append(cells[:len(columns)])
    widths = [max([len(columns[i])] + [len(l[i]) for l in lines if len(l) == len(columns)])
              for i in range(len(columns))]
    out = ["  ".join(h.ljust(w) for h, w in zip(columns, widths))]
    for line in lines:
        if len(line) == len(columns):
            out.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                 for i, (cell, w) in enumerate(zip(line, widths))))
        else:
            out.append(f"{line[0].ljust(widths[0])}  {line[1].ljust(widths[1])}  {line[2]}")
    return "\n".join(out)


def write_json(path: Path, info: dict, recs: list[dict]) -> None:
    path.write_text(json.dumps(dict(info, rows=recs), indent=1) + "\n", encoding="utf-8")


MACHINE_COLUMNS = ("device", "cpu", "cores", "threads", "gpu", "torch", "triton", "commit", "tree")


def write_csv(path: Path, machine: dict, recs: list[dict]) -> None:
    """One line per row; the machine's fields repeat on every line so that each line stands alone."""
    fields = list(MACHINE_COLUMNS) + list(recs[0].keys()) if recs else list(MACHINE_COLUMNS)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in recs:
            writer.writerow({**{k: machine.get(k) for k in MACHINE_COLUMNS}, **r})


def _case_label(r: dict) -> str:
    parts = [p for p in (r["variant"], r["layout"]) if p != "-"]
    return " ".join([r["op"]] + parts + [r["shape"], r["mode"]])


def _bar_chart(ok: list[dict], key: str, title: str, xlabel: str, line: tuple, path: Path) -> None:
    """One horizontal bar chart (log scale) of ``key`` per case label and implementation, a vertical line at
    ``line`` = (x, label or None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(_case_label(r) for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.14 * len(labels) * max(2, len(impls))))
    height = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        values = {_case_label(r): r[key] for r in ok if r["impl"] == impl}
        ys = [i + j * height for i, lab in enumerate(labels) if values.get(lab) is not None]
        xs = [values[lab] for lab in labels if values.get(lab) is not None]
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    x, label = line
    ax.axvline(x, color="black", linestyle="-" if label is None else "--", linewidth=0.8, label=label)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(recs: list[dict], peak_gbps: float, stem: Path) -> list[Path]:
    """Up to two horizontal bar charts per run (matplotlib Agg, log scale): ``…-speedup.png``, the speed-up over
    eager per case and implementation (every row with an eager baseline: ops, training steps, diffusers models),
    and ``…-bandwidth.png``, the achieved bandwidth of the per-op rows with the measured copy bandwidth as a line.
    A chart with nothing to show is not written. Returns the PNG paths."""
    ok = [r for r in recs if not r["error"] and r["median_ms"] is not None]
    speedups = [r for r in ok if r["impl"] != EAGER and r["vs_eager"] is not None]
    bandwidths = [r for r in ok if r["gbps"] is not None]
    paths = []
    for chosen, key, title, xlabel, line, name in (
        (speedups, "vs_eager", "speed-up over eager PyTorch (>1 is faster)", "eager time / time", (1.0, None),
         "speedup"),
        (bandwidths, "gbps", "achieved bandwidth (minimal bytes / median time)", "GB/s",
         (peak_gbps, f"copy {peak_gbps:.1f} GB/s"), "bandwidth"),
    ):
        if chosen:
            path = stem.with_name(f"{stem.name}-{name}.png")
            _bar_chart(chosen, key, title, xlabel, line, path)
            paths.append(path)
    return paths
