"""``make gpu-check``, kept from rotting on a machine without a GPU: ``make gpu-check DRY_RUN=1`` runs every stage
on the CPU with tiny shapes and must produce the same files; the stage runner's timeouts, failures and budget; and
the ``genfast bench`` modes the run calls."""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genfast.bench import cli, gpu_check, gpu_stages

ROOT = Path(__file__).resolve().parent.parent
FILES = {"gpu-check.log", "gpu-check.json", "gpu-check.csv", "gpu-check-speedup.png", "gpu-check-bandwidth.png",
         "gpu-check-sampling.png", "gpu-check-static-vs-measured.png"}


def _static_report(path: Path) -> Path:
    """A static report whose rows are two of the dry run's cases and one it does not time."""
    predicted = dict(predicted_us_h200=2.0, predicted_us_h100=3.0, predicted_fraction_h200=0.9,
                     predicted_fraction_h100=0.9)
    rows = [dict(op="group_norm_silu", shape="2x64x4x4", layout="NHWC", dtype="bf16", variant="plain",
                 direction="forward", **predicted),
            dict(op="reparameterize_kl", shape="8x16", layout="-", dtype="fp32", variant="-", direction="backward",
                 **predicted),
            dict(op="q_sample", shape="64x3x64x64", layout="-", dtype="fp32", variant="-", direction="forward",
                 **predicted)]
    path.write_text(json.dumps(dict(info={}, rows=rows)))
    return path


def test_make_gpu_check_dry_run(tmp_path):
    """Every stage that the dry run does not skip succeeds, and the run writes its files (at most 8, at most
    16 MB each): bench rows of every kind, the tests' outcomes, the static predictions next to measured times."""
    out = tmp_path / "out"
    static = _static_report(tmp_path / "static-sm90-test.json")
    done = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}",
                           f"GPU_CHECK_ARGS=--static-json {static}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == FILES
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    data = json.loads((out / "gpu-check.json").read_text())
    stages = {s["name"]: s["status"] for s in data["stages"]}
    assert list(stages) == [s.name for s in gpu_check.STAGES]
    assert stages == {s.name: "skipped" if s.dry_run_skip else "ok" for s in gpu_check.STAGES}
    results = data["results"]
    assert results["tests"]["tests"] and all(t["outcome"] == "skipped" for t in results["tests"]["tests"])
    ops = results["ops"]["result"]["rows"]
    assert not [r["error"] for r in ops if r["error"]]
    assert {(r["op"], r["dtype"]) for r in ops} == {(op, dtype) for op in ("group_norm_silu", "reparameterize_kl",
                                                                          "q_sample", "ddim_step")
                                                    for dtype in ("float32", "bfloat16")}
    assert {r["impl"] for r in ops} >= {"eager"} and any(r["impl"].startswith("genfast-") for r in ops)
    (tmp_path / "ops.json").write_text(json.dumps(results["ops"]["result"]))  # what ops-compile times again
    dry_cases = [(c.op, c.shape, c.mode, c.variant, c.layout) for c in gpu_stages.DRY_CASES]
    assert gpu_stages._measured_cases(tmp_path / "ops.json") == gpu_stages._in_dtypes(dry_cases)
    sampling = {r["impl"]: r for r in results["sampling"]["result"]["rows"]}
    assert set(sampling) == {"genfast", "genfast+graphs", "eager", "compile(eager)"}
    assert all(r["images_per_s"] > 0 for r in sampling.values())
    assert sampling["genfast+graphs"]["max_abs_diff_vs_genfast"] == 0.0
    training = results["training"]["result"]["rows"]
    assert {r["op"] for r in training} == {"train/vae", "train/wgan_gp", "train/ddpm"}
    assert not [r["error"] for r in training if r["error"]]
    assert any(out_["rows"] for out_ in results["overhead"]["outputs"].values())
    comparison = data["static_vs_measured"]
    assert (comparison["static_rows"], comparison["matched"]) == (3, 2)
    assert data["environment"]["source_digest"] and data["environment"]["packages"]
    with open(out / "gpu-check.csv", newline="") as f:
        kinds = {row["stage"] for row in csv.DictReader(f)}
    assert kinds == {"ops", "training", "sampling", "overhead", "tests", "static-vs-measured", "copy-sweep"}
    assert all(r["megabytes"] > 0 and r["bandwidth_gbps"] > 0 for r in results["calibration"]["result"]["copy"])
    log = (out / "gpu-check.log").read_text()
    assert "nvidia_smi:" in log and log.rstrip().splitlines()[-1].startswith("wrote 7 files")


