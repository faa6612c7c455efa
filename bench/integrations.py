"""Drop-in acceleration of diffusers models (``genfast.integrations.diffusers.apply_genfast``), timed against the
unpatched model in eager mode and under ``torch.compile``:

- ``unet2d-train-step``: forward + backward of a ``UNet2DModel`` (loss = mean(output²)), parameters' grads reset
  to None before each call;
- ``vae-decode``: ``AutoencoderKL.decode`` of a latent under ``torch.no_grad()``.

Implementations: ``eager`` (unpatched), ``compile`` (``torch.compile`` of the unpatched model),
``genfast-<backend>`` (patched, on that genfast backend) and ``genfast-<backend>+compile``. Each row says which
backend actually ran the fused ops (``"auto"`` resolves per device: C++ kernels on the CPU when built, else the
PyTorch reference; Triton on CUDA). CPU timing: ``torch.utils.benchmark.Timer.blocked_autorange`` with a fixed
thread count, median over its blocks, after two warm-up calls (the first compiles); CUDA: the same timer after
``torch.cuda.synchronize`` in the statement.

Standalone: ``python -m genfast.bench.integrations [--quick] [--repeats N] [--threads 2] [--no-compile]``, or
``run(...)``, which returns the rows as dicts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.utils.benchmark as torch_benchmark

import genfast
from genfast._backend import resolve_backend, unavailable_reason

EAGER, COMPILE = "eager", "compile"
WARMUP_CALLS = 2


@dataclass(frozen=True)
class Config:
    """One benchmark: ``kind`` ("unet2d-train-step" or "vae-decode"), the diffusers model's constructor
    arguments, the batch and the input's spatial size (image for the UNet, latent for the VAE)."""

    kind: str
    batch: int
    size: int
    model_kwargs: dict


FULL = (
    Config("unet2d-train-step", 4, 32, dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2,
                                            norm_num_groups=32)),
    Config("vae-decode", 1, 32, dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4,
                                     norm_num_groups=32)),
)
QUICK = (
    Config("unet2d-train-step", 4, 16, dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                            up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    Config("vae-decode", 1, 16, dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                     norm_num_groups=8)),
)


def _vae_block_types(depth: int) -> dict:
    return dict(down_block_types=("DownEncoderBlock2D",) * depth, up_block_types=("UpDecoderBlock2D",) * depth)


def _build(config: Config, device: torch.device):
    """(model, call): the seeded model and a function of it that runs one timed call."""
    from diffusers import AutoencoderKL, UNet2DModel

    torch.manual_seed(0)
    if config.kind == "unet2d-train-step":
        model = UNet2DModel(sample_size=config.size, in_channels=3, out_channels=3, **config.model_kwargs)
        x = torch.randn(config.batch, 3, config.size, config.size, device=device)
        t = torch.randint(0, 1000, (config.batch,), device=device)

        def call(net):
            model.zero_grad(set_to_none=True)
            net(x, t).sample.square().mean().backward()
    elif config.kind == "vae-decode":
        kwargs = dict(config.model_kwargs)
        model = AutoencoderKL(in_channels=3, out_channels=3, **_vae_block_types(len(kwargs["block_out_channels"])),
                              **kwargs)
        z = torch.randn(config.batch, kwargs["latent_channels"], config.size, config.size, device=device)

        def call(net):
            with torch.no_grad():
                net(z)
    else:
        raise ValueError(f"config.kind must be 'unet2d-train-step' or 'vae-decode', got {config.kind!r}")
    return model.to(device), call


def _net(model, kind: str):
    """What gets compiled: the model's forward for the UNet, ``decode`` for the VAE (as a module call)."""
    return model if kind == "unet2d-train-step" else (lambda z: model.decode(z).sample)


