"""The model-specific parts of training: building the model and optimisers, one training step, and the pictures
written at the end. The loop in :mod:`genfast.training.loop` is the same for all three."""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

import genfast
from ..plots import save_image_grid
from .config import RunConfig
from .distributed import World, all_true, wrap
from .ema import EMA
from .precision import autocast, compiled, grad_scaler, seeded_default_generators


class NonFiniteLoss(RuntimeError):
    """A loss or gradient became NaN or infinite; the update was not applied."""


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, *, name: str, step: int, world: World,
                   device: torch.device, scaler: torch.amp.GradScaler | None = None,
                   max_grad_norm: float = 0.0) -> None:
    """zero_grad, backward, and the update only when ``loss`` and every gradient are finite on every process;
    otherwise :class:`NonFiniteLoss` naming ``step`` (1-based) and the loss, with the parameters untouched.
    With ``max_grad_norm`` > 0 the gradients are scaled by min(1, max_grad_norm/‖g‖) before the update, ‖g‖ the
    norm of all of the optimiser's gradients together (:func:`torch.nn.utils.clip_grad_norm_`; under DDP the
    gradients are already averaged, so every process clips alike).

    With an fp16 ``scaler``: backward of s·loss, the gradients divided by s (before the clipping, so the norm is
    the true one), and a non-finite gradient is the scaler's business (the update is skipped and s halved: an
    overflow, not a divergence); a non-finite loss still stops the run."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = []
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    if not all_true(bool(finite), world, device):
        raise NonFiniteLoss(f"the {name} became {loss.item()} (or a gradient non-finite) at step {step}")
    if max_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


class _LossOf(nn.Module):
    """``model.loss`` as ``forward``, so DistributedDataParallel sees the call and averages the gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, *, generator=None):
        return self.model.loss(x, generator=generator)


