"""How the suite measures: time (median and IQR), peak memory, kernel launches and the device's copy bandwidth.

Time: the implementations of one case are timed in turns (:func:`time_interleaved`: rounds of one block each), so
that the load of a shared machine moves them alike; a block is ``triton.testing.do_bench`` on CUDA (L2 flushed
before each call) and ``torch.utils.benchmark.Timer.timeit`` with a fixed thread count on the CPU; the median and
IQR are over the blocks' samples. :func:`time_call` (``blocked_autorange``) times one callable alone: the copy
bandwidth.
Memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
before the call; on the CPU the peak of the bytes allocated and not yet freed during one call, replayed in time
order from the allocator events ``torch.profiler`` records with ``profile_memory=True`` (the call's temporaries,
outputs and autograd buffers; not memory held before it).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.utils.benchmark as torch_benchmark
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the interquartile range (q75 − q25) over ``runs`` timed blocks."""

    median: float
    iqr: float
    runs: int


MIN_CPU_RUNS = 3


def time_call(fn: Callable[[], object], device: torch.device, *, threads: int, min_run_time: float) -> Timing:
    """Times ``fn()`` on ``device``, which the caller has called once already (the warm-up: first-call allocations,
    lazy initialisation, compilation): do_bench on CUDA (``min_run_time`` seconds of repetitions); on the CPU
    blocked_autorange with ``threads`` threads for ``min_run_time`` seconds, topped up to MIN_CPU_RUNS single
    calls when a call is slower than that."""
    if device.type == "cuda":
        import triton.testing

        q25, q50, q75 = triton.testing.do_bench(fn, warmup=25, rep=max(1, int(min_run_time * 1000)),
                                                quantiles=[0.25, 0.5, 0.75])
        return Timing(median=q50 / 1e3, iqr=(q75 - q25) / 1e3, runs=max(1, int(min_run_time * 1000 / q50)))
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    while len(times) < MIN_CPU_RUNS:  # a call slower than the budget: a median of a few, not one sample
        times += timer.timeit(1).times
    q25, median, q75 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median=median, iqr=q75 - q25, runs=len(times))


def _calls_per_block(fn: Callable[[], object], device: torch.device, block_s: float) -> int:
    """How many calls of ``fn`` fill about ``block_s`` seconds: 1, 10, 100, … calls are timed until a batch takes
    10 ms (or the block), then scaled; at least 1."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min(0.01, block_s) or number >= 10**6:
            return max(1, int(block_s * number / elapsed)) if elapsed > 0 else number
        number *= 10


def _cpu_block(fn: Callable[[], object], threads: int, number: int) -> float:
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.timeit(number).mean


def _cuda_block(fn: Callable[[], object], block_s: float) -> list[float]:
    import triton.testing

    return [t / 1e3 for t in triton.testing.do_bench(fn, warmup=1, rep=max(1, int(block_s * 1000)),
                                                     return_mode="all")]


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, *, threads: int,
                     min_run_time: float, rounds: int) -> tuple[dict[str, Timing], dict[str, Exception]]:
    """Times several implementations of one case in turns, so that a change in the machine's load (shared,
    noisy CPUs) hits all of them alike: ``rounds`` rounds, each timing one block of every call in turn, a block
    being about ``min_run_time / rounds`` seconds of calls (at least one call). CPU: a block is
    ``torch.utils.benchmark.Timer.timeit`` with ``threads`` threads and gives one sample, the mean call time of the
    block; CUDA: ``do_bench`` (L2 flushed before each call) and every call is a sample. The median and IQR are
    over the samples. Each call has been called once already (the warm-up). Returns ({impl: Timing},
    {impl: the exception that stopped it}); an implementation that raises drops out, the others go on."""
    block_s = min_run_time / rounds
    samples: dict[str, list[float]] = {}
    numbers: dict[str, int] = {}
    errors: dict[str, Exception] = {}
    for _ in range(max(rounds, MIN_CPU_RUNS)):
        for name, fn in calls.items():
            if name in errors:
                continue
            try:
                if device.type == "cuda":
                    samples.setdefault(name, []).extend(_cuda_block(fn, block_s))
                    continue
                if name not in numbers:
                    numbers[name] = _calls_per_block(fn, device, block_s)
                samples.setdefault(name, []).append(_cpu_block(fn, threads, numbers[name]))
            except Exception as exc:  # one implementation failing must not stop the others
                errors[name] = exc
    timings = {}
    for name, times in samples.items():
        if name in errors or not times:
            continue
        if len(times) == 1:
            timings[name] = Timing(median=times[0], iqr=0.0, runs=1)
            continue
        q25, median, q75 = statistics.quantiles(times, n=4, method="inclusive")
        timings[name] = Timing(median=median, iqr=q75 - q25, runs=len(times))
    return timings, errors


def _busy_cpu_seconds() -> Optional[float]:
    """CPU seconds all processes have spent busy since boot (/proc/stat: every field but idle and iowait), None
    where /proc/stat cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Context manager: ``cores`` is the mean number of cores other processes kept busy while it was open (all
    processes' busy time from /proc/stat minus this process's own, over the wall time); None off Linux. On a
    shared machine it says which rows ran next to someone else's work."""

    def __enter__(self):
        self.cores = None
        self._busy, self._own, self._wall = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, wall = _busy_cpu_seconds(), time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy) - (_own_cpu_seconds() - self._own)) / wall
        return False


