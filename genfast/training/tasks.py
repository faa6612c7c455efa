"""The model-specific parts of training: building the model and optimisers, one training step, and the pictures
written at the end. The loop in :mod:`genfast.training.loop` is the same for all three."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import genfast
from ..plots import save_image_grid
from .config import RunConfig
from .distributed import World, all_true, wrap


class NonFiniteLoss(RuntimeError):
    """A loss or gradient became NaN or infinite; the update was not applied."""


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, *, name: str, step: int, world: World,
                   device: torch.device) -> None:
    """zero_grad, backward, and the update only when ``loss`` and every gradient are finite on every process;
    otherwise :class:`NonFiniteLoss` naming ``step`` (1-based) and the loss, with the parameters untouched."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    if not all_true(bool(finite), world, device):
        raise NonFiniteLoss(f"the {name} became {loss.item()} (or a gradient non-finite) at step {step}")
    optimizer.step()


class _LossOf(nn.Module):
    """``model.loss`` as ``forward``, so DistributedDataParallel sees the call and averages the gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, *, generator=None):
        return self.model.loss(x, generator=generator)


def _kwargs(**values) -> dict:
    """The keyword arguments that are set (``None`` = the constructor's default)."""
    return {name: value for name, value in values.items() if value is not None}


class Task:
    """Base: ``modules`` and ``optimizers`` (saved in checkpoints by name), ``columns`` (the metrics of a step)."""

    columns: tuple[str, ...] = ()
    plotted: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, *, channels: int, device: torch.device, world: World):
        self.config, self.device, self.world = config, device, world
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset images in [0, 1] to the model's range."""
        return images

    def state_dict(self) -> dict:
        return dict(modules={k: m.state_dict() for k, m in self.modules.items()},
                    optimizers={k: o.state_dict() for k, o in self.optimizers.items()})

    def load_state_dict(self, state: dict) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])

    def train(self, mode: bool = True) -> None:
        for module in self.modules.values():
            module.train(mode)

    def _step(self, optimizer, loss, name, step):
        optimizer_step(optimizer, loss, name=name, step=step, world=self.world, device=self.device)

    def step(self, batch: torch.Tensor, *, generator: torch.Generator, step: int) -> dict[str, float | None]:
        raise NotImplementedError

    def write_outputs(self, out: Path, preview: torch.Tensor) -> None:
        """The pictures of the trained model; ``preview`` holds 16 fixed dataset images in [0, 1]."""
        raise NotImplementedError

    def _generator(self) -> torch.Generator:
        """A fresh generator seeded with the run's seed: the same pictures for the same weights."""
        return torch.Generator(device=self.device).manual_seed(self.config.seed)


