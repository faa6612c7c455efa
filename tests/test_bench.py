"""Smoke test of the benchmark machinery (genfast.bench): tiny cases through interleaved timing, profiling,
JSON/CSV, the table, the log and the plots; the baselines (eager = genfast's "torch" composites). The numbers
themselves are not checked, only that each stage produces what the next reads."""
import csv
import json

import pytest
import torch

import genfast
from genfast.bench import cli, e2e, integrations, ops, report, runner
from genfast.bench.timing import profile_call, time_interleaved

TINY = ops.Case("group_norm_silu", (2, 32, 4, 4), "forward+backward", "add", "nhwc")


def test_byte_formula_counts_each_tensor_once():
    n, side = 2 * 32 * 4 * 4, 2 * 32 + 2 * 32  # weight + bias, add (B·C)
    assert runner.minimal_bytes(ops.GROUP_NORM_SILU, TINY) == 4 * ((2 * n + side) + (3 * n + 2 * side))
    assert runner.minimal_bytes(ops.REPARAMETERIZE_KL, ops.Case("reparameterize_kl", (8, 16), "forward")) == \
        3 * 8 * 16 * 4 + 4 * 8
    q = ops.Case("q_sample", (2, 3, 4, 4), "forward+backward")
    assert runner.minimal_bytes(ops.Q_SAMPLE, q) == (2 + 2) * 2 * 3 * 4 * 4 * 4
    assert q.op in ops.OPS and any(c.op == "q_sample" for c in ops.quick_cases())


def test_backends_skip_auto_torch_and_the_cpu_interpreter():
    timed, skipped = runner.genfast_backends(torch.device("cpu"))
    assert "reference" in timed and not {"auto", "torch", "triton"} & set(timed)
    assert {"auto", "torch", "triton"} <= set(skipped)
    assert runner.fast_backends(["reference", "cpp"]) == ["cpp"]
    assert runner.fast_backends(["reference"]) == ["reference"]


def test_rows_only_for_ops_a_backend_has_kernels_for():
    from genfast import _backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert {op.module for op in ops.OPS.values()} <= set(_backend.OPS)
    if _backend.why_not("cpp", cpu) is None:
        assert all(runner.runs_op("cpp", op.module, cpu) for op in ops.OPS.values())
    if _backend.why_not("triton", cuda) is None:
        assert runner.runs_op("triton", ops.REPARAMETERIZE_KL.module, cuda)
    assert "cuda" not in _backend.DEVICES["cpp"][ops.REPARAMETERIZE_KL.module]
    assert not runner.runs_op("cpp", ops.REPARAMETERIZE_KL.module, cuda)


def test_eager_is_the_torch_backend_composite():
    """The per-op baseline is genfast.composite, the code the "torch" backend runs: same seed, same values."""
    x0 = torch.randn(2, 3, 4, 4)
    inp = dict(x0=x0, t=torch.tensor([3, 700]), schedule=genfast.NoiseSchedule.linear(ops.NUM_STEPS))
    torch.manual_seed(1)
    (eager,) = ops.Q_SAMPLE.eager(inp)
    torch.manual_seed(1)
    with genfast.use_backend("torch"):
        (composite,) = ops.Q_SAMPLE.genfast(inp)
    assert torch.equal(eager, composite)
    assert e2e.backend_of(runner.EAGER) == e2e.backend_of(runner.COMPILE) == "torch"
    assert e2e.backend_of("genfast-cpp+compile") == "cpp"
    assert e2e.e2e_impls(["reference", "cpp"], compile_too=True) == [
        "eager", "genfast-cpp", "compile", "genfast-cpp+compile"]


def test_interleaved_timing_keeps_going_past_a_failure():
    calls = dict(ok=lambda: torch.ones(8).sum(), bad=lambda: 1 / 0)
    timings, errors = time_interleaved(calls, torch.device("cpu"), threads=1, min_run_time=0.01, rounds=3)
    assert timings["ok"].runs == 3 and timings["ok"].median > 0 and "bad" not in timings
    assert isinstance(errors["bad"], ZeroDivisionError)


def test_cpu_peak_memory_sees_the_call_allocations():
    assert profile_call(lambda: torch.ones(1 << 20), torch.device("cpu")).peak_bytes >= 4 << 20


def test_tiny_case_end_to_end(tmp_path):
    device = torch.device("cpu")
    rows = runner.measure_case(TINY, [runner.EAGER, runner.genfast_impl("reference")], device, threads=1,
                               min_run_time=0.01, rounds=3)
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


def test_results_default_to_the_current_directory():
    assert not cli.DEFAULT_OUT.is_absolute()  # an installed copy must not write into site-packages
    parser = cli.argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args([]).out == cli.DEFAULT_OUT


def test_run_writes_json_csv_log_and_plots(tmp_path):
    out = tmp_path / "results"
    assert cli.main(["--ops", "q_sample", "--quick", "--no-e2e", "--no-compile", "--threads", "1", "--rounds", "3",
                     "--tag", "smoke", "--out", str(out)]) == 0
    (log,) = out.glob("cpu-*-quick-smoke.log")
    assert log.read_text().startswith("# command: genfast bench --ops q_sample") and "q_sample" in log.read_text()
    data = json.loads(log.with_suffix(".json").read_text())
    assert data["settings"]["rounds"] == 3 and {r["op"] for r in data["rows"]} == {"q_sample"}
    assert log.with_suffix(".csv").exists() and list(out.glob("*-speedup.png"))


def test_diffusers_rows_on_the_suite_runner():
    pytest.importorskip("diffusers")
    config = integrations.Config("vae-decode", 1, 8, dict(block_out_channels=(32,), layers_per_block=1,
                                                         latent_channels=4, norm_num_groups=8))
    rows = integrations.measure(config, [runner.EAGER, runner.genfast_impl("reference")], torch.device("cpu"),
                                threads=1, min_run_time=0.01, rounds=3)
    assert [r.error for r in rows] == [None, None] and all(r.median_s > 0 for r in rows)
    assert rows[0].case.op == "diffusers/AutoencoderKL.decode" and rows[0].case.shape == (1, 4, 8, 8)
    names = integrations.impls(["reference", "cpp"], torch.device("cpu"), compile_too=True)
    assert names[:2] == ["eager", "compile"] and "genfast-reference" not in names


def test_a_disturbed_case_is_timed_again(monkeypatch):
    monkeypatch.setattr(cli, "wait_for_quiet", lambda *a, **k: 0.0)
    loads = iter([1.5, 0.1, 0.9])

    def task():
        return [runner.Row(case=TINY, impl="eager", bytes=0, median_s=1.0, other_cores=next(loads))]

    (row,) = cli._measured(task, retries=2)
    assert row.other_cores == 0.1 and row.attempts == 2
