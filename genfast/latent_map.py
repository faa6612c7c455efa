"""``genfast example latent-map``: a VAE with a 2-D latent (genfast's fused reparameterize_kl) trained on
scikit-learn's bundled 8×8 digits upsampled to 28×28, nothing downloaded. Writes into ``--out``: the posterior means
μ(x) scattered by digit class (latent_means.png), images decoded on a grid over the latent plane (latent_grid.png), a
"1" interpolated into a "7" (interpolation_1_to_7.png), and the measured KL and reconstruction BCE next to the
figures quoted for MNIST (latent_map.md from latent_map.json); the training run itself goes to ``--out``/run."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import genfast
from ._machine import cpu_model, load_average
from .checkpoint import atomic_write
from .compare_beta import evaluate
from .plots import save_image_grid
from .training import RunConfig, RunResult, UsageError, train

RUN = "run"  # the training folder inside --out: checkpoint.pt, metrics.csv, loss.png, the run's pictures
LATENT_DIM = 2
GRID = 15  # latent_grid.png: GRID × GRID decoded images
STEPS = 8  # interpolation frames, both ends included
ENDPOINTS = (1, 7)
EVAL_BATCH = 256
# Literature figures for MNIST with z = 2 (quoted, not measured here).
QUOTED = dict(kl=8.0, bce=15.0, bce_summed=(130.0, 150.0))
MNIST_PIXELS = 784
FILES = ("latent_means.png", "latent_grid.png", "interpolation_1_to_7.png", "latent_map.md", "latent_map.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``genfast example latent-map``."""
    from .cli import _add_device, _positive, _seed

    parser.add_argument("--out", required=True, help=f"folder for the figures and the report; the training run "
                                                     f"goes to OUT/{RUN}")
    parser.add_argument("--epochs", type=_positive(int), default=100,
                        help="passes over the training images (default 100: with the other defaults 1100 steps, "
                             "about 1.5 minutes on 2 idle CPU cores)")
    parser.add_argument("--batch-size", type=_positive(int), default=128)
    parser.add_argument("--num-samples", type=_positive(int),
                        help="use this many of the 1797 digits, drawn with --seed (default all)")
    parser.add_argument("--holdout", type=_positive(int), default=297,
                        help="images held out of training, on which KL and BCE are measured (default 297)")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--image-size", type=int, choices=(28, 32, 64), default=28)
    _add_device(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def run(args) -> int:
    """Train the z = 2 VAE into OUT/run, then write the figures, latent_map.json and latent_map.md into OUT."""
    from .data import digit_labels

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    config = RunConfig(model="vae", dataset="digits", image_size=args.image_size, num_samples=args.num_samples,
                       latent_dim=LATENT_DIM, holdout=args.holdout, out=str(out / RUN), epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed, device=args.device, backend=args.backend,
                       quiet=args.quiet)
    started = time.perf_counter()
    result = train(config)
    trained = time.perf_counter() - started
    if not result.world.is_main:
        return 0
    summary = dict(data=_data_summary(result), training=_training_summary(result, trained),
                   machine=_machine(result), measured=measure(result), quoted_mnist_z2=QUOTED)
    labels = digit_labels(num_samples=config.num_samples, seed=config.seed)
    summary["representatives"] = write_figures(result, labels, out)
    summary["training"]["total_seconds"] = time.perf_counter() - started
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "latent_map.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    report = "\n".join(report_lines(summary))
    atomic_write(out / "latent_map.md", lambda tmp: Path(tmp).write_text(report, encoding="utf-8"))
    if not args.quiet:
        print(f"wrote {', '.join(FILES)} to {out} (training run in {out / RUN})", file=sys.stderr)
    return 0


@torch.no_grad()
def measure(result: RunResult) -> dict:
    """Nats per held-out image, from :func:`genfast.compare_beta.evaluate`: ``kl`` and ``bce`` (the loss terms, z
    sampled), ``floor`` = mean Σ_i H(x_i) (the BCE of a perfect reconstruction p = x, > 0 for grey targets),
    ``excess`` = bce − floor = Σ_i KL(Bern(x_i) ‖ Bern(p_i)) ≥ 0 and ``negative_elbo`` = bce + kl; ``*_per_pixel``
    = that / ``pixels``; ``active_units`` of the 2 latent dimensions."""
    metrics = evaluate(result)
    pixels = result.dataset[0].numel()
    summed = dict(bce=metrics["recon"], floor=metrics["floor"], excess=metrics["excess"])
    return dict(evaluated_on="held-out", images=len(result.eval_indices), pixels=pixels, kl=metrics["kl"], **summed,
                negative_elbo=metrics["recon"] + metrics["kl"],
                **{f"{k}_per_pixel": v / pixels for k, v in summed.items()}, active_units=metrics["active_units"])


@torch.no_grad()
def latent_means(model, images: Tensor, *, batch: int = EVAL_BATCH) -> Tensor:
    """μ(x) (N, latent_dim) on the CPU of images (N, C, S, S), ``batch`` (default 256) at a time on the model's
    device."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(chunk.to(device))[0].cpu() for chunk in images.split(batch)])


def representatives(mu: Tensor, labels: Tensor, *, classes=ENDPOINTS) -> dict[int, int]:
    """For each class c of ``classes`` (default 1 and 7): the index of its medoid in latent space, the image i of
    class c with the least Σ_j ‖μ_i − μ_j‖ over the images j of c (inside the class's main cluster even where the
    class splits in two, unlike the image nearest the mean); :class:`UsageError` if the class has no image."""
    chosen = {}
    for c in classes:
        members = (labels == c).nonzero().flatten()
        if members.numel() == 0:
            raise UsageError(f"--num-samples {len(labels)}: the images hold no {c}, the interpolation needs one")
        points = mu[members].double()
        chosen[c] = members[torch.cdist(points, points).sum(1).argmin()].item()
    return chosen


@torch.no_grad()
def write_figures(result: RunResult, labels: Tensor, out: Path) -> dict[str, int]:
    """latent_means.png (μ of every image, by class), latent_grid.png and interpolation_1_to_7.png into ``out``;
    returns the indices of the representative 1 and 7 (:func:`representatives`)."""
    model = result.task.model.eval()
    device = next(model.parameters()).device
    images = torch.stack([result.dataset[i] for i in range(len(result.dataset))])
    mu = latent_means(model, images)
    chosen = representatives(mu, labels)
    plot_latent_means(mu, labels, out / "latent_means.png", marked=chosen,
                      title=f"posterior means μ(x) of all {len(images)} digits ({len(result.eval_indices)} "
                            "held out of training)")
    save_image_grid(decode_grid(model, size=GRID), out / "latent_grid.png", nrow=GRID)
    first, last = (images[chosen[c]][None].to(device) for c in ENDPOINTS)
    frames = model.interpolate(first, last, steps=STEPS)[0]
    save_image_grid(frames, out / "interpolation_1_to_7.png", nrow=STEPS, scale=2)
    return {str(c): i for c, i in chosen.items()}


@torch.no_grad()
def decode_grid(model, *, size: int = GRID) -> Tensor:
    """Images (size², C, S, S) decoded at z = (q_j, q_{size−1−i}) for row i, column j, with q_k = Φ⁻¹((k + ½)/size)
    the normal quantiles (default size 15): z₁ grows to the right, z₂ upwards, as in latent_means.png."""
    device = next(model.parameters()).device
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(size) + 0.5) / size)
    z = torch.stack([q[None, :].expand(size, size), q.flip(0)[:, None].expand(size, size)], dim=-1)
    return model.decode(z.reshape(-1, 2).to(device))


def plot_latent_means(mu: Tensor, labels: Tensor, path: Path, *, marked: dict[int, int], title: str) -> None:
    """Scatter of μ (N, 2) coloured by ``labels`` (0..9) with a legend; the images ``marked`` (class → index) as
    black-edged stars; saved as PNG to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10")
    for c in range(10):
        points = mu[labels == c]
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7, color=colours(c), label=str(c))
    for c, i in marked.items():
        ax.scatter(*mu[i].tolist(), s=160, marker="*", color=colours(c), edgecolors="black", linewidths=1,
                   label=f"interpolation end ({c})")
    ax.set_xlabel("z₁ (μ)")
    ax.set_ylabel("z₂ (μ)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="digit", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _data_summary(result: RunResult) -> dict:
    n = len(result.dataset)
    return dict(dataset="digits (scikit-learn's bundled 8×8 digits, upsampled bilinearly)", images=n,
                image_size=result.config.image_size, train_images=n - len(result.eval_indices),
                heldout_images=len(result.eval_indices))


def _training_summary(result: RunResult, seconds: float) -> dict:
    config = result.config
    return dict(steps=result.step, epochs=config.epochs, batch_size=config.batch_size, lr=config.learning_rate,
                seed=config.seed, latent_dim=LATENT_DIM, beta=config.beta, seconds=seconds,
                images_per_s=result.step * config.batch_size / seconds)


def _machine(result: RunResult) -> dict:
    """Where the run ran: CPU (its /proc/cpuinfo model name where there is one), threads, device, the backend that
    ran reparameterize_kl, the 1-minute load average at the end (other processes slow the timings), versions."""
    from ._backend import resolve_backend

    device, load = next(result.task.model.parameters()).device, load_average()
    with genfast.use_backend(result.config.backend):
        backend = resolve_backend(device, torch.float32, "reparameterize")
    return dict(processor=platform.processor(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                backend=backend, load_average=None if load is None else round(load, 2),
                platform=platform.platform(), torch=torch.__version__, genfast=genfast.__version__)


def report_lines(summary: dict) -> list[str]:
    """latent_map.md, every number formatted from ``summary`` (latent_map.json) except the quoted MNIST figures."""
    d, t, m, hw, q = (summary[k] for k in ("data", "training", "measured", "machine", "quoted_mnist_z2"))
    where = hw["gpu"] or hw["cpu"] or hw["processor"] or "an unnamed CPU"
    low, high = q["bce_summed"]
    return [
        "# A 2-D latent space of the digits (`genfast example latent-map`)",
        "",
        f"A `ConvVAE` with z = {t['latent_dim']} (its sampling step and KL term are genfast's fused "
        f"`reparameterize_kl`, backend `{hw['backend']}`), trained by `genfast.training.train` for {t['steps']} "
        f"steps ({t['epochs']} epoch{'s' if t['epochs'] != 1 else ''} of batch {t['batch_size']}, Adam lr "
        f"{t['lr']:g}, seed {t['seed']}) on "
        f"{d['train_images']} of the {d['images']} {d['dataset']} at {d['image_size']}×{d['image_size']}; "
        f"{d['heldout_images']} images are held out. Training took {t['seconds']:.0f} s, the whole command "
        f"{t['total_seconds']:.0f} s, on {where} ({hw['device']}, {hw['torch_threads']} torch threads, "
        f"{hw['cpu_count']} CPUs, load average {hw['load_average']} at the end).",
        "",
        f"## KL and reconstruction, nats per image, on the {m['images']} {m['evaluated_on']} images",
        "",
        "| quantity | measured here | quoted for MNIST, z = 2 (literature, not measured) |",
        "| --- | --- | --- |",
        f"| KL(q(z\\|x) ‖ N(0, I)) | {m['kl']:.2f} | ≈ {q['kl']:g} |",
        f"| reconstruction BCE, summed over the {m['pixels']} pixels (z sampled) | {m['bce']:.2f} | "
        f"≈ {low:g}–{high:g} (sometimes quoted as \"≈ {q['bce']:g}\", see below) |",
        f"| floor Σ_i H(x_i) = BCE of a perfect reconstruction | {m['floor']:.2f} | – |",
        f"| excess BCE − floor = Σ_i KL(Bern(x_i) ‖ Bern(p_i)) | {m['excess']:.2f} | – |",
        f"| negative ELBO = BCE + KL | {m['negative_elbo']:.2f} | – |",
        f"| mean per-pixel BCE / floor / excess | {m['bce_per_pixel']:.4f} / {m['floor_per_pixel']:.4f} / "
        f"{m['excess_per_pixel']:.4f} | – |",
        "",
        f"Active latent units (variance of μ over the data > 0.01): {m['active_units']} of {t['latent_dim']}.",
        "",
        f"## Why the BCE is not ≈ {q['bce']:g} nats",
        "",
        *_bce_explanation(m, q),
        "",
        "## Pictures",
        "",
        "Posterior means μ(x) of every image, coloured by digit class; the stars are the interpolation's ends:",
        "",
        "![latent means](latent_means.png)",
        "",
        f"Images decoded on a {GRID}×{GRID} grid of normal quantiles Φ⁻¹((k + ½)/{GRID}) (z₁ to the right, z₂ up):",
        "",
        "![latent grid](latent_grid.png)",
        "",
        f"A \"1\" into a \"7\" in {STEPS} steps along the straight line between their posterior means (image "
        f"{summary['representatives']['1']} and image {summary['representatives']['7']}: each its class's medoid "
        "in latent space):",
        "",
        "![1 to 7](interpolation_1_to_7.png)",
        "",
        f"The training run (`loss.png`, `metrics.csv`, `reconstructions.png`, `samples.png`, `interpolation.png`) "
        f"is in [{RUN}/]({RUN}/); all numbers above are in `latent_map.json`.",
        "",
    ]


def _bce_explanation(m: dict, q: dict) -> list[str]:
    """The sentences of the BCE section, from the measured ``m`` and the quoted ``q`` figures."""
    pixels, quoted = m["pixels"], q["bce"]
    needed = quoted / pixels
    below = needed < m["floor_per_pixel"]
    floor_side = "below this data's floor, so no decoder can reach it on these targets" if below else \
        "above this data's floor"
    low, high = q["bce_summed"]
    normalisations = {"summed per image": m["bce"], "mean per pixel": m["bce_per_pixel"],
                      "summed, in bits": m["bce"] / math.log(2), "excess over the floor": m["excess"],
                      "excess per pixel": m["excess_per_pixel"]}
    nearest = min(normalisations, key=lambda k: abs(math.log(normalisations[k] / quoted)))
    return [
        f"The reconstruction term of the ELBO is the Bernoulli BCE summed over an image's {pixels} pixels: "
        f"{m['bce']:.2f} nats = {pixels} × {m['bce_per_pixel']:.4f} nats, the mean per-pixel BCE.",
        "",
        f"The targets are grey levels in [0, 1], not 0/1 (17 levels of the 8×8 digits, bilinearly upsampled), so even "
        f"a perfect decoder p = x pays Σ_i H(x_i) = {m['floor']:.2f} nats per image ({m['floor_per_pixel']:.4f} per "
        f"pixel): the floor. What the model adds over it, Σ_i KL(Bern(x_i) ‖ Bern(p_i)), is {m['excess']:.2f} nats "
        f"({m['excess_per_pixel']:.4f} per pixel, {m['excess'] / m['bce']:.0%} of the BCE).",
        "",
        f"A summed BCE of {quoted:g} nats would be a mean of {quoted:g} / {pixels} = {needed:.4f} nats per pixel: "
        f"{m['bce_per_pixel'] / needed:.1f}× less than this model reaches ({m['bce_per_pixel']:.4f}) and "
        f"{floor_side} ({m['floor_per_pixel']:.4f}). On MNIST with z = 2 the summed BCE is ≈ {low:g}–{high:g} nats "
        f"(literature), ≈ {low / MNIST_PIXELS:.2f}–{high / MNIST_PIXELS:.2f} nats per pixel over its {MNIST_PIXELS} "
        f"pixels, so \"{quoted:g}\" is "
        "not a summed per-pixel BCE of such a model: it is a different normalisation (or a different quantity).",
        "",
        "The measured BCE in the normalisations in use: " +
        "; ".join(f"{name} {value:.4g}" for name, value in normalisations.items()) +
        f". Nearest to {quoted:g} (by ratio): {nearest}.",
    ]
