"""The β-VAE experiment: train one VAE per β and measure, on held-out images, how reconstruction, KL, active latent
units, interpolation smoothness and (where the dataset knows its generative factors) MIG change with β.
``report.md`` holds the measured numbers; its sentences are written from them."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .plots import save_image_grid
from .training import RunConfig, RunResult, UsageError, train

EVAL_BATCH = 256
INTERPOLATION_PAIRS = 64
STEPS = 8


def beta_name(beta: float) -> str:
    return f"{beta:g}"


@torch.no_grad()
def evaluate(result: RunResult) -> dict:
    """Held-out metrics of a trained VAE: recon and kl (the loss terms, nats per image, z sampled with the run's
    seed), pixel MSE of decode(μ), active units (Cov_x E[z|x] > 0.01), interpolation smoothness over up to 64
    pairs of 8 steps (lower = smoother) and MIG against the dataset's factors (None without factors)."""
    from .metrics import active_units, interpolation_smoothness, mutual_information_gap

    model, config = result.task.model.eval(), result.config
    device = next(model.parameters()).device
    images = torch.stack([result.dataset[i] for i in result.eval_indices]).to(device)
    noise = torch.Generator(device=device).manual_seed(config.seed)
    recon = kl = mse = 0.0
    means = []
    for chunk in images.split(EVAL_BATCH):
        losses = model.loss(chunk, generator=noise)
        recon += losses["recon"].item() * len(chunk)
        kl += losses["kl"].item() * len(chunk)
        mu = model.encode(chunk)[0]
        mse += torch.mean((model.decode(mu) - chunk) ** 2, dim=(1, 2, 3)).sum().item()
        means.append(mu)
    mu = torch.cat(means)
    pairs = min(INTERPOLATION_PAIRS, len(images) // 2)
    frames = model.interpolate(images[:pairs], images[pairs:2 * pairs], steps=STEPS)
    factors = getattr(result.dataset, "factors", None)
    mig = None
    if factors is not None:
        mig = mutual_information_gap(mu.cpu(), factors[result.eval_indices])
    n = len(images)
    return dict(recon=recon / n, kl=kl / n, mse=mse / n, active_units=active_units(mu.cpu()),
                latent_dim=model.latent_dim, smoothness=interpolation_smoothness(frames.cpu()), mig=mig)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b != 0 else "n/a (zero baseline)"


def findings(metrics: dict[float, dict], factor_names: tuple[str, ...]) -> list[str]:
    """Comparison sentences, each β against the smallest one, computed from ``metrics`` (β → :func:`evaluate`)."""
    betas = sorted(metrics)
    base, m0 = betas[0], metrics[betas[0]]
    b0 = beta_name(base)
    lines = []
    for beta in betas[1:]:
        m, b = metrics[beta], beta_name(beta)
        lines.append(f"- Reconstruction: β={b} has {_ratio(m['recon'], m0['recon'])} the held-out reconstruction "
                     f"loss of β={b0} ({m['recon']:.1f} vs {m0['recon']:.1f} nats per image) and "
                     f"{_ratio(m['mse'], m0['mse'])} its pixel MSE of the decoded mean ({m['mse']:.4f} vs "
                     f"{m0['mse']:.4f}).")
        lines.append(f"- KL: β={b} has {_ratio(m['kl'], m0['kl'])} the KL of β={b0} "
                     f"({m['kl']:.1f} vs {m0['kl']:.1f} nats per image).")
        lines.append(f"- Active units: β={b} uses {m['active_units']} of {m['latent_dim']} latent dimensions, "
                     f"β={b0} {m0['active_units']} of {m0['latent_dim']}.")
        smoother = "smoother" if m["smoothness"] < m0["smoothness"] else \
            "less smooth" if m["smoothness"] > m0["smoothness"] else "equally smooth"
        lines.append(f"- Interpolation: β={b}'s paths are {smoother} than β={b0}'s (smoothness {m['smoothness']:.4f} "
                     f"vs {m0['smoothness']:.4f}, lower = smoother; {_ratio(m['smoothness'], m0['smoothness'])}).")
        if m["mig"] is not None and m0["mig"] is not None:
            direction = "higher" if m["mig"] > m0["mig"] else "lower" if m["mig"] < m0["mig"] else "the same"
            lines.append(f"- Disentanglement: β={b}'s MIG against the {len(factor_names)} known factors "
                         f"({', '.join(factor_names)}) is {direction}: {m['mig']:.3f} vs {m0['mig']:.3f} "
                         f"(0 = entangled, 1 = each factor in one latent dimension).")
    return lines


def _table(metrics: dict[float, dict], seconds: dict[float, float]) -> list[str]:
    has_mig = any(m["mig"] is not None for m in metrics.values())
    head = ["β", "recon (nats/image)", "KL (nats/image)", "pixel MSE", "active units", "interp. smoothness"]
    head += ["MIG"] if has_mig else []
    head += ["train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for beta in sorted(metrics):
        m = metrics[beta]
        row = [beta_name(beta), f"{m['recon']:.2f}", f"{m['kl']:.2f}", f"{m['mse']:.5f}",
               f"{m['active_units']} / {m['latent_dim']}", f"{m['smoothness']:.4f}"]
        row += [f"{m['mig']:.3f}" if m["mig"] is not None else "–"] if has_mig else []
        row += [f"{seconds[beta]:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


@torch.no_grad()
def _side_by_side(results: dict[float, RunResult], out: Path) -> None:
    """reconstructions_by_beta.png (inputs, then one row per β), interpolation_by_beta.png (3 pairs, one row per
    β each) and samples_by_beta.png (8 samples per β) from held-out images."""
    betas = sorted(results)
    first = results[betas[0]]
    device = next(first.task.model.parameters()).device
    images = torch.stack([first.dataset[i] for i in first.eval_indices[:16]]).to(device)
    models = {b: results[b].task.model.eval() for b in betas}
    labels = [f"beta={beta_name(b)}" for b in betas]
    recon = torch.cat([images[:8]] + [models[b].reconstruct(images[:8]) for b in betas])
    save_image_grid(recon, out / "reconstructions_by_beta.png", nrow=8, scale=2, row_labels=["input"] + labels)
    rows, row_labels = [], []
    for pair in range(3):
        for b, label in zip(betas, labels):
            rows.append(models[b].interpolate(images[pair:pair + 1], images[8 + pair:9 + pair], steps=STEPS)[0])
            row_labels.append(f"{pair + 1}: {label}")
    save_image_grid(torch.cat(rows), out / "interpolation_by_beta.png", nrow=STEPS, scale=2, row_labels=row_labels)
    seed = first.config.seed
    samples = [models[b].sample(8, generator=torch.Generator(device=device).manual_seed(seed)) for b in betas]
    save_image_grid(torch.cat(samples), out / "samples_by_beta.png", nrow=8, scale=2, row_labels=labels)


def compare_beta(base: RunConfig, betas: list[float]) -> Path | None:
    """Train ``base`` once per β into ``base.out``/beta_<β>, evaluate each on ``base.holdout`` held-out images and
    write report.md and the side-by-side pictures into ``base.out``; returns the report's path (None on ranks > 0).
    """
    betas = sorted(set(betas))
    if len(betas) < 2:
        raise UsageError(f"--betas needs at least two different values, got {betas}")
    out = base.out_dir
    results, seconds = {}, {}
    for beta in betas:
        started = time.perf_counter()
        results[beta] = train(dataclasses.replace(base, beta=beta, out=str(out / f"beta_{beta_name(beta)}")))
        seconds[beta] = time.perf_counter() - started
    if not results[betas[0]].world.is_main:
        return None
    metrics = {beta: evaluate(result) for beta, result in results.items()}
    _side_by_side(results, out)
    config = results[betas[0]].config
    names = tuple(getattr(results[betas[0]].dataset, "factor_names", ()) or ())
    lines = [
        f"# β-VAE comparison: {', '.join('β=' + beta_name(b) for b in betas)}",
        "",
        f"Dataset `{config.dataset}` at {config.image_size}×{config.image_size}, "
        f"{len(results[betas[0]].dataset) - config.holdout} training and {config.holdout} held-out images; "
        f"latent dim {config.latent_dim}, {results[betas[0]].step} steps of batch {config.batch_size}, "
        f"lr {config.learning_rate:g}, seed {config.seed}. All numbers are measured on the held-out images.",
        "",
        *_table(metrics, seconds),
        "",
        "## What the numbers show",
        "",
        *findings(metrics, names),
        "",
        "## Pictures",
        "",
        "Held-out inputs and their reconstructions (one row per β):",
        "",
        "![reconstructions](reconstructions_by_beta.png)",
        "",
        f"Interpolations between the posterior means of held-out pairs, {STEPS} steps (each pair: one row per β):",
        "",
        "![interpolations](interpolation_by_beta.png)",
        "",
        "Random samples z ~ N(0, I), the same z for every β:",
        "",
        "![samples](samples_by_beta.png)",
        "",
        "Per run: " + ", ".join(f"[β={beta_name(b)}](beta_{beta_name(b)}/) (`loss.png`, `metrics.csv`, "
                                f"`reconstructions.png`, `samples.png`, `interpolation.png`)" for b in betas),
        "",
        "Metrics: recon and KL are the two loss terms (z sampled), pixel MSE is that of decode(μ); a latent unit is "
        "active when the variance over the data of its posterior mean exceeds 0.01 (Burda et al. 2016); "
        "interpolation smoothness is `genfast.metrics.interpolation_smoothness` (lower = smoother); MIG is the "
        "mutual information gap (Chen et al. 2018) between the posterior means and the known factors.",
        "",
    ]
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    return report
