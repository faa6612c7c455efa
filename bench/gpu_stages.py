"""The timed stages of ``make gpu-check`` (bench/gpu_check.py runs each in its own process, under its own timeout):
``python -m bench.gpu_stages STAGE --dir DIR [--dry-run] [--budget-s S] [--static-json PATH ...]``.

- ``info``: ``genfast info``, the versions and the device; on CUDA it fails unless the CUDA C++ kernels loaded.
- ``ops``: the copy bandwidth, then the static report's shapes (``genfast bench --static``'s JSON, else
  ``bench/ops.py``'s quick set) in fp32 and bf16, eager and genfast's backends, while the budget lasts;
  bench/report.py's charts of them (``ops-speedup.png``, ``ops-bandwidth.png``). ``ops --compile``
  (ops-compile): the same cases with torch.compile too.
- ``sampling``: images/s of DDIM sampling for eager, genfast, genfast + CUDA graphs and
  torch.compile(mode="reduce-overhead").
- ``calibration``: the static model's calibration kernels (bench/calibration.py: Liger-Kernel's LayerNorm and
  RMSNorm forward at their published shapes, once and twice back to back) and a copy sweep of 1 MB – 1 GB.
- ``training`` / ``training-compile``: one training step of the VAE, WGAN-GP and DDPM (bench/e2e.py): eager and
  genfast; eager and both under torch.compile.

Each stage rewrites ``DIR/result.json`` after every measurement (a temporary file, then a rename), so a stage cut
off by its timeout keeps what it measured. ``--dry-run``: tiny shapes on the CPU (CI), no Inductor compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import genfast
from genfast import models

from . import calibration, e2e, ops, report, runner
from .gpu_report import static_key, static_rows
from .ops import Case
from .timing import copy_bandwidth, time_call

MEASURED_DTYPES = (torch.float32, torch.bfloat16)
DRY_CASES = (Case("group_norm_silu", (2, 64, 4, 4), "forward", "plain", "nhwc"),
             Case("reparameterize_kl", (8, 16), "backward"), Case("q_sample", (2, 3, 8, 8), "forward"),
             Case("ddim_step", (2, 3, 8, 8), "forward"))
DRY_SIZES = {
    "vae": e2e.ModelSize(2, 32, dict(latent_dim=4, base_channels=8)),
    "wgan_gp": e2e.ModelSize(2, 32, dict(base_channels=4)),
    "ddpm": e2e.ModelSize(2, 8, dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_resolutions=(4,), num_groups=4)),
}
# DDIM sampling, 50 steps, of a 32×32 U-Net small enough that launches, not arithmetic, bound a step
SAMPLING = dict(n=16, steps=50, unet=dict(image_size=32, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                          attention_resolutions=(16,)))
DRY_SAMPLING = dict(n=2, steps=3, unet=dict(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                            attention_resolutions=(4,), num_groups=4))


class Result:
    """``DIR/result.json``: a dict saved whole after every change."""

    def __init__(self, folder: Path, **fields):
        self.path, self.data = folder / "result.json", dict(fields)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timing(dry_run: bool) -> dict:
    """bench.runner's timing settings: 0.05 s of calls per implementation, 0.01 s and one thread in the dry run
    (CI runs it next to other tests)."""
    return dict(threads=1 if dry_run else os.cpu_count(), min_run_time=0.01 if dry_run else 0.05,
                rounds=3 if dry_run else 5)


# ---- info ------------------------------------------------------------------------------------------------------


def info(args) -> int:
    from genfast import _backend
    from genfast.cli import main as genfast_main

    genfast_main(["info"])
    device = _device()
    data = dict(genfast=genfast.__version__, torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), python=sys.version.split()[0], device=str(device),
                backends={name: _backend.why_not(name, device) for name in _backend.BACKENDS})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        data.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    Result(args.dir, **data)
    reason = _backend.why_not("cpp", device, op="group_norm_silu") if device.type == "cuda" else None
    if reason is not None:
        print(f"gpu-check: the CUDA C++ kernels did not load: {reason}", file=sys.stderr)
        return 1
    return 0


# ---- ops -------------------------------------------------------------------------------------------------------


def _cases(rows: list[dict]) -> list[Case]:
    """The distinct (op, shape, variant, layout, direction) of static rows (bench.ops' quick set when there are
    none), round-robin over the ops so that a cut-off stage still has every op, each in fp32 and bf16."""
    keys = [static_key(r) for r in rows if r["op"] in ops.OPS and r["direction"] in ops.MODES]
    base = list(dict.fromkeys(
        (op, tuple(int(d) for d in shape.split("x")), mode, variant, layout)
        for op, shape, variant, layout, _, mode in keys)) or [
        (c.op, c.shape, c.mode, c.variant, c.layout) for c in ops.quick_cases()]
    return _in_dtypes(base)


def _in_dtypes(base: list[tuple]) -> list[Case]:
    """(op, shape, mode, variant, layout) keys round-robin over the ops, each in fp32 and bf16."""
    by_op: dict[str, list] = {}
    for key in base:
        by_op.setdefault(key[0], []).append(key)
    order = []
    for i in range(max(map(len, by_op.values()))):
        order += [group[i] for group in by_op.values() if i < len(group)]
    return [Case(op, shape, mode, variant, layout, dtype) for op, shape, mode, variant, layout in order
            for dtype in MEASURED_DTYPES]


def _measured_cases(path: Path) -> list[Case]:
    """The cases of an ops stage's result.json, in its order."""
    dtypes = {str(d).removeprefix("torch."): d for d in MEASURED_DTYPES}
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    return list(dict.fromkeys(Case(r["op"], tuple(int(d) for d in r["shape"].split("x")), r["mode"], r["variant"],
                                   r["layout"], dtypes[r["dtype"]]) for r in rows))


