"""The sm_90 machine code of the variants the launchers really pick (``genfast bench --static --quick``): no scalar
tile accesses where the layout allows vectors, no local memory, launches within budget. Runs without a GPU: the
launchers run on CPU tensors with their Triton launches recorded and compiled for sm_90, in a subprocess without
TRITON_INTERPRET (the interpreter replaces ``@triton.jit``)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=900)


def test_quick_table_vectorised_unspilled_within_launch_budget(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genfast", "bench", "--static", "--quick", "--out", str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = tmp_path.glob("static-sm90-*-quick.json")
    rows = json.loads(report.read_text())["rows"]
    from genfast.bench.static import problems
    broken = [f"{r['op']} {r['shape']} {r['layout']} {r['dtype']} {r['direction']}: {'; '.join(problems(r))}"
              for r in rows if problems(r)]
    assert not broken, "\n".join(broken)
    assert {r["op"] for r in rows} >= {"group_norm_silu", "reparameterize_kl", "diffusion_loss", "gradient_penalty"}
    # the thresholded DDIM step: the sort of the threshold's candidates kernel compiles for sm_90 too
    assert {r["direction"] for r in rows if (r["op"], r["variant"]) == ("ddim_step", "threshold")} == {"forward",
                                                                                                     "backward"}
    assert all(r["registers"] > 0 and r["predicted_us_h200"] > 0 for r in rows)


def test_recorded_launch_specialises_like_the_jit():
    """The recorder's specialisation comes from the values: an aligned tensor's pointer is marked divisible by 16
    and an offset view's is not; a group of 8 channels is a constant of the NHWC GroupNorm kernel."""
    proc = _python("""
        import torch, genfast
        from genfast.bench import machine_code, static
        x = torch.empty(2, 256, 8, 8).to(memory_format=torch.channels_last)
        with static._triton_backend(), machine_code.record_launches() as rec:
            genfast.group_norm_silu(x, 32)
            genfast.reparameterize_kl(torch.empty(4, 100), torch.empty(4, 100))
            genfast.reparameterize_kl(torch.empty(401)[1:].view(4, 100), torch.empty(4, 100))
        gn, aligned, offset = rec.triton
        mu_ptr = lambda launch: launch.attrs[(launch.kernel.arg_names.index("mu_ptr"),)]
        print(gn.constant("CPG"), gn.constant("sC"), mu_ptr(aligned), mu_ptr(offset))
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["8", "1", "[['tt.divisibility',", "16]]", "[]"]


def test_calibration_points_within_25_percent_of_published():
    """The model against published timings of public kernels (bench/calibration.py): every point's published ÷
    predicted within ±25%, and the report's "calibration" objects carry the fields the issue names."""
    pytest.importorskip("liger_kernel", reason="liger-kernel (the dev extra) is not installed: the calibration "
                                               "kernels cannot be compiled")
    proc = _python("""
        import json
        from genfast.bench import calibration
        print(json.dumps(calibration.records(calibration.compile_all())))
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = json.loads(proc.stdout.splitlines()[-1])
    assert points
    fields = {"kernel", "version", "shape", "dtype", "gpu", "source", "published_us", "predicted_us"}
    assert all(fields <= set(p) for p in points)
    off = [f"{p['kernel']} {p['shape']} {p['dtype']}: published {p['published_us']:.1f} µs, predicted "
           f"{p['predicted_us']:.1f} µs" for p in points if not 0.75 <= p["published_us"] / p["predicted_us"] <= 1.25]
    assert not off, "\n".join(off)
    assert all(p["predicted_low_us"] <= p["predicted_us"] <= p["predicted_high_us"] for p in points)
