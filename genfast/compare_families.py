"""``genfast compare-families``: train a VAE, a WGAN-GP, a pixel DDPM and a latent diffusion model (LDM) on the same
data under the same budget (steps or wall-clock seconds per model) and measure, per model, quality (FID, KID,
precision), diversity (recall, mean pairwise feature distance), sampling speed (images/s, ms per image), training
cost (seconds, steps) and, on the faces, controllability (:mod:`genfast.controllability`). Writes OUT/report.md (the
measured table beside the textbook one, with sentences computed from the numbers), OUT/families.json, the
side-by-side pictures samples.png and traversals.png, and one training folder per model (OUT/<model>/; the LDM's
first-stage VAE in OUT/ldm_vae/)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ._machine import cpu_model, load_average
from .training import RunConfig, UsageError, train

MODELS = ("vae", "wgan", "ddpm", "ldm")
DEFAULT_SECONDS = 240.0  # per model: the default run (4 models, evaluation included) fits 25 min on a 2-core CPU
LDM_VAE_SHARE = 0.3  # of the LDM's budget in seconds, spent on its first-stage VAE (the rest on the latent DDPM)
GRID_SAMPLES = 8
SPEED_NUM = 16  # images timed per sampling run
CONTROL_STARTS = 3  # starting points per traversal
CONTROL_RANDOM = 2  # random directions besides the 5 found ones


# ---------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import _add_device, _number, _positive
    from .data import DATASETS

    positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive float")

    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                        help=f"which of {', '.join(MODELS)} to train (default all)")
    budget = parser.add_argument_group("budget per model (one of)")
    which = budget.add_mutually_exclusive_group()
    which.add_argument("--steps", type=_positive(int), help="training steps per model (ldm: per stage)")
    which.add_argument("--seconds", type=positive_float,
                       help=f"training wall-clock seconds per model (default {DEFAULT_SECONDS:g}; ldm: "
                            f"{LDM_VAE_SHARE:g} of it for its VAE, the rest for its latent DDPM)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="faces")
    data.add_argument("--data-dir", help="folder of the dataset's files (celeba, folder, mnist)")
    data.add_argument("--image-size", type=int, choices=(28, 32, 64), default=32)
    data.add_argument("--num-samples", type=_positive(int), default=5000,
                      help="training images (faces: how many to make; default 5000)")
    model = parser.add_argument_group("models and evaluation")
    model.add_argument("--batch-size", type=_positive(int), default=64)
    model.add_argument("--base-channels", type=_positive(int), default=32, help="width of every network (32)")
    model.add_argument("--latent-dim", type=_positive(int), default=32, help="z of the VAE and the GAN (32)")
    model.add_argument("--eval-num", type=int, default=500, help="samples and reference images per model (500)")
    model.add_argument("--sample-steps", type=_positive(int), default=20,
                       help="DDIM steps of the DDPM and the LDM, for every measurement (default 20)")
    model.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="folder for report.md, families.json, pictures, run folders")
    run.add_argument("--no-checkpoints", action="store_true",
                     help="delete the run folders' checkpoint.pt files at the end")
    run.add_argument("--threads", type=int, default=1,
                     help="torch CPU threads (default 1: on a shared 2-core CPU, 2 threads per process ran a VAE "
                          "step 10× slower than 1; 0 = torch's default)")
    _add_device(run)
    run.add_argument("--quiet", action="store_true", help="no progress messages")


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "argv", None)  # the command line after `genfast compare-families` (genfast.cli sets it)
    report = compare_families(settings_from(args), command=None if command is None else command[1:])
    if not args.quiet:
        print(f"report: {report}")
    return 0


@dataclasses.dataclass
class Settings:
    models: tuple[str, ...]
    out: str
    steps: int | None = None
    seconds: float | None = DEFAULT_SECONDS
    dataset: str = "faces"
    data_dir: str | None = None
    image_size: int = 32
    num_samples: int = 5000
    batch_size: int = 64
    base_channels: int = 32
    latent_dim: int = 32
    eval_num: int = 500
    sample_steps: int = 20
    seed: int = 0
    no_checkpoints: bool = False
    threads: int = 1
    device: str = "auto"
    backend: str = "auto"
    quiet: bool = False

    def check(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise UsageError(f"--models must name some of {', '.join(MODELS)}, got {' '.join(self.models) or '[]'}")
        if len(set(self.models)) != len(self.models):
            raise UsageError(f"--models names a model twice: {' '.join(self.models)}")
        if self.steps is not None and self.seconds is not None:
            raise UsageError("--steps and --seconds are exclusive: give one budget")
        if self.eval_num < 8:
            raise UsageError(f"--eval-num must be >= 8 (precision/recall need more than k = 3 samples), "
                             f"got {self.eval_num}")
        if self.sample_steps > 1000:
            raise UsageError(f"--sample-steps {self.sample_steps} must be <= the 1000 diffusion timesteps")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be an integer in [0, {2**32 - 1}], got {self.seed}")
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0 = torch's default), got {self.threads}")
        if not str(self.out).strip():
            raise UsageError("--out must name a folder, got ''")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UsageError(f"--out {self.out} is a file, not a folder")


def settings_from(args) -> Settings:
    fields = {f.name for f in dataclasses.fields(Settings)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["models"] = tuple(values["models"])
    if values.get("steps") is not None:
        values["seconds"] = None
    elif values.get("seconds") is None:
        values["seconds"] = DEFAULT_SECONDS
    settings = Settings(**values)
    settings.check()
    return settings


# ----------------------------------------------------------------------------------------------------- training
def _config(settings: Settings, model: str, out: Path, *, seconds: float | None, **fields) -> RunConfig:
    return RunConfig(model=model, out=str(out), dataset=settings.dataset, data_dir=settings.data_dir,
                     image_size=settings.image_size, num_samples=settings.num_samples,
                     batch_size=settings.batch_size, seed=settings.seed, epochs=10**6, max_steps=settings.steps,
                     max_seconds=seconds, checkpoint_every=10**9, device=settings.device, backend=settings.backend,
                     quiet=True, sample_steps=settings.sample_steps, **fields)


UNET_MULT = (1, 2, 2)
# The diffusion models' learning-rate warm-up: none. The budgets here are a few hundred (pixel DDPM) to ~1300 (LDM)
# updates on a CPU, where the recipe's 500-update warm-up would hold most of them below the full learning rate; the
# rest of the recipe (gradient norm clipped to 1, x̂₀ clipped when sampling pixels) is the default's.
DIFFUSION_LR_WARMUP = 0


def unet_fields(settings: Settings, size: int) -> dict:
    """The U-Net of both diffusion models, for inputs of ``size``: the same flags, so that their speed differs by
    the input only (levels (1, 2, 2), fewer where ``size`` does not halve so often: the 7×7 latent of 28×28 images),
    and their training recipe (:data:`DIFFUSION_LR_WARMUP`)."""
    levels = len(UNET_MULT)
    while levels > 1 and size % 2 ** (levels - 1):
        levels -= 1
    return dict(base_channels=settings.base_channels, channel_mult=UNET_MULT[:levels], num_res_blocks=1,
                timesteps=1000, lr_warmup=DIFFUSION_LR_WARMUP)


def train_family(settings: Settings, model: str, say) -> tuple[object, dict]:
    """Train ``model`` under the budget; (its RunResult, its training cost: seconds, steps, per stage for ldm)."""
    out = Path(settings.out)
    stages = []

    def stage(name, config):
        say(f"training {name} ({'%d steps' % settings.steps if settings.steps else '%.0f s' % config.max_seconds})")
        started = time.perf_counter()
        result = train(config)
        stages.append(dict(stage=name, seconds=time.perf_counter() - started, steps=result.step,
                           out=str(config.out)))
        return result

    seconds = settings.seconds
    if model == "vae":
        result = stage("vae", _config(settings, "vae", out / "vae", seconds=seconds, latent_dim=settings.latent_dim,
                                      base_channels=settings.base_channels))
    elif model == "wgan":
        result = stage("wgan", _config(settings, "wgan", out / "wgan", seconds=seconds,
                                       latent_dim=settings.latent_dim, base_channels=settings.base_channels))
    elif model == "ddpm":
        result = stage("ddpm", _config(settings, "ddpm", out / "ddpm", seconds=seconds,
                                       **unet_fields(settings, settings.image_size)))
    else:
        first = stage("ldm first stage: spatial VAE",
                      _config(settings, "vae", out / "ldm_vae", seconds=seconds and seconds * LDM_VAE_SHARE,
                              latent_channels=4, base_channels=settings.base_channels))
        del first
        result = stage("ldm: latent DDPM",
                       _config(settings, "ldm", out / "ldm", seconds=seconds and seconds * (1 - LDM_VAE_SHARE),
                               vae=str(out / "ldm_vae" / "checkpoint.pt"),
                               **unet_fields(settings, settings.image_size // 4)))
    cost = dict(seconds=sum(s["seconds"] for s in stages), steps=sum(s["steps"] for s in stages), stages=stages)
    return result, cost


# --------------------------------------------------------------------------------------------------- measuring
def sampling_speed(task, num: int, device) -> dict:
    """images/s and ms per image of ``task.sample(num)`` (after a warm-up of 2 images; the fastest of up to 5 runs
    within ~1 s)."""
    g = torch.Generator(device=device).manual_seed(0)
    task.sample(2, generator=g)
    times = []
    while len(times) < 5 and sum(times) < 1.0:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        task.sample(num, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    best = min(times)
    return dict(images_per_s=num / best, ms_per_image=1000 * best / num, num=num, runs=len(times))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    return float(torch.pdist(features.double()).mean())


def measure(model: str, result, cost: dict, evaluator, net, settings: Settings, faces: bool) -> dict:
    from .controllability import controllability, generate, latents_of

    task, device = result.task, result.task.device
    task.train(False)
    latents = latents_of(model, task, sample_steps=settings.sample_steps)
    g = torch.Generator(device=device).manual_seed(settings.seed)
    started = time.perf_counter()
    zs, images = generate(latents, settings.eval_num, g)
    eval_seconds = time.perf_counter() - started
    quality = evaluator(images)
    features = torch.cat([net(chunk.to(evaluator.device)) for chunk in images.split(256)])
    out = dict(model=model, training=cost, quality={k: v for k, v in quality.items() if k != "factors"},
               factor_spread=quality.get("factors"), pairwise_distance=mean_pairwise_distance(features),
               sampling_seconds=eval_seconds, speed=sampling_speed(task, SPEED_NUM, device),
               train_images=len(result.dataset))
    out["grid"] = images[:GRID_SAMPLES].cpu()
    out["control"] = []
    if faces:
        factors = torch.cat([net.predict_factors(c.to(evaluator.device)) for c in images.split(256)])
        for latent, z in zip(latents, zs):
            cg = torch.Generator(device=device).manual_seed(settings.seed + 1)
            out["control"].append(controllability(latent, net, generator=cg, fit=(z, factors.to(z.device)),
                                                  num_random=CONTROL_RANDOM, starts=CONTROL_STARTS))
    return out


# ------------------------------------------------------------------------------------------------------- driver
def machine() -> dict:
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def compare_families(settings: Settings, *, command: list[str] | None = None) -> Path:
    """Train, measure and write the report (module docstring); returns the path of report.md. Runs with
    ``settings.threads`` torch threads (0: as set), restored afterwards."""
    threads = torch.get_num_threads()
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        return _compare_families(settings, command)
    finally:
        torch.set_num_threads(threads)


def _compare_families(settings: Settings, command: list[str] | None) -> Path:
    import genfast
    from .evaluation import Evaluator, reference_images
    from .feature_net import load_feature_net
    from .training.distributed import World, resolve_device
    from .training.loop import load_data, split_indices

    settings.check()
    say = (lambda msg: None) if settings.quiet else (lambda msg: print(f"compare-families: {msg}", file=sys.stderr,
                                                                      flush=True))
    out = Path(settings.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    load = load_average()
    started = time.perf_counter()
    faces = settings.dataset == "faces"
    net, record = load_feature_net(quiet=settings.quiet)
    device = resolve_device(settings.device, World())
    probe = _config(settings, "vae", out / "vae", seconds=settings.seconds)
    if faces:
        reference, described = reference_images(probe, settings.eval_num)
    else:
        dataset = load_data(probe)
        train_indices, _ = split_indices(len(dataset), 0, settings.seed)
        reference, described = reference_images(probe, settings.eval_num, dataset=dataset,
                                                train_indices=train_indices)
    evaluator = Evaluator(reference, net=net, record=record, faces=faces, device=device, seed=settings.seed)
    real_features = torch.cat([net(c.to(evaluator.device)) for c in reference.split(256)])
    results = {}
    for model in settings.models:
        result, cost = train_family(settings, model, say)
        say(f"measuring {model}")
        with genfast.use_backend(settings.backend):
            results[model] = measure(model, result, cost, evaluator, net, settings, faces)
        del result
    meta = dict(command=command, load_average=dict(start=load, end=load_average()), settings=dataclasses.asdict(settings),
                machine=machine(), reference=described,
                real_pairwise_distance=mean_pairwise_distance(real_features), feature_net=record,
                real_grid=reference[:GRID_SAMPLES], faces=faces)
    from .families_report import write_outputs

    report = write_outputs(results, meta, out, total_seconds=time.perf_counter() - started)
    if settings.no_checkpoints:
        for path in out.glob("*/checkpoint.pt"):
            path.unlink()
    say(f"done in {time.perf_counter() - started:.0f} s")
    return report