def wait_for_quiet(threshold: float, max_wait_s: float, sample_s: float = 2.0) -> Optional[float]:
    """Waits (up to ``max_wait_s``) until other processes keep fewer than ``threshold`` cores busy over a
    ``sample_s`` window; returns the last window's figure (None off Linux, at once)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with OtherLoad() as others:
            time.sleep(sample_s)
        if others.cores is None or others.cores < threshold or time.perf_counter() >= deadline:
            return others.cores


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class CallProfile:
    """Peak bytes allocated during one call and, on CUDA, the number of kernels it launched (None on the CPU)."""

    peak_bytes: int
    kernel_launches: Optional[int]


def _cpu_peak_bytes(events) -> int:
    """The peak of the running sum of allocations (+) and frees (−), in time order, from the profiler's events."""
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in memory:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 to /dev/null: the profiler's native start/stop lines would garble the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_call(fn: Callable[[], object], device: torch.device) -> CallProfile:
    """Runs ``fn()`` once more and reports its peak memory and (CUDA) kernel launches; see the module docstring."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        launches = sum(1 for e in prof.profiler.kineto_results.events()
                       if e.device_type() == torch.autograd.DeviceType.CUDA and not e.name().startswith("Memcpy")
                       and not e.name().startswith("Memset"))
        return CallProfile(peak_bytes=peak, kernel_launches=launches)
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    return CallProfile(peak_bytes=_cpu_peak_bytes(prof.profiler.kineto_results.events()), kernel_launches=None)


def copy_bandwidth(device: torch.device, *, nbytes: int, threads: int, min_run_time: float) -> float:
    """The device's achievable bandwidth in bytes/s: ``dst.copy_(src)`` of two fp32 buffers of ``nbytes`` each,
    counted as 2·nbytes (one read, one write)."""
    numel = max(1, nbytes // 4)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the first touch of dst's pages
    timing = time_call(lambda: dst.copy_(src), device, threads=threads, min_run_time=min_run_time)
    return 2 * numel * 4 / timing.median


def _cpu_last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache from sysfs (Linux), 0 where it cannot be read."""
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        value = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        best = max(best, (level, value))
    return best[1]


def input_copies(device: torch.device, working_set_bytes: int, *, limit: int = 8) -> int:
    """How many copies of a case's inputs to rotate through so that a call does not find them in cache: enough to
    cover twice the L2 (CUDA) or the last-level cache (CPU), at most ``limit``."""
    if working_set_bytes <= 0:
        return 1
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    else:
        cache = _cpu_last_level_cache_bytes()
    return int(min(limit, max(1, math.ceil(2 * cache / working_set_bytes))))
