"""The stated model of ``genfast bench --static``: a kernel's predicted time from its machine code, calibrated
against published timings of public kernels (``bench/calibration.py``).

For one launch of P programs (CTAs) of W warps, with I SASS instructions issued per thread, R registers per thread,
T bytes of tile traffic (loads and stores that move the op's tensors) and N bytes of non-tile traffic:

    occupancy  CTAs/SM = min(register file ÷ (W·32·R rounded to 256-register warps), 64 warps ÷ W,
                             shared memory ÷ CTA's shared memory, 32)
    waves      w = ⌈P ÷ (CTAs/SM · SMs)⌉                                 the last one may be partly empty (tail)
    memory     t_mem   = (T + N + spilled bytes beyond L1) ÷ bandwidth
    issue      t_issue = ⌈P ÷ SMs⌉·W·I ÷ (min(4, resident warps per SM) · clock)   busiest SM, 4 warp-instr/cycle
    latency    t_lat   = loaded bytes · latency ÷ (bytes in flight per SM · active SMs)   Little's law
                         (w · latency for a kernel without a tile loop: each wave waits for its loads once)
    blend      t_core  = (t_mem^p + t_issue^p + t_lat^p)^(1/p)            overlap is imperfect near the ridge
    chain      t_chain = κ · w · (latency + I·max(1, W/4) ÷ clock) ÷ CTAs/SM
                         for a reduction without a tile loop (one tile per CTA): a CTA cannot overlap its own
                         load → reduce → store chain; the other resident CTAs hide all but 1/(CTAs/SM) of it
    kernel     t       = t_core + t_chain
    op         t_op    = t_launch + Σ kernels t + (launches − 1) · t_dependent

where the bytes in flight of a CTA are its tile loads of one loop iteration (of the whole kernel without a tile
loop), resident CTAs per SM = min(CTAs/SM, ⌈P ÷ SMs⌉) and active SMs = min(SMs, P). Non-tile traffic counts each
non-tile access once per program (per trip in a loop) at its width: per-program scalars (statistics, partials,
coefficients); vectors of small shared tensors (weights) hit L2 and cost their instructions. Spilled registers cost
their STL/LDL instructions (in I) and DRAM traffic (a store and a load) only when a SM's resident threads spill more
than its L1 holds. Launches are every kernel of the op call, torch's (B, C)-sized ones and the seed draw included;
torch kernels add launches, not streaming time.

Constants (fitted by ``python -m bench.calibration --fit`` on the points of ``bench/calibration.py``: a minimax
fit of |log(published ÷ predicted)| over a grid; residuals in bench/NOTES.md):

    t_launch = LAUNCH_S      the first launch of an op: launch, ramp-up and drain of one kernel, as do_bench sees it
    κ        = CHAIN_EXPOSED the exposed fraction of a one-tile CTA's chain
    p        = BLEND_P       the blend's exponent (p → ∞ is the perfect max of the plain roofline)

Not fitted: t_dependent = DEPENDENT_LATENCIES DRAM latencies (a kernel that waits for the previous one pays its
stores' drain and its own first loads); the published kernels are single launches, so it is bounded instead: the
range's high end charges t_launch per dependent launch. A prediction's range is [t·r_low, t_high·r_high], r the
extreme published ÷ predicted ratios of the calibration (``RESIDUALS``), t_high = t with t_dependent = t_launch.
An op's predicted fraction of bandwidth is (minimal bytes ÷ bandwidth) ÷ t_op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .machine_code import Launch, MachineCode

LAUNCH_S = 5.6e-6
CHAIN_EXPOSED = 0.58
BLEND_P = 3.0
DEPENDENT_LATENCIES = 2
RESIDUALS = (0.935, 1.067)  # (lowest, highest) published ÷ predicted of the calibration points


@dataclass(frozen=True)
class Model:
    """The fitted constants (see the module docstring)."""
    launch_s: float = LAUNCH_S
    chain_exposed: float = CHAIN_EXPOSED
    blend_p: float = BLEND_P


MODEL = Model()


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float
    bandwidth: float  # bytes/s, a measured device-to-device copy
    latency_s: float = 700e-9  # DRAM load latency under load
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_cta: int = 1024
    l1_per_sm: int = 256 * 1024  # L1 and shared memory together

    @property
    def bytes_to_cover_latency(self) -> float:
        """Little's law: the bytes in flight per SM that keep the memory system busy."""
        return self.bandwidth * self.latency_s / self.sms

    @property
    def dependent_s(self) -> float:
        return DEPENDENT_LATENCIES * self.latency_s