class _Warmup:
    """The learning-rate factor of ``--lr-warmup W`` after k updates: min(1, (k + 1)/W), so that update k + 1
    (1-based) runs at lr·min(1, (k + 1)/W) — lr/W first, the full lr from update W on (diffusers'
    ``constant_with_warmup`` without its first update at lr 0). An object, not a closure: LambdaLR's state_dict
    then holds its plain attributes, which a checkpoint can store."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, updates: int) -> float:
        return min(1.0, (updates + 1) / self.steps)


def _kwargs(**values) -> dict:
    """The keyword arguments that are set (``None`` = the constructor's default)."""
    return {name: value for name, value in values.items() if value is not None}


class Task:
    """Base: ``modules`` and ``optimizers`` (saved in checkpoints by name), ``columns`` (the metrics of a step).

    A subclass builds its modules with :meth:`_place` (device, and channels_last with ``--channels-last``), then
    calls :meth:`_finish` with the names of the modules whose weights are averaged (``--ema``) and that produce the
    samples: it adds an fp16 loss scaler per optimiser and the EMA copies, all saved in checkpoints."""

    columns: tuple[str, ...] = ()
    plotted: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, *, channels: int, device: torch.device, world: World):
        self.config, self.device, self.world = config, device, world
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.emas: dict[str, EMA] = {}

    def _place(self, module: nn.Module) -> nn.Module:
        memory_format = torch.channels_last if self.config.channels_last else torch.preserve_format
        return module.to(self.device, memory_format=memory_format)

    def _finish(self, averaged: tuple[str, ...]) -> None:
        for name, optimizer in self.optimizers.items():
            scaler = grad_scaler(self.config.precision, self.device)
            if scaler is not None:
                self.scalers[name] = scaler
            if self.config.warmup_steps:
                self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, _Warmup(self.config.warmup_steps))
        if self.config.ema:
            self.emas = {name: EMA(self.modules[name], decay=self.config.ema, warmup=self.config.ema_warmup)
                         for name in averaged}

    def _compiled(self, module: nn.Module) -> nn.Module:
        return compiled(module, self.config.compile, fullgraph=not self.world.distributed)

    def averaged(self, name: str) -> nn.Module:
        """The module ``name`` that samples and evaluations use: its EMA copy with ``--ema``, else itself."""
        return self.emas[name].module if name in self.emas else self.modules[name]

    def autocast(self):
        return autocast(self.config.precision, self.device)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset images in [0, 1] to the model's range (and layout)."""
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def state_dict(self) -> dict:
        return dict(modules={k: m.state_dict() for k, m in self.modules.items()},
                    optimizers={k: o.state_dict() for k, o in self.optimizers.items()},
                    scalers={k: s.state_dict() for k, s in self.scalers.items()},
                    schedulers={k: s.state_dict() for k, s in self.schedulers.items()},
                    ema={k: e.state_dict() for k, e in self.emas.items()})

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; an EMA missing from it (a checkpoint of a run without one) starts from the
        loaded weights."""
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scaler in self.scalers.items():
            if name in state.get("scalers", {}):
                scaler.load_state_dict(state["scalers"][name])
        for name, scheduler in self.schedulers.items():
            if name in state.get("schedulers", {}):
                scheduler.load_state_dict(state["schedulers"][name])
        for name, ema in self.emas.items():
            saved = state.get("ema", {}).get(name)
            if saved is None:
                ema.module.load_state_dict(self.modules[name].state_dict())
            else:
                ema.load_state_dict(saved)

    def train(self, mode: bool = True) -> None:
        for module in self.modules.values():
            module.train(mode)

    def _step(self, name: str, loss: torch.Tensor, what: str, step: int) -> None:
        """The update of optimiser ``name`` from ``loss`` (fp16: through its scaler; the gradients clipped to
        ``--grad-clip``), then its learning-rate warm-up and its EMA."""
        optimizer_step(self.optimizers[name], loss, name=what, step=step, world=self.world, device=self.device,
                       scaler=self.scalers.get(name), max_grad_norm=self.config.max_grad_norm)
        if name in self.schedulers:
            with warnings.catch_warnings():  # an fp16 update the scaler skipped still counts as a warm-up step
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"),
                                        UserWarning)
                self.schedulers[name].step()
        if name in self.emas:
            self.emas[name].update()

    def _forward(self, module: nn.Module, batch: torch.Tensor, generator: torch.Generator):
        """``module(batch, generator=generator)`` under autocast; a compiled module draws from torch's default
        generators instead, seeded from ``generator`` for the call (:func:`seeded_default_generators`)."""
        with self.autocast():
            if self.config.compile is None:
                return module(batch, generator=generator)
            with seeded_default_generators(generator, self.device):
                return module(batch, generator=None)

    def start(self, dataset, indices: list[int]) -> None:
        """Before the first step of a new run (not a resumed one): what the task derives from the training images
        ``dataset[i]``, i in ``indices``, and keeps in its state. Nothing by default."""

    def step(self, batch: torch.Tensor, *, generator: torch.Generator, step: int) -> dict[str, float | None]:
        raise NotImplementedError

    def sample(self, num: int, *, generator: torch.Generator) -> torch.Tensor:
        """``num`` images (num, C, S, S) in [0, 1] from the (averaged) model, ``batch_size`` at a time, in fp32."""
        images = [self._sample(min(self.config.batch_size, num - done), generator)
                  for done in range(0, num, self.config.batch_size)]
        return torch.cat(images)

    def _sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
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
        self.model = self._place(build_vae(config, channels))
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)}
        self.loss = self._compiled(wrap(_LossOf(self.model), world, device))
        self._finish(("model",))

    def step(self, batch, *, generator, step):
        losses = self._forward(self.loss, batch, generator)
        self._step("model", losses["loss"], "loss", step)
        return {name: losses[name].item() for name in self.columns}

    @torch.no_grad()
    def _sample(self, num, generator):
        return self.averaged("model").eval().sample(num, generator=generator)

    @torch.no_grad()
    def write_outputs(self, out, preview):
        model = self.averaged("model").eval()
        inputs = preview[:8]
        save_image_grid(torch.cat([inputs, model.reconstruct(inputs)]), out / "reconstructions.png", nrow=8,
                        scale=2, row_labels=("input", "recon"))
        save_image_grid(model.sample(16, generator=self._generator()), out / "samples.png", nrow=4, scale=2)
        pairs = max(1, min(4, len(preview) // 2))  # a lone image interpolates to itself
        frames = model.interpolate(preview[0:2 * pairs:2], preview[1 % len(preview):2 * pairs:2], steps=8)
        save_image_grid(frames.flatten(0, 1), out / "interpolation.png", nrow=8, scale=2)


class WGANTask(Task):
    """WGAN-GP: each step updates the critic on one batch; every ``n_critic``-th step also updates the generator.

    With ``--compile`` the generator and the critic's scoring passes are compiled; the gradient penalty runs the
    critic eagerly, because it differentiates the critic twice (``autograd.grad(create_graph=True)``, then the
    backward of the penalty) and torch.compile's AOTAutograd has no double backward. With fp16 the penalty's
    inner gradient g = ∇ₓ critic(x̂) is computed unscaled (its norm is held near 1 by the penalty itself, far from
    fp16's underflow); the backward of the critic loss, penalty included, goes through the loss scaler."""

    columns = ("critic_loss", "penalty", "wasserstein", "generator_loss")
    plotted = columns

    def __init__(self, config, *, channels, device, world):
        super().__init__(config, channels=channels, device=device, world=world)
        from ..models import Critic, Generator

        self.generator = self._place(Generator(**_kwargs(latent_dim=config.latent_dim, image_size=config.image_size,
                                                         out_channels=channels,
                                                         base_channels=config.base_channels)))
        self.critic = self._place(Critic(**_kwargs(image_size=config.image_size, in_channels=channels,
                                                   base_channels=config.base_channels)))
        self.modules = {"generator": self.generator, "critic": self.critic}
        self.optimizers = {name: torch.optim.Adam(module.parameters(), lr=config.learning_rate,
                                                  betas=(config.beta1, 0.9))
                           for name, module in self.modules.items()}
        self.generate = self._compiled(wrap(self.generator, world, device))
        self.critic_eager = wrap(self.critic, world, device)
        self.score = self._compiled(self.critic_eager)
        self._finish(("generator",))

    def prepare(self, images):
        return super().prepare(images * 2 - 1)

    def _latents(self, n, generator):
        return torch.randn(n, self.generator.latent_dim, device=self.device, generator=generator)

    def step(self, batch, *, generator, step):
        with self.autocast():
            fake = self.generate(self._latents(batch.shape[0], generator)).detach()
            wasserstein = self.score(batch).mean() - self.score(fake).mean()
            penalty = genfast.gradient_penalty(self.critic_eager, batch, fake, weight=self.config.gp_weight,
                                               generator=generator)
            critic_loss = penalty - wasserstein
        self._step("critic", critic_loss, "critic loss", step)
        generator_loss = None
        if step % self.config.n_critic == 0:
            with self.autocast():
                loss = -self.score(self.generate(self._latents(batch.shape[0], generator))).mean()
            self._step("generator", loss, "generator loss", step)
            generator_loss = loss.item()
        return dict(critic_loss=critic_loss.item(), penalty=penalty.item(), wasserstein=wasserstein.item(),
                    generator_loss=generator_loss)

    @torch.no_grad()
    def _sample(self, num, generator):
        return (self.averaged("generator").eval()(self._latents(num, generator)) + 1) / 2

    @torch.no_grad()
    def write_outputs(self, out, preview):
        save_image_grid(self._sample(64, self._generator()), out / "samples.png", nrow=8, scale=2)


def build_vae(config: RunConfig, channels: int) -> nn.Module:
    """The ConvVAE of a vae run's settings (also the first stage of an ldm run)."""
    from ..models import ConvVAE

    return ConvVAE(**_kwargs(image_size=config.image_size, in_channels=channels, latent_dim=config.latent_dim,
                             base_channels=config.base_channels, beta=config.beta,
                             latent_channels=config.latent_channels))


def build_ddpm(config: RunConfig, channels: int) -> nn.Module:
    """The model of a ddpm run's settings, a DDPM on images; of an ldm run's, a LatentDiffusion: the DDPM on the
    latents of the VAE of ``config.vae_model`` (also how ``genfast sample`` rebuilds them from a checkpoint)."""
    from ..models import DDPM, LatentDiffusion, UNet

    vae = None
    if config.model == "ldm":
        vae = build_vae(RunConfig(**config.vae_model["config"]), config.vae_model["channels"])
        if vae.in_channels != channels:
            raise ValueError(f"the VAE of --vae takes {vae.in_channels}-channel images, the data set has {channels}")
    in_channels, image_size = (channels, config.image_size) if vae is None else vae.latent_shape[:2]
    unet = UNet(**_kwargs(image_size=image_size, in_channels=in_channels, base_channels=config.base_channels,
                          channel_mult=config.channel_mult, num_res_blocks=config.num_res_blocks,
                          num_groups=config.num_groups, scale_shift=config.scale_shift))
    factory = {"linear": genfast.NoiseSchedule.linear, "cosine": genfast.NoiseSchedule.cosine}[config.schedule]
    ddpm = DDPM(unet=unet, schedule=factory(config.timesteps), prediction_type=config.prediction_type)
    return ddpm if vae is None else LatentDiffusion(vae=vae, ddpm=ddpm)


def sample_ddpm(model: nn.Module, num: int, *, sampler: str, steps: int | None, generator: torch.Generator,
                progress: bool = False, sampling: dict | None = None) -> torch.Tensor:
    """``num`` images in [0, 1] from a DDPM (whose images are in [-1, 1]; ``sampling``: the x̂₀ keywords of
    :meth:`genfast.models.DDPM.sample`, default diffusers' — clipped to [-1, 1]) or a LatentDiffusion (whose
    latents are never clipped: ``sampling`` must not ask for it)."""
    from ..models import DDPM

    sampling = dict(sampling or {})
    if isinstance(model, DDPM):
        images = model.eval().sample(num, sampler=sampler, steps=steps, generator=generator, progress=progress,
                                     **sampling)
        return ((images + 1) / 2).clamp(0, 1)
    if sampling.get("clip_sample") or sampling.get("thresholding"):
        raise ValueError("latent diffusion does not clip or threshold its latents")
    return model.eval().sample(num, sampler=sampler, steps=steps, generator=generator, progress=progress)


class DDPMTask(Task):
    columns = ("loss",)
    plotted = columns

    def __init__(self, config, *, channels, device, world):
        super().__init__(config, channels=channels, device=device, world=world)
        self.model = self._place(build_ddpm(config, channels))
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)}
        self.loss = self._compiled(wrap(_LossOf(self.model), world, device))
        self._finish(("model",))

    def prepare(self, images):
        return super().prepare(images * 2 - 1)

    def step(self, batch, *, generator, step):
        loss = self._forward(self.loss, batch, generator)
        self._step("model", loss, "loss", step)
        return {"loss": loss.item()}

    @torch.no_grad()
    def _sample(self, num, generator):
        return sample_ddpm(self.averaged("model"), num, sampler="ddim", steps=self.config.sample_steps,
                           generator=generator, sampling=self.config.sampling)

    @torch.no_grad()
    def write_outputs(self, out, preview):
        save_image_grid(self._sample(16, self._generator()), out / "samples.png", nrow=4, scale=2)


