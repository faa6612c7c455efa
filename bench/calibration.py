"""Calibration of the static model (``bench/roofline.py``) against published timings of public Triton kernels.

Each point is a kernel that installs as a package (Liger-Kernel, the ``dev`` extra of setup.py), at the version whose
committed benchmark data gives its time: Liger-Kernel 0.5.2's LayerNorm and RMSNorm forward as benchmarked by
``benchmark/scripts/benchmark_{layer,rms}_norm.py`` (``triton.testing.do_bench``, L2 cleared, median of 500 ms)
on an H100 NVL, committed in ``benchmark/data/h100_all_benchmark_data.csv`` (linkedin/Liger-Kernel commit
3534d446, whose ``ops/layer_norm.py`` and ``ops/rms_norm.py`` kernels and launchers are those of the 0.5.2 wheel).
The calls are the benchmark modules' own: ``LigerLayerNorm`` (fp32 weight and bias) and ``LigerRMSNorm`` (fp32
weight, "llama" casting, in place), on CPU tensors with the launches recorded, compiled for sm_90 and scored like
genfast's rows (``bench/machine_code.py``).

``python -m bench.calibration`` prints each point's published and predicted time; ``--fit`` searches the model's
constants (roofline.Model) for the least worst |log(published ÷ predicted)| and prints them with their residuals.
"""
from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import machine_code, roofline

LIGER_VERSION = "0.5.2"
LIGER_SOURCE = ("linkedin/Liger-Kernel@3534d446 benchmark/data/h100_all_benchmark_data.csv "
                "(do_bench median, forward, eps 1e-6)")
STREAMED = ("X_ptr", "Y_ptr")  # the Liger kernels' row-sized tensors


@dataclass(frozen=True)
class Point:
    kernel: str
    version: str
    shape: tuple
    dtype: str
    gpu: str
    source: str
    published_us: float


POINTS = tuple(
    [Point("liger_kernel.layer_norm forward", LIGER_VERSION, (4096, n), "fp32", "H100 NVL", LIGER_SOURCE, us)
     for n, us in ((1024, 15.904), (2048, 26.048), (4096, 45.536), (8192, 82.976), (16384, 182.400))]
    + [Point("liger_kernel.rms_norm forward", LIGER_VERSION, (2048, h), "bf16", "H100 NVL", LIGER_SOURCE, us)
       for h, us in ((1024, 7.872), (2048, 10.656), (4096, 17.088), (8192, 30.336), (16384, 63.936),
                     (32768, 110.656))])
GPUS = {"H100 NVL": roofline.H100_NVL}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def missing() -> str | None:
    """Why the points cannot be compiled here (None: they can)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return f"liger-kernel is not installed (pip install liger-kernel=={LIGER_VERSION}: the dev extra)"
    return None


def call(point: Point, device: str = "cpu", repeat: int = 1):
    """() -> output: the benchmark's forward call of ``point`` on ``device`` (its inputs made once); ``repeat``
    calls back to back, each on the previous one's output (dependent launches)."""
    rows, cols = point.shape
    x = torch.randn(rows, cols, dtype=DTYPES[point.dtype], device=device, requires_grad=True)
    weight = torch.ones(cols, device=device, requires_grad=True)
    if point.kernel.startswith("liger_kernel.layer_norm"):
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        bias = torch.zeros(cols, device=device, requires_grad=True)
        forward = lambda t: LigerLayerNormFunction.apply(t, weight, bias, 1e-6)
    else:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        forward = lambda t: LigerRMSNormFunction.apply(t, weight, 1e-6, 0.0, "llama", True)

    def run():
        out = x
        for _ in range(repeat):
            out = forward(out)
        return out
    return run


@dataclass
class Compiled:
    """A point's launches, read: (roofline.Shape, MachineCode) per Triton kernel, and the op's launch count."""
    point: Point
    kernels: list
    launches: int


def compile_point(point: Point, workdir: Path) -> Compiled:
    run = call(point)
    with torch.no_grad(), machine_code.record_launches() as recording:
        run()
    kernels = []
    for launch in recording.triton:
        compiled = machine_code.compile_launch(launch)
        code = machine_code.read(compiled, launch, STREAMED, workdir)
        kernels.append((roofline.shape_of(launch, code, math.prod(point.shape), roofline.is_reduction(compiled)),
                        code))
    return Compiled(point, kernels, len(recording.triton) + len(recording.torch_ops))


def predict(compiled: Compiled, model: roofline.Model = roofline.MODEL, gpu: roofline.Gpu | None = None
            ) -> tuple[float, float]:
    """(point, high) seconds of a compiled point (roofline.op_seconds) on ``gpu`` (default: the point's own)."""
    gpu = gpu or GPUS[compiled.point.gpu]
    times = [roofline.kernel_seconds(shape, code, gpu, model)["time"] for shape, code in compiled.kernels]
    return roofline.op_seconds(times, compiled.launches, gpu, model)


def compile_all() -> list[Compiled]:
    with tempfile.TemporaryDirectory() as tmp:
        return [compile_point(point, Path(tmp)) for point in POINTS]


def records(compiled: list[Compiled], model: roofline.Model = roofline.MODEL) -> list[dict]:
    """The static report's "calibration" list: one object per point."""
    out = []
    for c in compiled:
        point_s, high_s = predict(c, model)
        low_s, high_s = roofline.predicted_range(point_s, high_s)
        out.append(dict(kernel=c.point.kernel, version=c.point.version, shape="x".join(map(str, c.point.shape)),
                        dtype=c.point.dtype, gpu=c.point.gpu, source=c.point.source,
                        published_us=c.point.published_us, predicted_us=point_s * 1e6,
                        predicted_low_us=low_s * 1e6, predicted_high_us=high_s * 1e6,
                        published_over_predicted=c.point.published_us / (point_s * 1e6),
                        **{f"predicted_us_{key}": predict(c, model, gpu)[0] * 1e6
                           for key, gpu in roofline.GPUS.items()}))
    return out


def worst_log_ratio(compiled: list[Compiled], model: roofline.Model) -> float:
    return max(abs(math.log(c.point.published_us * 1e-6 / predict(c, model)[0])) for c in compiled)


def fit(compiled: list[Compiled]) -> roofline.Model:
    """The constants with the least worst |log(published ÷ predicted)|: a grid over t_launch (0–10 µs by 0.1),
    κ (0–1 by 0.02) and p (2, 3, 4, 6, 8)."""
    grid = itertools.product((i / 10 * 1e-6 for i in range(101)), (i / 50 for i in range(51)),
                             (2.0, 3.0, 4.0, 6.0, 8.0))
    return min((roofline.Model(launch, chain, p) for launch, chain, p in grid),
               key=lambda model: worst_log_ratio(compiled, model))


def table(rows: list[dict]) -> str:
    lines = ["| kernel | version | shape | dtype | GPU | published µs | predicted µs (range) "
             "| published ÷ predicted |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['version']} | {r['shape']} | {r['dtype']} | {r['gpu']} | "
              f"{r['published_us']:.2f} | "
              f"{r['predicted_us']:.2f} ({r['predicted_low_us']:.1f}–{r['predicted_high_us']:.1f}) | "
              f"{r['published_over_predicted']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="search the model's constants and print them")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(reason)
        return 1
    compiled = compile_all()
    model = fit(compiled) if args.fit else roofline.MODEL
    rows = records(compiled, model)
    ratios = [r["published_over_predicted"] for r in rows]
    print(f"{model}: published ÷ predicted {min(ratios):.3f}–{max(ratios):.3f}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