def _run(tmp_path, budget_s=60.0) -> gpu_check.Run:
    log = open(tmp_path / "log", "w")
    return gpu_check.Run(out=tmp_path, work=tmp_path / "work", dry_run=False, budget_s=budget_s, static_json=[],
                         commit=None, log=log, started=time.perf_counter())


def _python(code: str):
    return lambda run, folder, timeout_s: [[sys.executable, "-c", code]]


def test_a_failing_or_hanging_stage_does_not_stop_the_run(tmp_path):
    """A failing stage is recorded and the next runs; a hanging one is ended at its timeout with its children (its
    process group); a background stage runs beside the others; a stage left without budget is skipped."""
    hang = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    stages = (gpu_check.Stage("fails", 30, _python("import sys; print('boom'); sys.exit(3)")),
              gpu_check.Stage("beside", 30, _python("import time; time.sleep(1); print('done')"), background=True),
              gpu_check.Stage("hangs", 2, _python(hang)),
              gpu_check.Stage("runs", 30, _python("print('after')")))
    run = _run(tmp_path)
    start = time.perf_counter()
    records = {r["name"]: r for r in gpu_check.run_stages(run, stages)}
    assert time.perf_counter() - start < 20
    assert [r["status"] for r in records.values()] == ["failed", "ok", "timeout", "ok"]
    assert records["fails"]["rc"] == 3
    run.log.close()
    log = (tmp_path / "log").read_text()
    assert "boom" in log and "after" in log and "done" in log
    spent = _run(tmp_path, budget_s=gpu_check.REPORT_RESERVE_S)  # nothing left beyond the report's reserve
    (record,) = gpu_check.run_stages(spent, stages[-1:])
    assert record["status"] == "skipped" and "no time left" in record["reason"]


def test_a_failed_install_skips_the_stages_that_need_it(tmp_path):
    """The stages after a failed install are skipped with its last line as the reason (background ones too),
    instead of failing one by one; the stages that do not need it still run."""
    fail = "import sys; print('gpu-check install: missing setuptools >= 64 (none installed)'); sys.exit(1)"
    stages = (gpu_check.Stage("environment", 30, _python("print('env')"), needs_install=False),
              gpu_check.Stage("install", 30, _python(fail), needs_install=False),
              gpu_check.Stage("static", 30, _python("print('static')"), background=True),
              gpu_check.Stage("tests", 30, _python("print('tests')")))
    run = _run(tmp_path)
    records = {r["name"]: r for r in gpu_check.run_stages(run, stages)}
    assert [r["status"] for r in records.values()] == ["ok", "failed", "skipped", "skipped"]
    for name in ("static", "tests"):
        assert records[name]["reason"] == ("the install stage failed: gpu-check install: missing setuptools >= 64 "
                                           "(none installed)")


def test_the_install_stage_names_a_missing_prerequisite_in_one_line(tmp_path):
    """The install stage's first command exits 1 with one line naming what is missing (here the C++ compiler)."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--prerequisites"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if "missing" in line]
    assert done.returncode == 1, done.stderr
    assert lines == [f"gpu-check install: missing a C++ compiler ({tmp_path / 'no-such-compiler'} is not on PATH; "
                     "set CXX)"]
    assert gpu_check.STAGES[1].commands(_run(tmp_path), tmp_path, 60)[0][-1] == "--prerequisites"


@pytest.mark.parametrize("argv", [["--static", "--quick", "--out", "x"], ["--overhead", "--quick", "--out", "x"]])
def test_the_bench_modes_the_run_calls_exist(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    assert args.quick and args.out == Path("x") and (args.static or args.overhead)
