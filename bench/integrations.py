"""``genfast bench --integrations``: diffusers models patched with ``genfast.integrations.diffusers.apply_genfast``
against the same model unpatched, on the suite's runner (timing, profiling, table, JSON / CSV / plots):

- ``diffusers/UNet2DModel train-step``: forward + backward of a ``UNet2DModel`` (loss = mean(output²)), the
  parameters' grads reset to None before each call;
- ``diffusers/AutoencoderKL.decode forward``: ``AutoencoderKL.decode`` of a latent under ``torch.no_grad()``.

Implementations: ``eager`` (unpatched: diffusers' own code, what a user runs today), ``compile``
(``torch.compile`` of the unpatched model), ``genfast-<backend>`` (patched, the fused ops on that backend; the
fast backends of ``runner.fast_backends`` that have GroupNorm+SiLU kernels on the device) and
``genfast-<backend>+compile``. The implementations of one model are timed in turns (``runner.measure_group``).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import genfast
import genfast.ops.group_norm_silu

from .ops import Case
from .runner import COMPILE, EAGER, Row, fast_backends, genfast_impl, measure_group, runs_op

WARMUP_CALLS = 2  # the first compiles under torch.compile; a second call catches a recompile


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
CASES = {"unet2d-train-step": ("diffusers/UNet2DModel", "train-step"),
         "vae-decode": ("diffusers/AutoencoderKL.decode", "forward")}


def case_of(config: Config) -> Case:
    """The row family: the model, its channels as the variant, the input's shape."""
    op, mode = CASES[config.kind]
    channels = "ch" + "-".join(map(str, config.model_kwargs["block_out_channels"]))
    in_channels = 3 if config.kind == "unet2d-train-step" else config.model_kwargs["latent_channels"]
    return Case(op=op, shape=(config.batch, in_channels, config.size, config.size), mode=mode, variant=channels)


def _vae_block_types(depth: int) -> dict:
    return dict(down_block_types=("DownEncoderBlock2D",) * depth, up_block_types=("UpDecoderBlock2D",) * depth)


def _model(config: Config, device: torch.device):
    """(model, call): the model (seeded by the runner) and a function of the module to run that makes one call."""
    from diffusers import AutoencoderKL, UNet2DModel

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
    """What runs (and is compiled): the model's forward for the UNet, ``decode`` for the VAE."""
    return model if kind == "unet2d-train-step" else (lambda z: model.decode(z).sample)


def _backend(impl: str) -> Optional[str]:
    """The genfast backend of a patched implementation; None for the unpatched eager / compile."""
    base = impl.removesuffix("+" + COMPILE)
    return None if base in (EAGER, COMPILE) else base.removeprefix("genfast-")


def _build(config: Config, impl: str, device: torch.device) -> Callable[[], None]:
    import genfast.integrations.diffusers as patch

    model, call = _model(config, device)
    backend = _backend(impl)
    scope = (lambda: genfast.use_backend(backend)) if backend is not None else contextlib.nullcontext
    if backend is not None:
        patch.apply_genfast(model)
    net = _net(model, config.kind)
    if impl == COMPILE or impl.endswith("+" + COMPILE):
        net = torch.compile(net)

    def run():
        with scope():
            call(net)

    for _ in range(WARMUP_CALLS):
        run()
    return run


def impls(backends: list[str], device: torch.device, *, compile_too: bool) -> list[str]:
    """eager, compile (with ``compile_too``), and genfast-<b> (+compile) for each fast backend with GroupNorm+SiLU
    kernels on ``device``."""
    fast = [genfast_impl(b) for b in fast_backends(backends)
            if runs_op(b, genfast.ops.group_norm_silu.OP, device)]
    out = [EAGER] + ([COMPILE] if compile_too else []) + fast
    return out + ([f"{impl}+{COMPILE}" for impl in fast] if compile_too else [])


def measure(config: Config, impl_names: list[str], device: torch.device, *, threads: int, min_run_time: float,
            rounds: int) -> list[Row]:
    """Times one diffusers config under each of ``impl_names``, in turns."""
    builds = {impl: functools.partial(_build, config, impl, device) for impl in impl_names}
    return measure_group(case_of(config), builds, device, nbytes=0, threads=threads, min_run_time=min_run_time,
                         rounds=rounds)


def tasks(backends: list[str], device: torch.device, *, quick: bool, compile_too: bool,
          **timing) -> list[Callable[[], list[Row]]]:
    """One callable per config; each returns the config's rows. Raises ImportError (naming the extra) when
    diffusers is missing."""
    import genfast.integrations.diffusers  # noqa: F401

    names = impls(backends, device, compile_too=compile_too)
    return [functools.partial(measure, config, names, device, **timing) for config in (QUICK if quick else FULL)]