H200 = Gpu("H200", sms=132, clock_hz=1.98e9, bandwidth=4.3e12)
H100 = Gpu("H100 SXM", sms=132, clock_hz=1.755e9, bandwidth=3.0e12)
# the calibration's GPU (Liger-Kernel's committed H100 data): rated 3.9 TB/s, scaled by the H100 SXM's measured copy
# over its rated bandwidth (3.0 ÷ 3.35); 132 SMs, 1.785 GHz boost
H100_NVL = Gpu("H100 NVL", sms=132, clock_hz=1.785e9, bandwidth=3.9e12 * 3.0 / 3.35)
GPUS = {"h200": H200, "h100": H100}


def ctas_per_sm(code: MachineCode, num_warps: int, gpu: Gpu) -> int:
    warp_registers = math.ceil(max(code.registers, 1) * 32 / 256) * 256
    by_registers = (gpu.registers_per_sm // warp_registers) // num_warps
    by_warps = gpu.max_warps_per_sm // num_warps
    by_shared = (gpu.shared_per_sm // (code.shared + gpu.shared_reserved_per_cta)) if code.shared else gpu.max_ctas_per_sm
    return max(0, min(by_registers, by_warps, by_shared, gpu.max_ctas_per_sm))


def tile_elements(launch: Launch) -> int:
    """Elements of one tile: the product of the kernel's BLOCK_C, BLOCK_S, BLOCK or BLOCK_SIZE constexprs."""
    return math.prod(launch.constant(name, 1) for name in ("BLOCK_C", "BLOCK_S", "BLOCK", "BLOCK_SIZE"))


@dataclass
class Shape:
    """What the model needs of one launch, read from its machine code, independent of the GPU."""
    programs: int
    num_warps: int
    per_thread: float  # SASS instructions a thread issues (tile loops weighted by their trips)
    traffic: float  # tile bytes moved
    non_tile: float  # non-tile bytes moved
    loaded: float  # tile bytes loaded
    first_loads: float  # tile bytes one thread has in flight (one loop iteration)
    looped: bool  # the tile accesses sit in a loop
    reduces: bool  # a cross-lane reduction (the stores wait for the whole tile)


@dataclass
class KernelEstimate:
    name: str
    programs: int
    num_warps: int
    registers: int
    spill_bytes: int
    ctas_per_sm: int
    load_bytes: list  # widths (bytes per thread) of the tile loads
    store_bytes: list  # ... and stores
    instructions: float  # thread-instructions issued by the whole launch
    traffic: float  # tile bytes moved
    in_flight_per_sm: float
    seconds: dict  # gpu key -> predicted seconds
    local_accesses: int = 0  # SASS local-memory loads and stores


def shape_of(launch: Launch, code: MachineCode, elements: int, reduces: bool) -> Shape:
    """A tile loop runs ``per_split`` times where the kernel takes that argument (the GroupNorm split path), else
    ⌈elements per program ÷ tile⌉; SASS instructions are weighted like the PTX's."""
    threads = 32 * launch.options.num_warps
    programs = max(launch.programs, 1)
    tile = tile_elements(launch)
    trips = launch.ints.get("per_split") or max(1, math.ceil(elements / programs / tile))
    lanes = min(1.0, elements / (programs * tile * trips))  # the fraction of the tiles' lanes in bounds
    dynamic_ptx = code.ptx_instructions + code.tile_loop_instructions * (trips - 1)
    tiles = [a for a in code.accesses if a.tile]
    looped = any(a.in_loop for a in tiles)
    count = lambda a: trips if a.in_loop else 1
    return Shape(
        programs=programs, num_warps=launch.options.num_warps,
        per_thread=code.sass_instructions * dynamic_ptx / max(code.ptx_instructions, 1),
        traffic=sum(a.width * count(a) for a in tiles) * threads * programs * lanes,
        non_tile=sum(a.width * count(a) for a in code.accesses if not a.tile) * programs,
        loaded=sum(a.width * count(a) for a in tiles if not a.store) * threads * programs * lanes,
        first_loads=sum(a.width for a in tiles if not a.store and (a.in_loop or not looped)) * threads * lanes,
        looped=looped, reduces=reduces)


def kernel_seconds(shape: Shape, code: MachineCode, gpu: Gpu, model: Model = MODEL) -> dict:
    """The terms of the module docstring for one launch on ``gpu``: {term: seconds}, "time" their result."""
    fit = max(1, ctas_per_sm(code, shape.num_warps, gpu))
    threads = 32 * shape.num_warps
    resident = min(fit, math.ceil(shape.programs / gpu.sms))
    active = min(gpu.sms, shape.programs)
    waves = math.ceil(shape.programs / (fit * gpu.sms))
    spilled = code.spill_bytes * threads * resident
    spill_traffic = 2 * code.spill_bytes * threads * shape.programs if spilled > gpu.l1_per_sm else 0.0
    t_mem = (shape.traffic + shape.non_tile + spill_traffic) / gpu.bandwidth
    t_issue = math.ceil(shape.programs / gpu.sms) * shape.num_warps * shape.per_thread / (
        min(4, resident * shape.num_warps) * gpu.clock_hz)
    in_flight = resident * shape.first_loads
    if not shape.looped:
        t_lat = waves * gpu.latency_s if shape.loaded else 0.0
    else:
        t_lat = shape.loaded * gpu.latency_s / (in_flight * active) if in_flight else 0.0
    p = model.blend_p
    t_core = (t_mem ** p + t_issue ** p + t_lat ** p) ** (1 / p)
    t_chain = 0.0
    if shape.reduces and not shape.looped and shape.loaded:
        cta_issue = shape.per_thread * max(1.0, shape.num_warps / 4) / gpu.clock_hz
        t_chain = model.chain_exposed * waves * (gpu.latency_s + cta_issue) / fit
    return dict(mem=t_mem, issue=t_issue, latency=t_lat, chain=t_chain, waves=waves, in_flight=in_flight,
                time=t_core + t_chain)


def estimate(launch: Launch, code: MachineCode, elements: int, reduces: bool) -> KernelEstimate:
    """Apply the model to one launch over an op of ``elements`` tile elements (see the module docstring)."""
    shape = shape_of(launch, code, elements, reduces)
    parts = {key: kernel_seconds(shape, code, gpu) for key, gpu in GPUS.items()}
    tiles = [a for a in code.accesses if a.tile]
    return KernelEstimate(launch.name, shape.programs, shape.num_warps, code.registers, code.spill_bytes,
                          ctas_per_sm(code, shape.num_warps, H200), sorted({a.width for a in tiles if not a.store}),
                          sorted({a.width for a in tiles if a.store}),
                          shape.per_thread * 32 * shape.num_warps * shape.programs, shape.traffic,
                          parts["h200"]["in_flight"], {key: p["time"] for key, p in parts.items()},
                          code.local_accesses)


def op_seconds(kernel_times: list, launches: int, gpu: Gpu, model: Model = MODEL) -> tuple[float, float]:
    """(t_op, t_op with every dependent launch charged t_launch) of an op of ``launches`` launches whose Triton
    kernels take ``kernel_times``."""
    streaming = sum(kernel_times)
    dependent = max(0, launches - 1)
    return (model.launch_s + streaming + dependent * gpu.dependent_s,
            model.launch_s + streaming + dependent * model.launch_s)


def predicted_range(point_s: float, high_s: float) -> tuple[float, float]:
    """[low, high] seconds: the point scaled by the calibration's lowest ratio, the dependent-launch bound by its
    highest."""
    return point_s * RESIDUALS[0], high_s * RESIDUALS[1]


def is_reduction(compiled) -> bool:
    """Whether a compiled kernel reduces across lanes (warp shuffles in its PTX): its stores wait for its tile."""
    return "shfl.sync" in compiled.asm["ptx"]
