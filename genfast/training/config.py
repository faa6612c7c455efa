"""What a training run is: the model, the data, the optimisation and how long to run."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .._shared import PREDICTION_TYPES  # noqa: F401 (also the CLI's choices)


class UsageError(ValueError):
    """A bad setting or path given by the user (the CLI prints it on one line and exits with code 2)."""


MODELS = ("vae", "wgan", "ddpm", "ldm")
MODEL_OPS = {"vae": ("reparameterize",), "wgan": ("gradient_penalty",), "ddpm": ("diffusion", "group_norm_silu"),
             "ldm": ("reparameterize", "diffusion", "group_norm_silu")}
MAX_SEED = 2**32 - 1  # NumPy's global seed is a 32-bit word
DEFAULT_LR = {"vae": 1e-3, "wgan": 1e-4, "ddpm": 2e-4, "ldm": 2e-4}
DEFAULT_EMA = {"vae": 0.0, "wgan": 0.0, "ddpm": 0.9999, "ldm": 0.9999}
# The diffusion recipe of diffusers' examples/unconditional_image_generation/train_unconditional.py: a linear
# learning-rate warm-up over the first 500 updates (--lr_warmup_steps 500) and the total gradient norm clipped to 1.0
# (accelerator.clip_grad_norm_(model.parameters(), 1.0)); Ho et al.'s own runs warmed up for 5000 of 800k updates.
# VAE and WGAN-GP train as before: no warm-up, no clipping.
DEFAULT_LR_WARMUP = {"vae": 0, "wgan": 0, "ddpm": 500, "ldm": 500}
DEFAULT_GRAD_CLIP = {"vae": 0.0, "wgan": 0.0, "ddpm": 1.0, "ldm": 1.0}

# Fields a --resume run takes from the command line; every other field comes from the checkpoint.
RUN_FIELDS = ("out", "epochs", "max_steps", "max_seconds", "checkpoint_every", "backend", "device", "quiet", "resume", "workers",
              "given")
# What a checkpoint written before a setting existed ran with.
LEGACY = {"precision": "fp32", "ema": 0.0, "prediction_type": "epsilon", "scale_shift": False, "num_groups": 32,
          "lr_warmup": 0, "grad_clip": 0.0}


@dataclass(kw_only=True)
class RunConfig:
    """One training run. ``None`` for ``lr`` / ``base_channels`` means the model's default (lr: vae 1e-3, wgan 1e-4,
    ddpm and ldm 2e-4; base channels: ConvVAE 32, Generator/Critic 64, UNet 64).

    ``ldm`` trains the DDPM U-Net on the latents of the frozen spatial-latent VAE whose checkpoint ``vae`` names;
    ``vae_model`` is that VAE's run (its config and image channels), filled in by :meth:`resolved` and saved, so
    that the checkpoint describes the whole model without the VAE's file."""

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
    latent_channels: int | None = None  # vae: a spatial latent (latent_channels, S/4, S/4) instead of latent_dim
    vae: str | None = None  # ldm: checkpoint.pt of the spatial-latent VAE whose latents it diffuses
    vae_model: dict | None = None  # ldm: {"config": the VAE run's config, "channels": its image channels}
    base_channels: int | None = None
    beta: float = 1.0  # vae: loss = recon + beta·kl
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # ddpm U-Net
    num_res_blocks: int = 2
    num_groups: int = 32  # ddpm U-Net GroupNorm groups
    scale_shift: bool = True  # ddpm U-Net: the time embedding scales and shifts the normalised features (ADM)
    prediction_type: str = "epsilon"  # ddpm: what the U-Net predicts: epsilon | v_prediction | sample
    timesteps: int = 1000
    schedule: str = "linear"
    sample_steps: int = 50  # ddpm: DDIM steps for the samples written at the end
    # ddpm: x̂₀ in the sampler steps of the pictures and --eval-every (diffusers' names); clip_sample None: on for
    # ddpm, off for ldm (its latents are not images)
    clip_sample: bool | None = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # optimisation
    lr: float | None = None
    beta1: float = 0.0  # wgan Adam betas (beta1, 0.9)
    gp_weight: float = 10.0
    n_critic: int = 5
    batch_size: int = 128
    seed: int = 0
    lr_warmup: int | None = None  # linear warm-up over the first updates; None: ddpm/ldm 500, vae/wgan 0 (off)
    grad_clip: float | None = None  # max total gradient norm, 0 = off; None: ddpm/ldm 1.0, vae/wgan 0
    # run length and bookkeeping
    epochs: int = 20
    max_steps: int | None = None
    max_seconds: float | None = None  # stop once this much training time has passed in this process
    checkpoint_every: int = 500
    # how a step runs (saved: a resumed run keeps the checkpoint's)
    precision: str | None = None  # fp32 | bf16 | fp16 autocast; None: bf16 on a GPU with native bf16, else fp32
    ema: float | None = None  # EMA decay of the sampling weights, 0 = off; None: ddpm 0.9999, vae/wgan 0
    ema_warmup: bool = True  # EMA decay min(ema, (1 + t)/(10 + t)) after t updates
    compile: str | None = None  # torch.compile backend of the training step ("inductor"); None: eager
    channels_last: bool = False  # models and inputs in channels_last
    # sample quality during training (genfast.evaluation; saved, so that a resumed run's metrics.csv goes on alike):
    # every eval_every steps (0 = never), eval_num samples
    eval_every: int = 0
    eval_num: int = 1000
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
    def warmup_steps(self) -> int:
        return DEFAULT_LR_WARMUP[self.model] if self.lr_warmup is None else self.lr_warmup

    @property
    def max_grad_norm(self) -> float:
        """The total gradient norm an update is clipped to; 0: not clipped."""
        return DEFAULT_GRAD_CLIP[self.model] if self.grad_clip is None else float(self.grad_clip)

    @property
    def sampling(self) -> dict:
        """The x̂₀ settings of the sampler steps (:meth:`genfast.models.DDPM.sample`'s keywords) of a diffusion
        run's pictures and evaluations: clipped to [-1, 1] for ddpm unless ``clip_sample`` is False, never for ldm."""
        clip = self.model == "ddpm" if self.clip_sample is None else bool(self.clip_sample)
        return dict(clip_sample=clip, thresholding=bool(self.thresholding),
                    dynamic_thresholding_ratio=float(self.dynamic_thresholding_ratio),
                    sample_max_value=float(self.sample_max_value))

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self, device) -> "RunConfig":
        """This config with the device-dependent defaults filled in (precision, ema): what a checkpoint saves."""
        from .precision import default_precision

        config = dataclasses.replace(self, precision=self.precision or default_precision(device),
                                     ema=DEFAULT_EMA[self.model] if self.ema is None else float(self.ema),
                                     lr_warmup=self.warmup_steps, grad_clip=self.max_grad_norm)
        if self.model in ("ddpm", "ldm"):
            config.clip_sample = config.sampling["clip_sample"]
        if self.model == "ldm" and self.vae_model is None:
            from .tasks import first_stage

            config = first_stage(config)
        return config

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
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise UsageError(f"--max-seconds must be a finite number > 0, got {self.max_seconds}")
        if self.model == "ldm" and self.vae is None and self.vae_model is None:
            raise UsageError("--vae is required: the checkpoint.pt of a VAE trained with --latent-channels")
        if self.model in ("ddpm", "ldm") and self.sample_steps > self.timesteps:
            raise UsageError(f"--sample-steps {self.sample_steps} must be <= --timesteps {self.timesteps}")
        self._check_step_settings()
        self._check_diffusion_settings()

    def _check_diffusion_settings(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise UsageError(f"--num-groups must be a positive integer, got {self.num_groups!r}")
        if self.model in ("ddpm", "ldm"):
            widths = sorted({(self.base_channels or 64) * m for m in (1, *self.channel_mult)})
            if any(w % self.num_groups for w in widths):
                raise UsageError(f"--num-groups {self.num_groups} must divide the channels of every U-Net level "
                                 f"{widths} (--base-channels × --channel-mult)")
        if self.model == "ldm" and (self.clip_sample or self.thresholding):
            raise UsageError("--clip-sample/--thresholding: latent diffusion does not clip or threshold its latents "
                             "(they are not images in [-1, 1])")
        if not (isinstance(self.dynamic_thresholding_ratio, (int, float)) and 0 < self.dynamic_thresholding_ratio <= 1):
            raise UsageError(f"--dynamic-thresholding-ratio must be a quantile in (0, 1], "
                             f"got {self.dynamic_thresholding_ratio!r}")
        if not (isinstance(self.sample_max_value, (int, float)) and math.isfinite(self.sample_max_value)
                and self.sample_max_value >= 1):
            raise UsageError(f"--sample-max-value must be a finite number >= 1, got {self.sample_max_value!r}")

    def _check_step_settings(self) -> None:
        from .precision import PRECISIONS, compile_backends

        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.ema is not None and (isinstance(self.ema, bool) or not 0 <= self.ema < 1):
            raise UsageError(f"--ema must be a decay in [0, 1) (0 = off), got {self.ema!r}")
        if self.compile is not None and self.compile not in compile_backends():
            raise UsageError(f"--compile must name a torch.compile backend ({', '.join(compile_backends())}), "
                             f"got {self.compile!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise UsageError(f"--eval-every must be an integer >= 0 (0 = never), got {self.eval_every!r}")
        if self.lr_warmup is not None and (isinstance(self.lr_warmup, bool) or not isinstance(self.lr_warmup, int)
                                           or self.lr_warmup < 0):
            raise UsageError(f"--lr-warmup must be an integer >= 0 (updates; 0 = off), got {self.lr_warmup!r}")
        if self.grad_clip is not None and (isinstance(self.grad_clip, bool)
                                           or not isinstance(self.grad_clip, (int, float))
                                           or not (math.isfinite(self.grad_clip) and self.grad_clip >= 0)):
            raise UsageError(f"--grad-clip must be a finite number >= 0 (0 = off), got {self.grad_clip!r}")
        if self.eval_every and self.eval_num < 4:
            raise UsageError(f"--eval-num must be >= 4 (FID needs 2 samples, the k=3 manifolds 4), "
                             f"got {self.eval_num}")

    def resumed_from(self, saved: dict, given: tuple[str, ...] = ()) -> tuple["RunConfig", list[str]]:
        """(this run's length settings on the saved run's model, data and optimisation settings; the fields in
        ``given`` — set explicitly — whose value the checkpoint's replaced, each as "--flag value (checkpoint:
        saved value)")."""
        if not isinstance(saved, dict) or saved.get("model") != self.model:
            what = saved.get("model") if isinstance(saved, dict) else None
            raise ValueError(f"the checkpoint in {self.out} is a {what} run, not {self.model}")
        fields = {**LEGACY, **{name: value for name, value in saved.items() if name not in RUN_FIELDS}}
        fields.update({name: getattr(self, name) for name in RUN_FIELDS})
        ignored = [f"--{name.replace('_', '-')} {getattr(self, name)} (checkpoint: {fields[name]})"
                   for name in given if name not in RUN_FIELDS and name in fields
                   and _same(getattr(self, name)) != _same(fields[name])]
        return RunConfig(**fields), ignored


def _same(value):
    """A setting in one form for comparison (a channel_mult list from the CLI equals the saved tuple)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value
