"""``genfast bench --static``: the kernels' speed on an H200 and an H100 predicted from their sm_90 machine code,
on a machine without a GPU.

Each row of the shape table calls genfast's public function (or, for the gradient penalty, its two registered ops)
on CPU tensors with the backend forced to "triton": the launchers run for real and pick their plans, and every
Triton launch is recorded, compiled for sm_90 as the JIT would specialise it for these arguments
(``bench/machine_code.py``) and read. ``bench/roofline.py`` states the model; ``bench/calibration.py``'s points
(published timings of public kernels, scored the same way) go into the report as ``"calibration"``. Writes
``static-sm90-<date>[-quick].md`` and ``.json`` under ``--out``.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import calibration, machine_code, roofline
from .report import machine_info

GROUPS = 32
# launches per op call, Triton and torch kernels together: GroupNorm forward ≤ 2 and backward ≤ 3 (the dweight /
# dbias reduction included); a per-sample op one kernel each way plus at most one tiny finish (the diffusion loss
# is two ops: q_sample and the MSE; a thresholded step is the threshold's candidates kernel, torch's topk, lerp
# and clamp of the (B,) thresholds, then the step); random-number and check kernels are counted apart (RNG_OPS,
# CHECK_OPS). Keys (op, direction) or (op, direction, variant).
LAUNCH_BUDGET = {("group_norm_silu", "forward"): 2, ("group_norm_silu", "backward"): 3,
                 ("diffusion_loss", "forward"): 3, ("ddim_step", "forward", "threshold"): 5}
PER_SAMPLE_BUDGET = 2
# local memory a row may have: one 8-byte slot, one store and one load per thread (Triton 3.6's ptxas saves a
# register so around the single-pass GroupNorm forward to keep 3 CTAs of 512 threads a SM; a register limit that
# avoids it costs a third of the resident warps)
SAVED_REGISTER = (8, 2)
# torch kernels that are not the op's computation, reported in their own columns: drawing random numbers (the
# Philox seed) and checking tensor timesteps on the device without a sync (torch._assert_async of a range test)
RNG_OPS = ("aten.randint", "aten.rand", "aten.randn")
CHECK_OPS = ("aten.ge.", "aten.lt.", "aten.le.", "aten.gt.", "aten.eq.", "aten.clamp.", "aten.bitwise_and.",
             "aten.logical_and.", "aten.all.", "aten._assert_async.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GroupNorm + SiLU shapes (B, C, H·W side): U-Net and VAE widths at their resolutions
GN_SHAPES = ((32, 64, 64), (32, 128, 64), (16, 192, 32), (32, 256, 32), (2, 320, 64), (8, 384, 16), (64, 512, 8),
             (2, 640, 32), (2, 1280, 16), (4, 1280, 8), (1, 512, 256), (1, 128, 256))
GN_QUICK = ((2, 320, 64), (32, 256, 32))
PER_SAMPLE_SHAPES = {"reparameterize_kl": ((256, 128), (4096, 512), (8, 4, 64, 64)),
                     "q_sample": ((64, 3, 64, 64), (16, 3, 256, 256)),
                     "diffusion_loss": ((64, 3, 64, 64), (16, 3, 256, 256)),
                     "ddpm_step": ((64, 3, 64, 64), (16, 3, 256, 256)),
                     "ddim_step": ((64, 3, 64, 64), (16, 3, 256, 256)),
                     "gradient_penalty": ((64, 3, 64, 64), (256, 3, 64, 64)),
                     "interpolate": ((64, 3, 64, 64), (256, 3, 64, 64))}  # the gradient penalty's x̂
PER_SAMPLE_QUICK = {"reparameterize_kl": ((4096, 512),), "diffusion_loss": ((64, 3, 64, 64),),
                    "ddpm_step": ((64, 3, 64, 64),), "ddim_step": ((64, 3, 64, 64),),
                    "gradient_penalty": ((64, 3, 64, 64),)}
# per-sample ops with variants beyond their defaults: the DDIM step with dynamic thresholding (ratio 0.995, max value
# 1.5, as DeepFloyd IF's; with diffusers' default 1.0 no reduction runs; the quick subset has that variant only)
PER_SAMPLE_VARIANTS = {"ddim_step": ("-", "threshold")}
PER_SAMPLE_QUICK_VARIANTS = {"ddim_step": ("threshold",)}


@dataclass
class Case:
    op: str
    shape: tuple
    layout: str  # "NCHW", "NHWC" or "-" (per-sample ops are indexed by memory position)
    dtype: str
    variant: str  # GroupNorm: "plain", "add", "scale-shift"; others: "-"
    run: Callable  # () -> (forward thunk, backward thunk or None), inputs built
    minimal_bytes: dict  # direction -> bytes an ideal kernel must move
    contiguous_run: int  # elements of one contiguous run of a tile (a group's channels in NHWC, S in NCHW, D)


def _empty(shape, dtype, channels_last=False, grad=False):
    t = torch.empty(shape, dtype=dtype)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _backward(outputs, inputs):
    outputs = [o for o in outputs if o.requires_grad]
    grads = [torch.empty_like(o) for o in outputs]
    return lambda: torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


def _gn_case(batch, channels, side, layout, dtype, variant) -> Case:
    def run():
        import genfast
        x = _empty((batch, channels, side, side), DTYPES[dtype], layout == "NHWC", grad=True)
        w, b = _empty((channels,), torch.float32, grad=True), _empty((channels,), torch.float32, grad=True)
        cond = {"plain": {}, "add": {"add": _empty((batch, channels), DTYPES[dtype], grad=True)},
                "scale-shift": {k: _empty((batch, channels), DTYPES[dtype], grad=True) for k in ("scale", "shift")}}
        kwargs = cond[variant]
        out = []
        return (lambda: out.append(genfast.group_norm_silu(x, GROUPS, w, b, **kwargs)),
                lambda: _backward(out, [x, w, b, *kwargs.values()])())
    n = batch * channels * side * side * DTYPES[dtype].itemsize
    cpg = channels // GROUPS
    return Case("group_norm_silu", (batch, channels, side, side), layout, dtype, variant, run,
                {"forward": 2 * n, "backward": 3 * n}, cpg if layout == "NHWC" else side * side)


def _per_sample_case(op, shape, dtype, variant="-") -> Case:
    from genfast.ops import gradient_penalty as gp
    torch_dtype = DTYPES[dtype]
    nbytes = math.prod(shape) * torch_dtype.itemsize

    def run():
        import genfast
        schedule = genfast.NoiseSchedule.linear(1000)
        t, t_mid, t_prev = (torch.full((shape[0],), v, dtype=torch.int64) for v in (0, 500, 480))
        alpha = torch.empty(shape[0], dtype=torch.float32)
        x = _empty(shape, torch_dtype, grad=True)
        y = _empty(shape, torch_dtype, grad=True)
        out = []
        calls = {
            "reparameterize_kl": lambda: out.extend(genfast.reparameterize_kl(x, y)),
            "q_sample": lambda: out.append(genfast.q_sample(x, t, schedule)),
            "diffusion_loss": lambda: out.append(genfast.diffusion_loss(lambda x_t, t_: y, x.detach(), schedule,
                                                                        t=t)),
            "ddpm_step": lambda: out.append(genfast.ddpm_step(y, t_mid, x, schedule)),
            "ddim_step": lambda: out.append(genfast.ddim_step(y, t_mid, t_prev, x, schedule,
                                                              thresholding=variant == "threshold",
                                                              sample_max_value=1.5)),
            "gradient_penalty": lambda: out.append(gp._penalty_op(x, 10.0, "triton")[0]),
            "interpolate": lambda: out.append(gp._interpolate_op(x, y, alpha, "triton")),
        }
        inputs = [y] if op == "diffusion_loss" else [x] if op == "gradient_penalty" else [x, y]
        return calls[op], lambda: _backward(out, inputs)()
    # the steps clip x̂₀ by default: their backward reads ε̂ and x_t for the clamp's mask; a thresholded step's ideal
    # is one pass too (a sample's x̂₀ held on chip while its quantile is found), which the two-pass op is not
    minimal = {"reparameterize_kl": (3, 5), "q_sample": (2, 2), "diffusion_loss": (3, 2), "ddpm_step": (3, 5),
               "ddim_step": (3, 5), "gradient_penalty": (1, 2), "interpolate": (3, 3)}[op]
    return Case(op, tuple(shape), "-", dtype, variant, run,
                {"forward": minimal[0] * nbytes, "backward": minimal[1] * nbytes}, math.prod(shape[1:]))


def cases(quick: bool, ops=None) -> list[Case]:
    """The shape table (``quick``: the subset ``make test`` checks; ``ops``: only these)."""
    dtypes = ("bf16",) if quick else ("fp32", "bf16", "fp16")
    out = []
    for batch, channels, side in GN_QUICK if quick else GN_SHAPES:
        for layout in ("NCHW", "NHWC"):
            for dtype in dtypes + (("fp32",) if quick and layout == "NHWC" else ()):
                for variant in ("plain",) if quick else ("plain", "add", "scale-shift"):
                    out.append(_gn_case(batch, channels, side, layout, dtype, variant))
    for op, shapes in (PER_SAMPLE_QUICK if quick else PER_SAMPLE_SHAPES).items():
        for shape in shapes:
            for dtype in dtypes:
                for variant in (PER_SAMPLE_QUICK_VARIANTS if quick else PER_SAMPLE_VARIANTS).get(op, ("-",)):
                    out.append(_per_sample_case(op, shape, dtype, variant))
    return [case for case in out if ops is None or case.op in ops]


@contextlib.contextmanager
def _triton_backend():
    """Every op resolves to the Triton kernels, whatever the device (their launches are recorded, not run)."""
    from genfast import _backend
    resolved = _backend._resolve_cached
    _backend._resolve_cached = lambda *args: "triton"
    try:
        yield
    finally:
        _backend._resolve_cached = resolved


def _largest_power_of_two_dividing(n: int) -> int:
    return n & -n if n else 1


def _row(case: Case, direction: str, recording, workdir: Path) -> dict:
    elements = math.prod(case.shape)
    itemsize = DTYPES[case.dtype].itemsize
    vector_possible = min(16 // itemsize, _largest_power_of_two_dividing(case.contiguous_run)) * itemsize
    kernels, scalar = [], 0
    for launch in recording.triton:
        streamed = getattr(sys.modules[launch.kernel.fn.__module__], "STREAMED", ())
        compiled = machine_code.compile_launch(launch)
        code = machine_code.read(compiled, launch, streamed, workdir)
        kernels.append(roofline.estimate(launch, code, elements, roofline.is_reduction(compiled)))
        if vector_possible > itemsize:
            scalar += sum(1 for a in code.accesses if a.tile and a.width <= itemsize)
    rng = [op for op in recording.torch_ops if op.startswith(RNG_OPS)]
    checks = [op for op in recording.torch_ops if op.startswith(CHECK_OPS)]
    torch_kernels = [op for op in recording.torch_ops if op not in rng and op not in checks]
    launches = len(recording.triton) + len(torch_kernels)
    budget = LAUNCH_BUDGET.get((case.op, direction, case.variant),
                               LAUNCH_BUDGET.get((case.op, direction), PER_SAMPLE_BUDGET))
    row = dict(op=case.op, shape="x".join(map(str, case.shape)), layout=case.layout, dtype=case.dtype,
               variant=case.variant, direction=direction, minimal_bytes=case.minimal_bytes[direction],
               launches=launches, launch_budget=budget, within_launch_budget=launches <= budget,
               torch_kernels=torch_kernels, rng_launches=len(rng), check_launches=len(checks),
               vector_bytes_possible=vector_possible,
               load_bytes=sorted({w for k in kernels for w in k.load_bytes}),
               store_bytes=sorted({w for k in kernels for w in k.store_bytes}),
               scalar_accesses=scalar, spills=sum(k.spill_bytes for k in kernels),
               local_accesses=sum(k.local_accesses for k in kernels),
               registers=max((k.registers for k in kernels), default=0),
               ctas_per_sm=min((k.ctas_per_sm for k in kernels if k.traffic), default=0),
               bytes_in_flight_per_sm=min((k.in_flight_per_sm for k in kernels if k.traffic), default=0),
               instructions_per_element=sum(k.instructions for k in kernels) / max(elements, 1),
               kernels=[dict(name=k.name, programs=k.programs, num_warps=k.num_warps, registers=k.registers,
                             ctas_per_sm=k.ctas_per_sm, load_bytes=k.load_bytes, store_bytes=k.store_bytes,
                             instructions_per_element=k.instructions / max(elements, 1),
                             traffic_bytes=k.traffic, predicted_us_h200=k.seconds["h200"] * 1e6)
                        for k in kernels])
    # an op that moves less than bandwidth × latency cannot keep the memory pipeline full even with all of its
    # bytes in flight at once (3.0 MB on an H200): latency, not bandwidth, bounds it
    row["smaller_than_latency_h200"] = case.minimal_bytes[direction] < roofline.H200.bandwidth * roofline.H200.latency_s
    all_launches = launches + len(rng) + len(checks)
    for key, gpu in roofline.GPUS.items():
        seconds, high = roofline.op_seconds([k.seconds[key] for k in kernels], all_launches, gpu)
        low, high = roofline.predicted_range(seconds, high)
        row[f"predicted_us_{key}"] = seconds * 1e6
        row[f"predicted_range_us_{key}"] = [low * 1e6, high * 1e6]
        row[f"predicted_fraction_{key}"] = (case.minimal_bytes[direction] / gpu.bandwidth / seconds
                                            if seconds else 0.0)
    return row


def rows(quick: bool, ops=None, progress=None) -> list[dict]:
    """Every (case, direction) of the table, analysed."""
    out = []
    with tempfile.TemporaryDirectory() as tmp, _triton_backend():
        for case in cases(quick, ops):
            forward, backward = case.run()
            with machine_code.record_launches() as recording:
                forward()
            out.append(_row(case, "forward", recording, Path(tmp)))
            with machine_code.record_launches() as recording:
                backward()
            out.append(_row(case, "backward", recording, Path(tmp)))
            if progress:
                progress(case)
    return out


# ---- the report ------------------------------------------------------------------------------------------------
def problems(row: dict) -> list[str]:
    """What a row breaks of the rules ``make test`` checks: scalar tile accesses where vectors are possible, local
    memory beyond one register saved and restored once (SAVED_REGISTER: ptxas keeps an occupancy step that way),
    launches over budget."""
    found = []
    if row["scalar_accesses"]:
        found.append(f"{row['scalar_accesses']} scalar tile accesses (vectors of {row['vector_bytes_possible']} B "
                     "possible)")
    if row["spills"] > SAVED_REGISTER[0] or row.get("local_accesses", 0) > SAVED_REGISTER[1]:
        found.append(f"{row['spills']} B of local memory ({row.get('local_accesses', 0)} local accesses)")
    if not row["within_launch_budget"]:
        found.append(f"{row['launches']} launches (budget {row['launch_budget']}: "
                     f"{', '.join(k['name'] for k in row['kernels'])}; torch {row['torch_kernels']})")
    return found


def _us(row: dict, gpu: str) -> str:
    low, high = row[f"predicted_range_us_{gpu}"]
    return f"{row[f'predicted_us_{gpu}']:.1f} ({low:.1f}–{high:.1f})"


def table(rows_: list[dict]) -> str:
    head = ("| op | shape | layout | dtype | variant | dir | launches (+rng +checks) | ld/st B | scalar | regs | CTAs/SM | "
            "KB in flight/SM | instr/elem | H200 µs (range) | H200 % | H100 µs (range) | H100 % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows_:
        ldst = f"{'/'.join(map(str, r['load_bytes'])) or '-'} / {'/'.join(map(str, r['store_bytes'])) or '-'}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['layout']} | {r['dtype']} | {r['variant']} | "
                     f"{r['direction'][:3]} | {r['launches']}{'' if r['within_launch_budget'] else ' ✗'} "
                     f"(+{r['rng_launches']} +{r['check_launches']}) | {ldst} | "
                     f"{r['scalar_accesses']} | {r['registers']} | {r['ctas_per_sm']} | "
                     f"{r['bytes_in_flight_per_sm'] / 1024:.0f} | {r['instructions_per_element']:.1f} | "
                     f"{_us(r, 'h200')} | {100 * r['predicted_fraction_h200']:.0f} | "
                     f"{_us(r, 'h100')} | {100 * r['predicted_fraction_h100']:.0f} |")
    return "\n".join(lines)


def _summary(rows_: list[dict]) -> str:
    short = [r for r in rows_ if r["dtype"] in ("fp32", "bf16") and r["predicted_fraction_h200"] < 0.85]
    tiny = [r for r in short if r["smaller_than_latency_h200"]]
    broken = [r for r in rows_ if problems(r)]
    worst = min(rows_, key=lambda r: r["predicted_fraction_h200"])
    by_op = ", ".join(f"{op} {sum(r['op'] == op for r in short)}" for op in dict.fromkeys(r["op"] for r in short))
    return (f"{len(rows_)} rows; {len(short)} fp32/bf16 rows predicted under 85% of H200 bandwidth ({by_op}; "
            f"{len(tiny)} of them move less than bandwidth × latency = 3.0 MB, too little to fill the memory "
            f"pipeline; lowest {100 * worst['predicted_fraction_h200']:.0f}%: {worst['op']} {worst['shape']} "
            f"{worst['layout']} {worst['dtype']} {worst['direction']}); {len(broken)} rows with scalar tile accesses, "
            "local memory or launches over budget.")


def _short_name(signature: str) -> str:
    """``void ns::(anonymous namespace)::f<ns::T>(args)`` → ``f<T>``."""
    name = re.sub(r"\b\w+::", "", signature.replace("(anonymous namespace)::", "")).removeprefix("void ")
    return name.split("(")[0]


def _cuda_kernels() -> list[dict]:
    """The CUDA C++ kernels' resources and access widths, or [] (with a note) where nvcc is missing."""
    from genfast.cpp import SOURCE_ROOT
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return [k for source in sorted((SOURCE_ROOT / "csrc" / "cuda").glob("*.cu"))
                    for k in machine_code.cuda_kernels(source, Path(tmp))]
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"CUDA C++ kernels left out: {exc}", file=sys.stderr)
        return []