def _time(fn: Callable[[], object], device: torch.device, threads: int, min_run_time: float) -> dict:
    for _ in range(WARMUP_CALLS):  # compiles under torch.compile; first-call allocations and thread-pool start-up
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        stmt = "fn(); torch.cuda.synchronize()"
    else:
        stmt = "fn()"
    timer = torch_benchmark.Timer(stmt=stmt, globals={"fn": fn, "torch": torch}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return dict(median_s=m.median, iqr_s=m.iqr if len(m.times) >= 3 else None, runs=len(m.times))


def _measure(config: Config, impl: str, backend: Optional[str], device: torch.device, *, threads: int,
             min_run_time: float) -> dict:
    row = dict(bench=config.kind, impl=impl, device=str(device), batch=config.batch, size=config.size,
               channels=list(config.model_kwargs["block_out_channels"]), threads=threads, backend_ran=None,
               median_s=None, iqr_s=None, runs=0, error=None)
    model, call = _build(config, device)
    compiled = impl.endswith(COMPILE)
    try:
        net = _net(model, config.kind)
        if compiled:
            torch._dynamo.reset()
            net = torch.compile(net)
        with genfast.use_backend(backend) if backend is not None else contextlib.nullcontext():
            if backend is not None:
                genfast.integrations.diffusers.apply_genfast(model)
                row["backend_ran"] = resolve_backend(device, torch.float32, "group_norm_silu")
            row.update(_time(lambda: call(net), device, threads, min_run_time))
    except Exception as exc:  # a row that cannot run reports why instead of stopping the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row


def run(*, device: str | torch.device = "cpu", backends: tuple[str, ...] = ("auto",), quick: bool = False,
        compile: bool = True, threads: int = 2, repeats: int = 1, min_run_time: float = 1.0,
        on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Time every config of ``QUICK`` (``quick``) or ``FULL`` for eager, compile (when ``compile``) and each usable
    genfast backend in ``backends`` (patched, eager and compiled), ``repeats`` times; returns one dict per timing
    with ``speedup`` = eager median / this median of the same repeat. ``on_row(row)`` is called as each row is
    measured (before its speedup is known)."""
    device = torch.device(device)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    import genfast.integrations.diffusers  # noqa: F401  (ImportError naming the extra when diffusers is missing)

    impls = [(EAGER, None)] + ([(COMPILE, None)] if compile else [])
    for backend in backends:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            print(f"skipping genfast backend {backend!r}: {reason}", file=sys.stderr)
            continue
        impls.append((f"genfast-{backend}", backend))
        if compile:
            impls.append((f"genfast-{backend}+{COMPILE}", backend))
    rows = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for repeat in range(repeats):
            for config in (QUICK if quick else FULL):
                group = []
                for impl, backend in impls:
                    group.append(dict(_measure(config, impl, backend, device, threads=threads,
                                               min_run_time=min_run_time), repeat=repeat))
                    if on_row is not None:
                        on_row(group[-1])
                eager = group[0]["median_s"]
                for row in group:
                    row["speedup"] = eager / row["median_s"] if eager and row["median_s"] else None
                rows += group
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'bench':<18} {'impl':<24} {'ran':<9} {'rep':>3} {'median ms':>10} {'IQR ms':>8} {'speedup':>7}"]
    for r in rows:
        median = f"{r['median_s'] * 1e3:10.1f}" if r["median_s"] else f"{'-':>10}"
        iqr = f"{r['iqr_s'] * 1e3:8.1f}" if r["iqr_s"] is not None else f"{'-':>8}"
        speedup = f"{r['speedup']:7.2f}" if r["speedup"] else f"{'-':>7}"
        line = f"{r['bench']:<18} {r['impl']:<24} {str(r['backend_ran'] or '-'):<9} {r['repeat']:>3} {median} {iqr} "
        lines.append(line + speedup + (f"  {r['error']}" if r["error"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--backends", nargs="+", default=["auto"], help="genfast backends to time (default: auto)")
    parser.add_argument("--quick", action="store_true", help="small models (seconds on a CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=1, help="times to repeat the whole set (default: 1)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed calls per row")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(device=args.device, backends=tuple(args.backends), quick=args.quick, compile=not args.no_compile,
               threads=args.threads, repeats=args.repeats, min_run_time=args.min_run_time,
               on_row=lambda row: print(f"measured {row}", file=sys.stderr, flush=True))
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
