"""The stated roofline of ``genfast bench --static``: a kernel's predicted time from its machine code.

For one launch of P programs (CTAs) of W warps, with I SASS instructions issued per thread, R registers per thread
and T bytes of tile traffic (loads and stores that move the op's tensors):

    occupancy  CTAs/SM = min(register file ÷ (W·32·R rounded to 256-register warps), 64 warps ÷ W,
                             shared memory ÷ CTA's shared memory, 32)
    issue      t_issue = P·W·I ÷ (active SMs · min(4, resident warps per SM) · clock)    4 warp-instructions/cycle
    memory     t_mem   = T ÷ bandwidth
    latency    t_lat   = loaded bytes · latency ÷ (bytes in flight per SM · active SMs)   Little's law
    time       t       = max(t_mem, t_issue, t_lat)

where the bytes in flight of a CTA are its tile loads of one loop iteration (of the whole kernel without a tile
loop), resident CTAs per SM = min(CTAs/SM, ⌈P ÷ SMs⌉) and active SMs = min(SMs, P). Latency is covered when the
bytes in flight per SM reach bandwidth · latency ÷ SMs (about 23 KB on an H200); below that t_lat exceeds t_mem.
An op's time is the sum over its kernels (torch kernels of (B, C)-sized tensors count as launches, not time);
its predicted fraction of bandwidth is (minimal bytes ÷ bandwidth) ÷ time. Launch latency is not in the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .machine_code import Launch, MachineCode


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

    @property
    def bytes_to_cover_latency(self) -> float:
        """Little's law: the bytes in flight per SM that keep the memory system busy."""
        return self.bandwidth * self.latency_s / self.sms


H200 = Gpu("H200", sms=132, clock_hz=1.98e9, bandwidth=4.3e12)
H100 = Gpu("H100 SXM", sms=132, clock_hz=1.755e9, bandwidth=3.0e12)
GPUS = {"h200": H200, "h100": H100}


def ctas_per_sm(code: MachineCode, num_warps: int, gpu: Gpu) -> int:
    warp_registers = math.ceil(max(code.registers, 1) * 32 / 256) * 256
    by_registers = (gpu.registers_per_sm // warp_registers) // num_warps
    by_warps = gpu.max_warps_per_sm // num_warps
    by_shared = (gpu.shared_per_sm // (code.shared + gpu.shared_reserved_per_cta)) if code.shared else gpu.max_ctas_per_sm
    return max(0, min(by_registers, by_warps, by_shared, gpu.max_ctas_per_sm))


def tile_elements(launch: Launch) -> int:
    """Elements of one tile: the product of the kernel's BLOCK_C, BLOCK_S or BLOCK constexprs."""
    return math.prod(launch.constant(name, 1) for name in ("BLOCK_C", "BLOCK_S", "BLOCK"))


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


def estimate(launch: Launch, code: MachineCode, elements: int) -> KernelEstimate:
    """Apply the model to one launch over an op of ``elements`` tile elements (see the module docstring). A tile
    loop runs ``per_split`` times where the kernel takes that argument (the GroupNorm split path), else
    ⌈elements per program ÷ tile⌉; SASS instructions are weighted like the PTX's."""
    threads = 32 * launch.options.num_warps
    programs = max(launch.programs, 1)
    tile = tile_elements(launch)
    trips = launch.ints.get("per_split") or max(1, math.ceil(elements / programs / tile))
    lanes = min(1.0, elements / (programs * tile * trips))  # the fraction of the tiles' lanes in bounds
    dynamic_ptx = code.ptx_instructions + code.tile_loop_instructions * (trips - 1)
    per_thread = code.sass_instructions * dynamic_ptx / max(code.ptx_instructions, 1)
    tiles = [a for a in code.accesses if a.tile]
    moved = sum(a.width * (trips if a.in_loop else 1) for a in tiles)
    loaded = sum(a.width * (trips if a.in_loop else 1) for a in tiles if not a.store)
    looped = any(a.in_loop for a in tiles)
    first_loads = [a.width for a in tiles if not a.store and (a.in_loop or not looped)]
    traffic = moved * threads * programs * lanes
    seconds, resident_ctas, in_flight_h200 = {}, 0, 0.0
    for key, gpu in GPUS.items():
        fit = ctas_per_sm(code, launch.options.num_warps, gpu)
        resident = max(1, min(fit, math.ceil(programs / gpu.sms)))
        active = min(gpu.sms, programs)
        in_flight = resident * sum(first_loads) * threads * lanes
        t_issue = programs * launch.options.num_warps * per_thread / (
            active * min(4, resident * launch.options.num_warps) * gpu.clock_hz)
        t_mem = traffic / gpu.bandwidth
        t_lat = loaded * threads * programs * lanes * gpu.latency_s / (in_flight * active) if in_flight else 0.0
        seconds[key] = max(t_issue, t_mem, t_lat)
        if key == "h200":
            resident_ctas, in_flight_h200 = fit, in_flight
    return KernelEstimate(launch.name, programs, launch.options.num_warps, code.registers, code.spill_bytes,
                          resident_ctas, sorted({a.width for a in tiles if not a.store}),
                          sorted({a.width for a in tiles if a.store}), per_thread * threads * programs,
                          traffic, in_flight_h200, seconds)