def _calibration() -> tuple[list[dict], str | None]:
    """The calibration points scored by the model (bench/calibration.py), or [] and why not."""
    reason = calibration.missing()
    if reason:
        print(f"calibration left out: {reason}", file=sys.stderr)
        return [], f"Left out: {reason}."
    return calibration.records(calibration.compile_all()), None


def run(args) -> int:
    started = time.perf_counter()
    import triton
    stamp = datetime.now(timezone.utc)
    stem = args.out / f"static-sm90-{stamp:%Y%m%d}{'-quick' if args.quick else ''}{'-' + args.tag if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    found = rows(args.quick, args.ops, progress=lambda c: print(f"  {c.op} {c.shape} {c.layout} {c.dtype} {c.variant}",
                                                      file=sys.stderr))
    cuda = [] if args.quick else _cuda_kernels()
    calibration_points, calibration_note = _calibration()
    machine = machine_info(torch.device("cpu"), 1)
    info = dict(commit=machine["commit"], tree=machine["tree"], triton=triton.__version__, torch=torch.__version__,
                arch=f"sm_{machine_code.ARCH}", gpus={k: vars(g) for k, g in roofline.GPUS.items()},
                model=dict(vars(roofline.MODEL), dependent_latencies=roofline.DEPENDENT_LATENCIES,
                           residuals=roofline.RESIDUALS),
                created_utc=stamp.isoformat(timespec="seconds"), wall_s=round(time.perf_counter() - started, 1))
    report = dict(info=info, rows=found, calibration=calibration_points, cuda_kernels=cuda)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = (f"# Static sm_90 report ({'quick subset' if args.quick else 'full table'})\n\n"
            f"Commit {info['commit']}, Triton {info['triton']}, torch {info['torch']}; model in bench/README.md ("
            + "; ".join(f"{g.name}: {g.sms} SMs, {g.clock_hz / 1e9:.4g} GHz, {g.bandwidth / 1e12:.1f} TB/s"
                        for g in roofline.GPUS.values()) + ").\n\n"
            f"{_summary(found)}\n\n{table(found)}\n")
    text += "\n## Calibration: published timings of public kernels against the model\n\n" + (
        calibration_note or calibration.table(calibration_points)) + "\n"
    broken = [f"- {r['op']} {r['shape']} {r['layout']} {r['dtype']} {r['variant']} {r['direction']}: "
              + "; ".join(problems(r)) for r in found if problems(r)]
    if broken:
        text += "\n## Rows that break the rules\n\n" + "\n".join(broken) + "\n"
    if cuda:
        text += ("\n## CUDA C++ kernels (`csrc/cuda`, nvcc for sm_90)\n\n| kernel | regs | local B | ld B | st B | calls |\n"
                 "|---|---|---|---|---|---|\n" + "\n".join(
                     f"| `{_short_name(k['kernel'])}` | {k['registers']} | {k['spills']} | "
                     f"{'/'.join(map(str, k['load_bytes']))} | {'/'.join(map(str, k['store_bytes']))} | {k['calls']} |"
                     for k in cuda) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')} in {info['wall_s']:.0f} s")
    return 0
