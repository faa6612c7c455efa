"""The ``genfast`` command: ``train {vae,wgan,ddpm,ldm}``, ``compare-beta``, ``compare-families``, ``sample
{ddpm,ldm}``, ``eval``, ``example latent-map``, ``info`` and ``bench``.

Exit codes: 0 done, 1 training stopped on a NaN/inf loss, 2 bad flags, paths or files (one line on stderr, no
traceback), 130 interrupted by SIGINT and 143 by SIGTERM (after saving a checkpoint)."""
from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
from pathlib import Path

from .training.config import MAX_SEED

USAGE_ERROR, INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``genfast train vae: error: ...`` and exit code 2."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, accept, expected: str):
    """An argparse type: ``kind(text)`` when ``accept`` takes it, else "expected <expected>, got <text>"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def _positive(kind):
    return _number(kind, lambda v: v > 0, f"a positive {kind.__name__}")


_seed = _number(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
_non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_decay = _number(float, lambda v: 0 <= v < 1, "a decay in [0, 1) (0 = off)")
_eval_num = _number(int, lambda v: v >= 4, "an integer >= 4")
_positive_seconds = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number of seconds > 0")
_quantile = _number(float, lambda v: 0 < v <= 1, "a quantile in (0, 1]")
_max_value = _number(float, lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1")


def _compile_backend(text):
    from .training.precision import compile_backends

    if text not in compile_backends():
        raise argparse.ArgumentTypeError(f"expected a torch.compile backend ({', '.join(compile_backends())}), "
                                         f"got {text!r}")
    return text


def _add_common(p: argparse.ArgumentParser, *, model: str) -> None:
    """Flags every training command takes: data, optimisation, run length, device."""
    from .data import DATASETS
    from .training.config import DEFAULT_GRAD_CLIP, DEFAULT_LR, DEFAULT_LR_WARMUP

    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="faces",
                      help="faces: built-in synthetic faces with known factors (default); celeba/folder: images "
                           "under --data-dir; mnist/digits")
    data.add_argument("--data-dir", help="folder of the dataset's files (celeba, folder, mnist)")
    data.add_argument("--num-samples", type=_positive(int), help="use this many images (faces: how many to make)")
    data.add_argument("--image-size", type=int, choices=(28, 32, 64), default=64)
    data.add_argument("--workers", type=_non_negative_int, default=0, help="data-loading processes (default 0)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=_positive(int), default=20)
    train.add_argument("--max-steps", type=_positive(int), help="stop after this many steps in all")
    train.add_argument("--max-seconds", type=_positive_seconds, metavar="S",
                       help="stop after S seconds of training in this process (a resumed run gets S more)")
    train.add_argument("--batch-size", type=_positive(int), default=128, help="images a step over all processes")
    train.add_argument("--lr", type=_positive(float), help=f"Adam learning rate (default {DEFAULT_LR[model]:g})")
    recipe = ", diffusers' train_unconditional.py" if model in ("ddpm", "ldm") else ""
    train.add_argument("--lr-warmup", type=_non_negative_int, metavar="STEPS",
                       help="raise the learning rate linearly over the first STEPS updates, 0 = off (default "
                            f"{DEFAULT_LR_WARMUP[model]}{recipe})")
    train.add_argument("--grad-clip", type=_non_negative_float, metavar="NORM",
                       help="clip the total gradient norm of each update to NORM, 0 = off (default "
                            f"{DEFAULT_GRAD_CLIP[model]:g}{recipe})")
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--latent-dim", type=_positive(int), default=128)
    train.add_argument("--base-channels", type=_positive(int), help="width of the first layer (model default)")
    _add_step(p, model=model)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="folder for the checkpoint, metrics and pictures")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run.add_argument("--checkpoint-every", type=_positive(int), default=500, help="steps between checkpoints")
    _add_device(run)
    run.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def _add_step(p: argparse.ArgumentParser, *, model: str) -> None:
    """How a training step runs (saved in the checkpoint) and the sample quality measured during training."""
    from .training.config import DEFAULT_EMA
    from .training.precision import PRECISIONS

    step = p.add_argument_group("precision, weight averaging, compilation")
    step.add_argument("--precision", choices=PRECISIONS,
                      help="autocast dtype of the step (default: bf16 on a GPU with native bfloat16, else fp32); "
                           "fp16 adds a dynamic loss scaler")
    step.add_argument("--ema", type=_decay, metavar="DECAY",
                      help="decay of the exponential moving average of the weights that samples and evaluations "
                           f"use, 0 = off (default {DEFAULT_EMA[model]:g})")
    step.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                      help="EMA decay min(DECAY, (1+t)/(10+t)) after t updates (default on)")
    step.add_argument("--compile", nargs="?", const="inductor", type=_compile_backend, metavar="BACKEND",
                      help="torch.compile the training step (BACKEND default inductor)")
    step.add_argument("--channels-last", action="store_true", help="models and images in channels_last")
    quality = p.add_argument_group("sample quality (genfast eval's metrics, into metrics.csv)")
    quality.add_argument("--eval-every", type=_non_negative_int, default=0, metavar="STEPS",
                         help="FID, KID, precision and recall every STEPS steps (default 0 = never)")
    quality.add_argument("--eval-num", type=_eval_num, default=1000, metavar="N",
                         help="samples (and reference images) per evaluation (default 1000)")


def _add_device(group) -> None:
    from ._backend import BACKENDS

    group.add_argument("--backend", choices=BACKENDS, default="auto", help="genfast op implementation")
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")


def _add_vae(p) -> None:
    p.add_argument("--beta", type=_positive(float), default=1.0, help="loss = recon + beta*KL (default 1)")
    p.add_argument("--latent-channels", type=_positive(int), metavar="C",
                   help="a spatial latent C×S/4×S/4 (the first stage of latent diffusion) instead of --latent-dim")


def _add_wgan(p) -> None:
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 (default 0.0; the original scripts used 0.5)")
    p.add_argument("--gp-weight", type=_non_negative_float, default=10.0,
                   help="gradient penalty weight lambda (default 10)")
    p.add_argument("--n-critic", type=_positive(int), default=5, help="critic steps per generator step (default 5)")


def _add_diffusion(p) -> None:
    """The U-Net, the schedule and the prediction type of a ddpm or ldm run."""
    from .training.config import PREDICTION_TYPES

    p.add_argument("--timesteps", type=_positive(int), default=1000, help="diffusion steps T (default 1000)")
    p.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon",
                   help="what the U-Net predicts: the noise (epsilon, Ho et al.; default), v (v_prediction, "
                        "Salimans & Ho) or x0 (sample)")
    p.add_argument("--channel-mult", type=_positive(int), nargs="+", default=[1, 2, 2, 2])
    p.add_argument("--num-res-blocks", type=_positive(int), default=2)
    p.add_argument("--num-groups", type=_positive(int), default=32,
                   help="GroupNorm groups of the U-Net (default 32; must divide every level's channels)")
    p.add_argument("--scale-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="the time embedding scales and shifts each residual block's normalised features (ADM, "
                        "default); --no-scale-shift adds it before the norm (Ho et al.)")
    p.add_argument("--sample-steps", type=_positive(int), default=50, help="DDIM steps for samples.png (default 50)")


def _add_x0_handling(group, *, default: str) -> None:
    """--clip-sample / --thresholding (diffusers' x̂₀ settings of the sampler steps) in ``group``; ``default`` says
    what applies when they are not given."""
    group.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=None,
                       help=f"clip the predicted x̂₀ to [-1, 1] in every step ({default}: on)")
    group.add_argument("--thresholding", action=argparse.BooleanOptionalAction, default=None,
                       help="Imagen's dynamic thresholding of x̂₀ instead of clipping "
                            f"({default}: off)")
    group.add_argument("--dynamic-thresholding-ratio", type=_quantile, metavar="R",
                       help=f"quantile of |x̂₀| that sets the threshold ({default}: 0.995)")
    group.add_argument("--sample-max-value", type=_max_value, metavar="V",
                       help=f"largest threshold ({default}: 1.0, diffusers' default, with which thresholding "
                            "clips like --clip-sample; DeepFloyd IF samples with 1.5)")


def _add_ddpm(p) -> None:
    _add_diffusion(p)
    _add_x0_handling(p, default="samples.png and --eval-every; default")


X0_GROUP = "x̂₀ in the sampler steps (diffusers' settings)"


def _add_ldm(p) -> None:
    p.add_argument("--vae", metavar="CKPT",
                   help="checkpoint.pt of a VAE trained with --latent-channels, frozen; its latents are diffused "
                        "(required for a new run; --resume takes the VAE from the run's checkpoint)")
    _add_diffusion(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genfast", description="Train and sample VAE, WGAN-GP and DDPM models with genfast's "
                                                  "fused kernels; benchmark them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model").add_subparsers(dest="model", required=True,
                                                                             parser_class=_Parser)
    for model, add, what in (("vae", _add_vae, "convolutional (beta-)VAE"), ("wgan", _add_wgan, "WGAN-GP"),
                             ("ddpm", _add_ddpm, "DDPM diffusion model"),
                             ("ldm", _add_ldm, "latent diffusion model (a DDPM on a frozen VAE's latents)")):
        p = train.add_parser(model, help=f"train a {what}", description=f"Train a {what}.")
        add(p.add_argument_group(model))
        _add_common(p, model=model)

    compare = commands.add_parser("compare-beta", help="train one VAE per beta and compare them (report.md)",
                                  description="Train one VAE per beta into OUT/beta_<b> and measure on held-out "
                                              "images how reconstruction, KL, active units, interpolation "
                                              "smoothness and (faces) MIG change with beta.")
    compare.add_argument("--betas", type=_positive(float), nargs="+", default=[1.0, 4.0])
    compare.add_argument("--holdout", type=_positive(int), default=512, help="held-out images for the metrics")
    compare.add_argument("--seeds", type=_positive(int), default=1,
                         help="runs per beta, seeds --seed, --seed+1, ...: metrics as mean ± spread (default 1)")
    _add_common(compare, model="vae")
    _add_module_command(commands, "compare-families", "compare_families",
                        "train VAE, WGAN-GP, DDPM and LDM on the same data and compare them (report.md)")

    sample = commands.add_parser("sample", help="sample a trained model").add_subparsers(dest="model", required=True,
                                                                                        parser_class=_Parser)
    for model, what in (("ddpm", "DDPM"), ("ldm", "latent diffusion model")):
        p = sample.add_parser(model, help=f"sample a trained {what}", description=f"Sample a {what} checkpoint.")
        p.add_argument("--checkpoint", required=True, help=f"checkpoint.pt written by genfast train {model}")
        p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
        p.add_argument("--steps", type=_positive(int), help="DDIM steps (default 50; ddpm always runs all T)")
        p.add_argument("--num", type=_positive(int), default=16)
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("--out", required=True, help="folder for samples.png")
        p.add_argument("--quiet", action="store_true")
        _add_device(p)
        if model == "ddpm":
            _add_x0_handling(p.add_argument_group(X0_GROUP), default="default: the run's setting; by default")

    _add_eval(commands)
    example = commands.add_parser("example", help="small worked examples").add_subparsers(
        dest="model", required=True, parser_class=_Parser)
    _add_module_command(example, "latent-map", "latent_map",
                        "a VAE with a 2-D latent on the bundled 8×8 digits: latent map, decoded grid, 1 → 7")
    commands.add_parser("info", help="versions, device and which backends are available")
    commands.add_parser("bench", help="run the benchmarks (genfast bench --help)", add_help=False)
    return parser


def _add_module_command(commands, name: str, module: str, what: str) -> None:
    """Subcommand ``name`` whose flags and body are ``genfast.<module>``'s ``add_arguments`` and ``run``."""
    p = commands.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
    importlib.import_module(f"genfast.{module}").add_arguments(p)
    p.set_defaults(run=f"genfast.{module}")


def _add_eval(commands) -> None:
    p = commands.add_parser("eval", help="FID, KID, precision and recall of a trained model's samples",
                            description="Sample a checkpoint and measure FID, KID, precision and recall (and, on "
                                        "the faces, the spread of the predicted factors) in the feature space of "
                                        "genfast's face-factor network; writes OUT/eval.json and prints a table.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by genfast train")
    p.add_argument("--num", type=_eval_num, default=1000, help="samples and reference images (default 1000)")
    p.add_argument("--k", type=_positive(int), default=3, help="neighbours of the precision/recall manifolds "
                                                               "(default 3)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the samples (default 0)")
    p.add_argument("--batch-size", type=_positive(int), help="samples a batch (default the run's)")
    p.add_argument("--data-dir", help="where the run's data set is now (default the checkpoint's --data-dir)")
    p.add_argument("--out", required=True, help="folder for eval.json and samples.png")
    p.add_argument("--quiet", action="store_true", help="no table or messages")
    _add_device(p)
    _add_x0_handling(p.add_argument_group(X0_GROUP),
                     default="pixel-space ddpm checkpoints only; default: the run's setting; by default")


X0_FLAGS = ("clip_sample", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")


def _x0_overrides(args) -> dict:
    """The x̂₀ settings given on the command line of ``sample`` or ``eval`` (they replace the run's)."""
    return {name: getattr(args, name) for name in X0_FLAGS if getattr(args, name, None) is not None}


def _config(args, model: str, **overrides):
    from .training import RunConfig

    names = ("dataset", "data_dir", "num_samples", "image_size", "workers", "epochs", "max_steps", "batch_size",
             "lr", "seed", "latent_dim", "latent_channels", "vae", "max_seconds", "base_channels", "out", "resume", "checkpoint_every", "backend", "device",
             "quiet", "beta", "beta1", "gp_weight", "n_critic", "timesteps", "schedule", "channel_mult",
             "num_res_blocks", "sample_steps", "precision", "ema", "ema_warmup", "compile", "channels_last",
             "eval_every", "eval_num", "lr_warmup", "grad_clip", "prediction_type", "num_groups", "scale_shift",
             "clip_sample", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")
    fields = {name: getattr(args, name) for name in names if hasattr(args, name)}
    for name in ("thresholding", "dynamic_thresholding_ratio", "sample_max_value"):  # None: not given
        if fields.get(name, 0) is None:
            del fields[name]
    fields.update(overrides)
    return RunConfig(model=model, given=tuple(n for n in names if n in args.given), **fields)


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _train(args) -> int:
    from .training import train

    result = train(_config(args, args.model))
    if result.world.is_main:
        _say(args, f"trained {args.model} for {result.step} steps; wrote {result.config.out}")
    return 0


def _compare_beta(args) -> int:
    from .compare_beta import compare_beta

    report = compare_beta(_config(args, "vae", holdout=args.holdout), args.betas, seeds=args.seeds)
    if report is not None:
        _say(args, f"wrote {report}")
    return 0


def _sample(args) -> int:
    import torch

    import genfast
    from .checkpoint import load_checkpoint
    from .plots import save_image_grid
    from .training import RunConfig, UsageError, build_ddpm, sample_ddpm
    from .training.config import LEGACY
    from .training.distributed import World, resolve_device
    from .training.tasks import grid_columns

    import dataclasses

    if not args.out.strip():
        raise UsageError("--out must name a folder, got ''")
    try:
        saved = load_checkpoint(args.checkpoint, keys=("config", "channels", "task"))
        config = RunConfig(**{**LEGACY, **saved["config"]})
        if config.model != args.model:
            raise UsageError(f"--checkpoint {args.checkpoint} is a {config.model} checkpoint, not {args.model}")
        model = build_ddpm(config, saved["channels"])
        ema = saved["task"].get("ema", {}).get("model")  # a run with --ema samples with the averaged weights
        model.load_state_dict(ema["module"] if ema else saved["task"]["modules"]["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # RuntimeError: load_state_dict mismatches
        raise UsageError(f"--checkpoint: {str(exc).strip().splitlines()[0]}") from None
    if args.sampler == "ddpm" and args.steps not in (None, config.timesteps):
        raise UsageError(f"--steps: the ddpm sampler runs all T={config.timesteps} steps of this model "
                         f"(use --sampler ddim for fewer), got {args.steps}")
    if args.steps is not None and args.steps > config.timesteps:
        raise UsageError(f"--steps must be <= the model's T={config.timesteps}, got {args.steps}")
    config = dataclasses.replace(config, **_x0_overrides(args))
    try:
        config._check_diffusion_settings()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device = resolve_device(args.device, World())
    reason = dataclasses.replace(config, backend=args.backend).backend_reason(device)
    if reason is not None:
        raise UsageError(f"--backend {args.backend} is not available on {device}: {reason}")
    model.to(device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    with genfast.use_backend(args.backend), torch.no_grad():
        images = sample_ddpm(model, args.num, sampler=args.sampler, steps=args.steps,
                             generator=torch.Generator(device=device).manual_seed(args.seed),
                             progress=not args.quiet and sys.stderr.isatty(),
                             sampling=config.sampling if args.model == "ddpm" else None)
    save_image_grid(images, out / "samples.png", nrow=grid_columns(args.num), scale=2)
    _say(args, f"wrote {out / 'samples.png'} ({args.num} samples, {args.sampler})")
    return 0


def _eval(args) -> int:
    from .evaluation import evaluate_checkpoint, format_table

    result = evaluate_checkpoint(args.checkpoint, out=args.out, num=args.num, k=args.k, seed=args.seed,
                                 batch_size=args.batch_size, data_dir=args.data_dir, device=args.device,
                                 backend=args.backend, quiet=args.quiet, sampling=_x0_overrides(args))
    if not args.quiet:
        print(format_table(result))
    _say(args, f"wrote {Path(args.out) / 'eval.json'}")
    return 0


def _info(args) -> int:
    import torch

    import genfast
    from ._backend import BACKENDS, OPS, why_not

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # not installed, or a broken install
        triton_version = f"not importable ({type(exc).__name__})"
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"genfast {genfast.__version__}")
    print(f"torch   {torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    print(f"triton  {triton_version}")
    print(f"python  {platform.python_version()}")
    print(f"device  {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA device)'}")
    print(f"backend {genfast.get_backend()} (selected)")
    print(f"backends on {device}:")
    for name in BACKENDS:
        runs = [op for op in OPS if why_not(name, device, op=op) is None]
        if not runs:
            status = f"unavailable: {why_not(name, device)}"
        elif len(runs) < len(OPS):
            missing = next(op for op in OPS if op not in runs)
            status = f"available for {', '.join(runs)} only ({why_not(name, device, op=missing)})"
        else:
            status = "available"
        print(f"  {name:<10} {status}")
    return 0


def _bench(argv: list[str]) -> int:
    try:
        from genfast.bench import cli as bench_cli
    except ImportError as exc:
        print(f"genfast bench: error: the benchmark suite cannot be imported ({exc})", file=sys.stderr)
        return USAGE_ERROR
    parser = _Parser(prog="genfast bench", description="Benchmark genfast's kernels.")
    bench_cli.add_arguments(parser)
    return _run(parser, argv, bench_cli.run)


def _run(parser: argparse.ArgumentParser, argv: list[str], command) -> int:
    """Parse ``argv`` and run ``command(args)``; expected failures print one line and give the exit code."""
    from .training import Interrupted, NonFiniteLoss, UsageError

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    args.given, args.argv = _given(parser, argv), argv
    if command is None:
        run = getattr(args, "run", None)
        command = importlib.import_module(run).run if run else COMMANDS[args.command]
    prog = " ".join(filter(None, ("genfast", getattr(args, "command", "bench"), getattr(args, "model", None))))
    try:
        import genfast

        genfast.get_backend()  # a bad $GENFAST_BACKEND is a usage error too
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return command(args)
    except (UsageError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except NonFiniteLoss as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options that ``argv`` sets explicitly, in ``parser`` and its subcommands."""
    dests, parsers = {}, [parser]
    while parsers:
        for action in parsers.pop()._actions:
            dests.update(dict.fromkeys(action.option_strings, action.dest))
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    given = set()
    for arg in argv:
        name = arg.split("=", 1)[0]
        matches = [name] if name in dests else [o for o in dests if name.startswith("--") and o.startswith(name)]
        if len({dests[o] for o in matches}) == 1:  # exact, or an abbreviation argparse accepts (unambiguous)
            given.add(dests[matches[0]])
    return given


COMMANDS = {"train": _train, "compare-beta": _compare_beta, "sample": _sample, "eval": _eval, "info": _info}


def main(argv: list[str] | None = None) -> int:
    """Run the ``genfast`` command line ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    return _run(build_parser(), argv, None)
