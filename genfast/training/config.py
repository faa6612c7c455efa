"""What a training run is: the model, the data, the optimisation and how long to run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

class UsageError(ValueError):
    """A bad setting or path given by the user (the CLI prints it on one line and exits with code 2)."""


MODELS = ("vae", "wgan", "ddpm")
MODEL_OPS = {"vae": ("reparameterize",), "wgan": ("gradient_penalty",), "ddpm": ("diffusion", "group_norm_silu")}
MAX_SEED = 2**32 - 1  # NumPy's global seed is a 32-bit word
DEFAULT_LR = {"vae": 1e-3, "wgan": 1e-4, "ddpm": 2e-4}

# Fields a --resume run takes from the command line; every other field comes from the checkpoint.
RUN_FIELDS = ("out", "epochs", "max_steps", "checkpoint_every", "backend", "device", "quiet", "resume", "workers",
              "given")


@dataclass(kw_only=True)
class RunConfig:
    """One training run. ``None`` for ``lr`` / ``base_channels`` means the model's default (lr: vae 1e-3, wgan 1e-4,
    ddpm 2e-4; base channels: ConvVAE 32, Generator/Critic 64, UNet 64)."""

    model: str
    out: str
    # data
    dataset: str = "faces"
    data_dir: str | None = None
    num_samples: int | None = None
    image_size: int = 64
    holdout: int = 0  # images held out of training (the last of a seeded permutation), for evaluation
    workers: int = 0
    # model
    latent_dim: int = 128
    base_channels: int | None = None
    beta: float = 1.0  # vae: loss = recon + beta·kl
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # ddpm U-Net
    num_res_blocks: int = 2
    timesteps: int = 1000
    schedule: str = "linear"
    sample_steps: int = 50  # ddpm: DDIM steps for the samples written at the end
    # optimisation
    lr: float | None = None
    beta1: float = 0.0  # wgan Adam betas (beta1, 0.9)
    gp_weight: float = 10.0
    n_critic: int = 5
    batch_size: int = 128
    seed: int = 0
    # run length and bookkeeping
    epochs: int = 20
    max_steps: int | None = None
    checkpoint_every: int = 500
    backend: str = "auto"
    device: str = "auto"
    quiet: bool = False
    resume: bool = False
    given: tuple[str, ...] = ()  # the fields set explicitly (CLI flags given): a resume warns about those it ignores

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        self.channel_mult = tuple(self.channel_mult)
        self.given = tuple(self.given)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.model] if self.lr is None else self.lr

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def backend_reason(self, device) -> str | None:
        """Why ``backend`` cannot run this model's genfast ops on ``device`` (the first that it cannot), or None."""
        from .._backend import why_not

        for op in MODEL_OPS[self.model]:
            reason = why_not(self.backend, device, op=op)
            if reason is not None:
                return reason
        return None

    def check(self) -> None:
        """The settings that no single flag's parser can check, before anything runs: :class:`UsageError`."""
        if not str(self.out).strip():
            raise UsageError("--out must name a folder, got ''")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if not (math.isfinite(self.gp_weight) and self.gp_weight >= 0):
            raise UsageError(f"--gp-weight must be a finite number >= 0, got {self.gp_weight}")
        if self.model == "ddpm" and self.sample_steps > self.timesteps:
            raise UsageError(f"--sample-steps {self.sample_steps} must be <= --timesteps {self.timesteps}")

    def resumed_from(self, saved: dict, given: tuple[str, ...] = ()) -> tuple["RunConfig", list[str]]:
        """(this run's length settings on the saved run's model, data and optimisation settings; the fields in
        ``given`` — set explicitly — whose value the checkpoint's replaced, each as "--flag value (checkpoint:
        saved value)")."""
        if not isinstance(saved, dict) or saved.get("model") != self.model:
            what = saved.get("model") if isinstance(saved, dict) else None
            raise ValueError(f"the checkpoint in {self.out} is a {what} run, not {self.model}")
        fields = {name: value for name, value in saved.items() if name not in RUN_FIELDS}
        fields.update({name: getattr(self, name) for name in RUN_FIELDS})
        ignored = [f"--{name.replace('_', '-')} {getattr(self, name)} (checkpoint: {fields[name]})"
                   for name in given if name not in RUN_FIELDS and name in fields
                   and _same(getattr(self, name)) != _same(fields[name])]
        return RunConfig(**fields), ignored


def _same(value):
    """A setting in one form for comparison (a channel_mult list from the CLI equals the saved tuple)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value
