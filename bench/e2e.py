"""End-to-end: one training step (forward, backward, Adam) of the VAE, WGAN-GP and DDPM U-Net models of
``genfast.models``, per implementation:

- ``eager``: the models on genfast's "torch" backend: every op is the plain PyTorch composite of
  ``genfast.composite`` (``torch.randn`` noise, ``F.group_norm`` → ``F.silu``, the autograd penalty), the code a
  user writes without genfast;
- ``genfast-<backend>``: the models on each fast backend (Triton on CUDA, C++ on the CPU when built; the
  "reference" backend only where neither runs);
- ``compile`` and ``genfast-<backend>+compile``: the same with the model code under ``torch.compile``.

The implementations of one model are timed in turns (``runner.measure_group``).

A WGAN-GP step is one critic step (Wasserstein loss + gradient penalty, weight 10) and one generator step. The
penalty differentiates the critic twice, which AOTAutograd does not support, so under ``torch.compile`` only the
generator is compiled. Steps/s = 1 / median step time.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

import genfast
from genfast import models

from .ops import Case
from .runner import COMPILE, EAGER, Row, fast_backends, genfast_impl, measure_group

MODE = "train-step"
BASELINE = "torch"  # the backend of the eager and compile rows: genfast.composite, the code a user writes


@dataclass(frozen=True)
class ModelSize:
    """A model configuration and its batch: ``kwargs`` go to the model's constructor."""

    batch: int
    image_size: int
    kwargs: dict


FULL_SIZES = {
    "vae": ModelSize(128, 64, dict(latent_dim=128, base_channels=32)),
    "wgan_gp": ModelSize(64, 64, dict(base_channels=64)),
    "ddpm": ModelSize(32, 64, dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2)),
}
QUICK_SIZES = {
    "vae": ModelSize(32, 32, dict(latent_dim=64, base_channels=16)),
    "wgan_gp": ModelSize(16, 32, dict(base_channels=16)),
    "ddpm": ModelSize(8, 16, dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(8,))),
}
# --targets: the C++ CPU backend's training-step targets: the demo's VAE on 64×64 faces (`make demo`: batch 64,
# latent 32) and a small DDPM U-Net at 32×32.
TARGET_SIZES = {
    "vae": ModelSize(64, 64, dict(latent_dim=32, base_channels=32)),
    "ddpm": ModelSize(8, 32, dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                  attention_resolutions=(16,))),
}


def _compiled(fn: Callable, compile_it: bool) -> Callable:
    return torch.compile(fn) if compile_it else fn


def _vae_step(size: ModelSize, device, compile_it: bool) -> Callable[[], None]:
    model = models.ConvVAE(image_size=size.image_size, **size.kwargs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(size.batch, 3, size.image_size, size.image_size, device=device)
    loss_fn = _compiled(lambda images: model.loss(images)["loss"], compile_it)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        optimizer.step()

    return step


def _wgan_step(size: ModelSize, device, compile_it: bool) -> Callable[[], None]:
    generator = models.Generator(image_size=size.image_size, **size.kwargs).to(device)
    critic = models.Critic(image_size=size.image_size, **size.kwargs).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    real = torch.rand(size.batch, 3, size.image_size, size.image_size, device=device) * 2 - 1
    generate = _compiled(generator, compile_it)

    def step():
        z = torch.randn(size.batch, generator.latent_dim, device=device)
        fake = generate(z).detach()
        critic_loss = critic(fake).mean() - critic(real).mean() + genfast.gradient_penalty(critic, real, fake)
        opt_c.zero_grad(set_to_none=True)
        critic_loss.backward()
        opt_c.step()
        z = torch.randn(size.batch, generator.latent_dim, device=device)
        generator_loss = -critic(generate(z)).mean()
        opt_g.zero_grad(set_to_none=True)
        generator_loss.backward()
        opt_g.step()

    return step


def _ddpm_step(size: ModelSize, device, compile_it: bool) -> Callable[[], None]:
    unet = models.UNet(image_size=size.image_size, **size.kwargs)
    model = models.DDPM(unet=unet).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand(size.batch, 3, size.image_size, size.image_size, device=device) * 2 - 1
    loss_fn = _compiled(model.loss, compile_it)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x0).backward()
        optimizer.step()

    return step


STEPS = {"vae": _vae_step, "wgan_gp": _wgan_step, "ddpm": _ddpm_step}
WARMUP_CALLS = 2  # the first compiles (and creates the optimizer state); a second call catches a recompile


def e2e_impls(backends: list[str], *, compile_too: bool) -> list[str]:
    """eager, genfast-<b> for each fast backend (``runner.fast_backends``), and (with ``compile_too``) compile and
    the genfast variants compiled."""
    fast = [genfast_impl(b) for b in fast_backends(backends)]
    impls = [EAGER] + fast
    if compile_too:
        impls += [COMPILE] + [f"{impl}+compile" for impl in fast]
    return impls


def backend_of(impl: str) -> str:
    """The genfast backend an implementation runs the models on: "torch" (the plain composites) for eager and
    compile, else the one in its name."""
    base = impl.removesuffix("+compile")
    return BASELINE if base in (EAGER, COMPILE) else base.removeprefix("genfast-")


def _build(name: str, size: ModelSize, impl: str, device) -> Callable[[], None]:
    """The step for ``impl``, run under its backend (the backend is read when an op is called or traced; dynamo
    guards on it, so compiled steps of different backends keep separate graphs)."""
    compile_it = impl == COMPILE or impl.endswith("+compile")
    backend = backend_of(impl)
    with genfast.use_backend(backend):
        step = STEPS[name](size, device, compile_it)

    def run():
        with genfast.use_backend(backend):
            step()

    for _ in range(WARMUP_CALLS):
        run()
    return run


def case_of(name: str, size: ModelSize) -> Case:
    """A training step's row family: the model's name and its input shape."""
    return Case(op=f"train/{name}", shape=(size.batch, 3, size.image_size, size.image_size), mode=MODE)


def measure(name: str, size: ModelSize, impls: list[str], device: torch.device, *, threads: int,
            min_run_time: float, rounds: int) -> list[Row]:
    """Times one training step of model ``name`` under each of ``impls``, in turns."""
    builds = {impl: functools.partial(_build, name, size, impl, device) for impl in impls}
    return measure_group(case_of(name, size), builds, device, nbytes=0, threads=threads, min_run_time=min_run_time,
                         rounds=rounds)
