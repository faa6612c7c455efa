"""Smoke test of the benchmark machinery (genfast.bench): one tiny case through timing, profiling, JSON/CSV, the
table and the plots. The numbers themselves are not checked, only that each stage produces what the next reads."""
import csv
import json

import torch

from genfast.bench import cli, ops, report, runner
from genfast.bench.timing import profile_call

TINY = ops.Case("group_norm_silu", (2, 32, 4, 4), "forward+backward", "add", "nhwc")


def test_byte_formula_counts_each_tensor_once():
    n, side = 2 * 32 * 4 * 4, 2 * 32 + 2 * 32  # weight + bias, add (B·C)
    assert runner.minimal_bytes(ops.GROUP_NORM_SILU, TINY) == 4 * ((2 * n + side) + (3 * n + 2 * side))
    assert runner.minimal_bytes(ops.REPARAMETERIZE_KL, ops.Case("reparameterize_kl", (8, 16), "forward")) == \
        3 * 8 * 16 * 4 + 4 * 8


def test_backends_skip_auto_and_the_cpu_interpreter():
    timed, skipped = runner.genfast_backends(torch.device("cpu"))
    assert "reference" in timed and "auto" not in timed and "triton" not in timed
    assert {"auto", "triton"} <= set(skipped)
    assert cli.quick_backends(["reference", "cpp"]) == ["cpp"] and cli.quick_backends(["reference"]) == ["reference"]


def test_cpp_rows_only_for_ops_it_has_kernels_for():
    cuda = torch.device("cuda")
    assert runner.runs_op("cpp", ops.GROUP_NORM_SILU.kernels, cuda)
    assert not runner.runs_op("cpp", ops.REPARAMETERIZE_KL.kernels, cuda)
    assert all(runner.runs_op("cpp", op.kernels, torch.device("cpu")) for op in ops.OPS.values())
    assert runner.runs_op("triton", ops.REPARAMETERIZE_KL.kernels, cuda)


def test_cpu_peak_memory_sees_the_call_allocations():
    assert profile_call(lambda: torch.ones(1 << 20), torch.device("cpu")).peak_bytes >= 4 << 20


def test_tiny_case_end_to_end(tmp_path):
    device = torch.device("cpu")
    rows = [runner.measure(TINY, impl, device, threads=1, min_run_time=0.01)
            for impl in (runner.EAGER, runner.genfast_impl("reference"))]
    assert [r.error for r in rows] == [None, None]
    assert all(r.median_s > 0 and r.peak_memory_bytes > 0 for r in rows)

    recs = report.records(rows, peak_bandwidth=1e9)
    assert recs[0]["vs_eager"] == 1.0 and recs[1]["vs_eager"] > 0
    assert abs(recs[0]["gbps"] - rows[0].bytes / rows[0].median_s / 1e9) < 1e-9
    text = report.table(recs, launches=False)
    assert "group_norm_silu/add/nhwc 2x32x4x4 forward+backward" in text and "genfast-reference" in text

    machine = report.machine_info(device, 1)
    report.write_json(tmp_path / "r.json", dict(machine=machine), recs)
    report.write_csv(tmp_path / "r.csv", machine, recs)
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["impl"] == "genfast-reference"
    with open(tmp_path / "r.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [r["impl"] for r in lines] == ["eager", "genfast-reference"] and lines[0]["cores"]
    for png in report.plot(recs, 1.0, tmp_path / "r"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_row_is_reported_not_raised():
    bad = ops.Case("group_norm_silu", (2, 30, 4, 4), "forward", "plain", "nchw")  # 30 channels, 32 groups
    row = runner.measure(bad, runner.genfast_impl("reference"), torch.device("cpu"), threads=1, min_run_time=0.01)
    assert row.median_s is None and "num_groups" in row.error


def test_bad_device_is_refused(capsys):
    assert cli.main(["--device", "tpu", "--no-e2e"]) == 2
    assert "--device" in capsys.readouterr().err