class LDMTask(DDPMTask):
    """Latent diffusion: the DDPM task on the frozen VAE's scaled latents. A new run loads the VAE's weights (its
    EMA copy when it has one) from ``--vae`` and measures the latent scale on up to SCALE_IMAGES training images;
    both are then part of the model's state, saved in every checkpoint. Only the U-Net is optimised."""

    SCALE_IMAGES = 1024

    def __init__(self, config, *, channels, device, world):
        Task.__init__(self, config, channels=channels, device=device, world=world)
        self.model = self._place(build_ddpm(config, channels))
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.ddpm.parameters(), lr=config.learning_rate)}
        self.loss = self._compiled(wrap(_LossOf(self.model), world, device))
        self._finish(("model",))

    def prepare(self, images):
        return Task.prepare(self, images)  # the VAE takes images in [0, 1]

    def start(self, dataset, indices):
        self.model.vae.load_state_dict(_vae_weights(self.config.vae))
        images = torch.stack([dataset[i] for i in indices[:self.SCALE_IMAGES]]).to(self.device)
        self.model.measure_scale(self.prepare(images), generator=self._generator())
        for ema in self.emas.values():
            ema.module.load_state_dict(self.model.state_dict())

    @torch.no_grad()
    def write_outputs(self, out, preview):
        model = self.averaged("model").eval()
        super().write_outputs(out, preview)
        inputs = preview[:8]
        decoded = model.decode(model.encode(inputs, generator=self._generator()))
        save_image_grid(torch.cat([inputs, decoded]), out / "autoencoded.png", nrow=8, scale=2,
                        row_labels=("input", "decoded"))