def ops_stage(args) -> int:
    """Without ``--compile``: eager and genfast's backends on every case while the budget lasts, and the charts.
    With it (ops-compile): the ops stage's cases (``--cases-from``) again with torch.compile added, so that every
    ratio comes from one interleaved timing."""
    device = _device()
    timing = _timing(args.dry_run)
    nbytes = (16 if args.dry_run else 1024) * 2**20
    peak = copy_bandwidth(device, nbytes=nbytes, threads=timing["threads"], min_run_time=timing["min_run_time"])
    print(f"copy bandwidth ({nbytes >> 20} MiB, counted 2x): {peak / 1e9:.1f} GB/s", flush=True)
    rows, source = static_rows(args.static_json)
    if args.cases_from is not None and args.cases_from.is_file():
        cases, source = _measured_cases(args.cases_from), str(args.cases_from)
    elif args.dry_run:
        cases = _in_dtypes([(c.op, c.shape, c.mode, c.variant, c.layout) for c in DRY_CASES])
    else:
        cases = _cases(rows)
    backends = runner.fast_backends(runner.genfast_backends(device)[0])
    result = Result(args.dir, device=str(device), copy_bandwidth_gbps=peak / 1e9, shapes_from=source or "bench/ops.py",
                    cases=len(cases), rows=[])
    deadline = time.perf_counter() + args.budget_s
    measured, done = [], 0
    for case in cases:
        if time.perf_counter() > deadline:
            break
        impls = [runner.EAGER] + ([runner.COMPILE] if args.compile else []) + [
            runner.genfast_impl(b) for b in backends if runner.runs_op(b, ops.OPS[case.op].module, device)]
        measured += runner.measure_case(case, impls, device, **timing)
        done += 1
        result.data["rows"] = report.records(measured, peak)
        result.save()
    print(f"gpu-check ops: {done} of {len(cases)} cases timed" + (" with torch.compile" if args.compile else ""))
    if not args.compile:
        report.plot(result.data["rows"], peak / 1e9, args.dir / "ops")  # ops-speedup.png, ops-bandwidth.png
    print(report.table(result.data["rows"], launches=device.type == "cuda"))
    return 0


# ---- calibration ---------------------------------------------------------------------------------------------
COPY_SWEEP_MB = tuple(2**i for i in range(11))  # 1 MB – 1 GB
DRY_COPY_SWEEP_MB = (1, 2, 4)


def _copy_sweep(device: torch.device, sizes_mb: tuple, timing: dict) -> list[dict]:
    """Device-to-device copy bandwidth per size (2·size bytes moved a call)."""
    out = []
    for mb in sizes_mb:
        bandwidth = copy_bandwidth(device, nbytes=mb * 2**20, threads=timing["threads"],
                                   min_run_time=timing["min_run_time"])
        out.append(dict(megabytes=mb, bandwidth_gbps=bandwidth / 1e9))
        print(f"copy {mb} MB: {bandwidth / 1e9:.1f} GB/s", flush=True)
    return out


def _timed_point(point, device: torch.device, timing: dict) -> dict:
    """One calibration point's forward call timed like its published number (do_bench, L2 cleared, median), and
    the same call twice back to back, the second on the first's output (a dependent launch)."""
    row = dict(kernel=point.kernel, version=point.version, shape="x".join(map(str, point.shape)), dtype=point.dtype,
               published_us=point.published_us, published_gpu=point.gpu, error=None)
    try:
        once = calibration.call(point, device.type)
        once()
        twice = calibration.call(point, device.type, repeat=2)
        twice()
        row["measured_us"] = time_call(once, device, **timing).median * 1e6
        row["measured_twice_us"] = time_call(twice, device, **timing).median * 1e6
    except Exception as exc:  # one point failing must not end the stage
        row["error"] = runner.first_line(f"{type(exc).__name__}: {exc}")
    return row