class VAETask(Task):
    columns = ("loss", "recon", "kl")
    plotted = columns

    def __init__(self, config, *, channels, device, world):
        super().__init__(config, channels=channels, device=device, world=world)
        from ..models import ConvVAE

        self.model = ConvVAE(**_kwargs(image_size=config.image_size, in_channels=channels,
                                       latent_dim=config.latent_dim, base_channels=config.base_channels,
                                       beta=config.beta)).to(device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)}
        self.loss = wrap(_LossOf(self.model), world, device)

    def step(self, batch, *, generator, step):
        losses = self.loss(batch, generator=generator)
        self._step(self.optimizers["model"], losses["loss"], "loss", step)
        return {name: losses[name].item() for name in self.columns}

    @torch.no_grad()
    def write_outputs(self, out, preview):
        model = self.model.eval()
        inputs = preview[:8]
        save_image_grid(torch.cat([inputs, model.reconstruct(inputs)]), out / "reconstructions.png", nrow=8,
                        scale=2, row_labels=("input", "recon"))
        save_image_grid(model.sample(16, generator=self._generator()), out / "samples.png", nrow=4, scale=2)
        pairs = max(1, min(4, len(preview) // 2))  # a lone image interpolates to itself
        frames = model.interpolate(preview[0:2 * pairs:2], preview[1 % len(preview):2 * pairs:2], steps=8)
        save_image_grid(frames.flatten(0, 1), out / "interpolation.png", nrow=8, scale=2)


class WGANTask(Task):
    """WGAN-GP: each step updates the critic on one batch; every ``n_critic``-th step also updates the generator."""

    columns = ("critic_loss", "penalty", "wasserstein", "generator_loss")
    plotted = columns

    def __init__(self, config, *, channels, device, world):
        super().__init__(config, channels=channels, device=device, world=world)
        from ..models import Critic, Generator

        self.generator = Generator(**_kwargs(latent_dim=config.latent_dim, image_size=config.image_size,
                                             out_channels=channels, base_channels=config.base_channels)).to(device)
        self.critic = Critic(**_kwargs(image_size=config.image_size, in_channels=channels,
                                       base_channels=config.base_channels)).to(device)
        self.modules = {"generator": self.generator, "critic": self.critic}
        self.optimizers = {name: torch.optim.Adam(module.parameters(), lr=config.learning_rate,
                                                  betas=(config.beta1, 0.9))
                           for name, module in self.modules.items()}
        self.generate = wrap(self.generator, world, device)
        self.score = wrap(self.critic, world, device)

    def prepare(self, images):
        return images * 2 - 1

    def _latents(self, n, generator):
        return torch.randn(n, self.generator.latent_dim, device=self.device, generator=generator)

    def step(self, batch, *, generator, step):
        fake = self.generate(self._latents(batch.shape[0], generator)).detach()
        wasserstein = self.score(batch).mean() - self.score(fake).mean()
        penalty = genfast.gradient_penalty(self.score, batch, fake, weight=self.config.gp_weight,
                                           generator=generator)
        critic_loss = penalty - wasserstein
        self._step(self.optimizers["critic"], critic_loss, "critic loss", step)
        generator_loss = None
        if step % self.config.n_critic == 0:
            loss = -self.score(self.generate(self._latents(batch.shape[0], generator))).mean()
            self._step(self.optimizers["generator"], loss, "generator loss", step)
            generator_loss = loss.item()
        return dict(critic_loss=critic_loss.item(), penalty=penalty.item(), wasserstein=wasserstein.item(),
                    generator_loss=generator_loss)

    @torch.no_grad()
    def write_outputs(self, out, preview):
        images = self.generator.eval()(self._latents(64, self._generator()))
        save_image_grid((images + 1) / 2, out / "samples.png", nrow=8, scale=2)


def build_ddpm(config: RunConfig, channels: int) -> nn.Module:
    """The DDPM of a run's settings (also how ``genfast sample ddpm`` rebuilds one from a checkpoint)."""
    from ..models import DDPM, UNet

    unet = UNet(**_kwargs(image_size=config.image_size, in_channels=channels, base_channels=config.base_channels,
                          channel_mult=config.channel_mult, num_res_blocks=config.num_res_blocks))
    factory = {"linear": genfast.NoiseSchedule.linear, "cosine": genfast.NoiseSchedule.cosine}[config.schedule]
    return DDPM(unet=unet, schedule=factory(config.timesteps))


def sample_ddpm(model: nn.Module, num: int, *, sampler: str, steps: int | None, generator: torch.Generator,
                progress: bool = False) -> torch.Tensor:
    """``num`` images in [0, 1] from a DDPM."""
    images = model.eval().sample(num, sampler=sampler, steps=steps, generator=generator, progress=progress)
    return ((images + 1) / 2).clamp(0, 1)


class DDPMTask(Task):
    columns = ("loss",)
    plotted = columns

    def __init__(self, config, *, channels, device, world):
        super().__init__(config, channels=channels, device=device, world=world)
        self.model = build_ddpm(config, channels).to(device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)}
        self.loss = wrap(_LossOf(self.model), world, device)

    def prepare(self, images):
        return images * 2 - 1

    def step(self, batch, *, generator, step):
        loss = self.loss(batch, generator=generator)
        self._step(self.optimizers["model"], loss, "loss", step)
        return {"loss": loss.item()}

    @torch.no_grad()
    def write_outputs(self, out, preview):
        images = sample_ddpm(self.model, 16, sampler="ddim", steps=self.config.sample_steps,
                             generator=self._generator())
        save_image_grid(images, out / "samples.png", nrow=4, scale=2)


TASKS = {"vae": VAETask, "wgan": WGANTask, "ddpm": DDPMTask}


def grid_columns(num: int) -> int:
    """Images per row of a near-square grid of ``num`` images."""
    return max(1, math.ceil(math.sqrt(num)))