def _vae_checkpoint(path) -> dict:
    """The parts of a VAE run's checkpoint an ldm run needs; ValueError naming ``--vae`` when it is none."""
    from ..checkpoint import load_checkpoint

    try:
        saved = load_checkpoint(path, keys=("config", "channels", "task"))
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"--vae {path}: {str(exc).strip().splitlines()[0]}") from None
    config = saved["config"]
    if config.get("model") != "vae" or not config.get("latent_channels"):
        kind = "a flat-latent vae" if config.get("model") == "vae" else f"a {config.get('model')}"
        raise ValueError(f"--vae {path} is {kind} checkpoint; latent diffusion needs a VAE trained with "
                         "--latent-channels (a spatial latent)")
    return saved


def _vae_weights(path) -> dict:
    """The VAE's weights in the checkpoint ``path``: its EMA copy when the run kept one."""
    state = _vae_checkpoint(path)["task"]
    ema = state.get("ema", {}).get("model")
    return ema["module"] if ema else state["modules"]["model"]


def first_stage(config: RunConfig) -> RunConfig:
    """An ldm run's config with ``vae_model`` read from its ``--vae`` checkpoint and the image size the VAE's (a
    different ``--image-size`` given explicitly is a :class:`UsageError`)."""
    import dataclasses

    from .config import UsageError

    try:
        saved = _vae_checkpoint(config.vae)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    size = saved["config"]["image_size"]
    if "image_size" in config.given and config.image_size != size:
        raise UsageError(f"--image-size {config.image_size}: the VAE of --vae {config.vae} is for {size}×{size} "
                         "images")
    return dataclasses.replace(config, image_size=size,
                               vae_model=dict(config=saved["config"], channels=saved["channels"]))


TASKS = {"vae": VAETask, "wgan": WGANTask, "ddpm": DDPMTask, "ldm": LDMTask}


def grid_columns(num: int) -> int:
    """Images per row of a near-square grid of ``num`` images."""
    return max(1, math.ceil(math.sqrt(num)))