def calibration_stage(args) -> int:
    """The static model's calibration kernels (bench/calibration.py) timed on this GPU, and a copy sweep, so the
    model's constants can be checked against the hardware they predict. On the CPU (the dry run): the copy sweep
    on 1–4 MB; the Triton kernels need a GPU."""
    device = _device()
    timing = _timing(args.dry_run)
    result = Result(args.dir, device=str(device), copy=[], points=[])
    result.data["copy"] = _copy_sweep(device, DRY_COPY_SWEEP_MB if args.dry_run else COPY_SWEEP_MB, timing)
    result.save()
    reason = calibration.missing() or (None if device.type == "cuda" else "the Triton kernels need a GPU")
    if reason:
        result.data["points_skipped"] = reason
        result.save()
        print(f"gpu-check calibration: kernels not timed: {reason}")
        return 0
    for point in calibration.POINTS:
        result.data["points"].append(_timed_point(point, device, timing))
        result.save()
        print(json.dumps(result.data["points"][-1]), flush=True)
    return 0


# ---- sampling --------------------------------------------------------------------------------------------------


def _sampler(config: dict, device: torch.device, backend: str, cuda_graph: bool, compiled: str | None):
    """() -> images: DDIM sampling with ``config`` on ``backend``; ``compiled``: the U-Net under torch.compile
    (mode="reduce-overhead"; "eager": dynamo alone, the dry run)."""
    torch.manual_seed(0)
    unet = models.UNet(**config["unet"]).to(device).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # a trained model's ε̂ is not zero
    if compiled:
        unet = torch.compile(unet, **({"backend": "eager"} if compiled == "eager" else {"mode": compiled}))
    model = models.DDPM(unet=unet).to(device)  # the schedule too

    def sample():
        generator = torch.Generator(device=device).manual_seed(1)
        with genfast.use_backend(backend):
            return model.sample(config["n"], sampler="ddim", steps=config["steps"], eta=1.0, generator=generator,
                                cuda_graph=cuda_graph)

    return sample


def _timed(fn, device: torch.device, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times, out


def sampling(args) -> int:
    device = _device()
    config = DRY_SAMPLING if args.dry_run else SAMPLING
    compile_mode = "eager" if device.type == "cpu" else "reduce-overhead"
    impls = {"genfast": ("auto", False, None), "genfast+graphs": ("auto", True, None), "eager": ("torch", False, None),
             f"compile({compile_mode})": ("torch", False, compile_mode)}
    size = config["unet"]["image_size"]
    result = Result(args.dir, device=str(device), config=config, rows=[])
    images = {}
    for impl, (backend, cuda_graph, compiled) in impls.items():
        row = dict(op="sample/ddim", shape=f"{config['n']}x3x{size}x{size}", mode=f"{config['steps']} steps",
                   impl=impl, error=None)
        try:
            start = time.perf_counter()
            fn = _sampler(config, device, backend, cuda_graph, compiled)
            _timed(fn, device, 2 if compiled else 1)  # warm-up: compiles; reduce-overhead records its graphs
            row["first_calls_s"] = time.perf_counter() - start
            times, images[impl] = _timed(fn, device, 1 if args.dry_run else 3)
            median = sorted(times)[len(times) // 2]
            row.update(median_s=median, images_per_s=config["n"] / median, ms_per_step=1e3 * median / config["steps"])
        except Exception as exc:  # one implementation failing must not end the stage
            row["error"] = runner.first_line(f"{type(exc).__name__}: {exc}")
        if impl == "genfast+graphs" and {"genfast", impl} <= set(images):  # the same seed: the same images
            row["max_abs_diff_vs_genfast"] = (images[impl] - images["genfast"]).abs().max().item()
        result.data["rows"].append(row)
        result.save()
        print(json.dumps(row), flush=True)
    return 0


# ---- training steps --------------------------------------------------------------------------------------------


def training(args) -> int:
    device = _device()
    timing = _timing(args.dry_run)
    backends = [b for b in runner.genfast_backends(device)[0]
                if all(runner.runs_op(b, op.module, device) for op in ops.OPS.values())]
    impls = e2e.e2e_impls(backends, compile_too=args.compile)
    if args.compile:  # the compiled steps, and eager again: their speed-ups from one interleaved timing
        impls = [runner.EAGER] + [i for i in impls if i.endswith(runner.COMPILE)]
    result = Result(args.dir, device=str(device), impls=impls, rows=[])
    rows = []
    for name, size in (DRY_SIZES if args.dry_run else e2e.FULL_SIZES).items():
        rows += e2e.measure(name, size, impls, device, **timing)
        result.data["rows"] = report.records(rows, 1.0)
        result.save()
    print(report.table(result.data["rows"], launches=device.type == "cuda"))
    return 0


STAGES = {"info": info, "ops": ops_stage, "sampling": sampling, "training": training,
          "calibration": calibration_stage}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--dir", type=Path, required=True, help="the stage's folder: result.json goes there")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no Inductor compiles")
    parser.add_argument("--budget-s", type=float, default=60.0, help="ops: stop starting cases after this long")
    parser.add_argument("--static-json", type=Path, nargs="*", default=[],
                        help="ops: static reports (files or folders, the first with one wins) for the shapes")
    parser.add_argument("--compile", action="store_true",
                        help="ops, training: with torch.compile (ops-compile, training-compile)")
    parser.add_argument("--cases-from", type=Path, help="ops: the cases of this ops result.json")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)
    return STAGES[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
