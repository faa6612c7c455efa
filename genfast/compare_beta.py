"""The β-VAE experiment: train one VAE per β (and per seed with ``seeds`` > 1) and measure, on held-out images, how
reconstruction (and its excess over the data's entropy floor), KL, active latent units, interpolation smoothness
and, where the dataset knows its generative factors, MIG and which latent carries each factor change with β.
``report.md`` holds the measured numbers (mean ± spread over the seeds, :mod:`genfast.beta_report`); its sentences
are written from them."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .beta_report import beta_name, factor_table, findings, metric_table, mi_matrix
from .checkpoint import atomic_write
from .plots import save_image_grid
from .training import RunConfig, RunResult, UsageError, train
from .training.config import MAX_SEED

EVAL_BATCH = 256
INTERPOLATION_PAIRS = 64
STEPS = 8
CHANCE_SEED = 0  # the permutation of the held-out images behind the chance level of the factor MI


@torch.no_grad()
def _losses(model, images: torch.Tensor, seed: int) -> tuple[dict, torch.Tensor]:
    """Per-image means of the loss terms (z sampled from a generator seeded with ``seed``), of the reconstruction
    loss's floor (:func:`genfast.metrics.bernoulli_entropy_floor` for bce, 0 for mse) and of the pixel MSE of
    decode(μ); and the posterior means μ flattened to (N, D)."""
    from .metrics import bernoulli_entropy_floor

    noise = torch.Generator(device=images.device).manual_seed(seed)
    sums = dict(recon=0.0, kl=0.0, floor=0.0, mse=0.0)
    means = []
    for chunk in images.split(EVAL_BATCH):
        losses = model.loss(chunk, generator=noise)
        sums["recon"] += losses["recon"].item() * len(chunk)
        sums["kl"] += losses["kl"].item() * len(chunk)
        if model.recon_loss == "bce":
            sums["floor"] += bernoulli_entropy_floor(chunk).sum().item()
        mu = model.encode(chunk)[0]
        sums["mse"] += torch.mean((model.decode(mu) - chunk) ** 2, dim=(1, 2, 3)).sum().item()
        means.append(mu.flatten(1))
    terms = {key: value / len(images) for key, value in sums.items()}
    terms["excess"] = terms["recon"] - terms["floor"]
    return terms, torch.cat(means).cpu()


def _factor_metrics(mu: torch.Tensor, factors: torch.Tensor | None) -> dict:
    """MIG, the normalised MI matrix M (K, D) of :func:`genfast.metrics.factor_latent_mi` and each factor's chance
    level (max_d M[k, d] with the factors' rows permuted, ``CHANCE_SEED``); all None without factors."""
    from .metrics import factor_latent_mi, mutual_information_gap

    if factors is None:
        return dict(mig=None, factor_mi=None, chance=None)
    order = torch.randperm(len(factors), generator=torch.Generator().manual_seed(CHANCE_SEED))
    mig = mutual_information_gap(mu, factors) if mu.shape[1] >= 2 else None
    return dict(mig=mig, factor_mi=factor_latent_mi(mu, factors),
                chance=factor_latent_mi(mu, factors[order]).max(dim=1).values)


@torch.no_grad()
def evaluate(result: RunResult) -> dict:
    """Held-out metrics of a trained VAE: recon and kl (the loss terms, nats per image, z sampled with the run's
    seed), floor and excess = recon − floor (see :func:`_losses`), pixel MSE of decode(μ), active units
    (Var_x E[z|x] > 0.01), interpolation smoothness over up to 64 pairs of 8 steps (lower = smoother) and, against
    the dataset's factors (None without), MIG, the factor × latent normalised MI and its chance level."""
    from .metrics import active_units, interpolation_smoothness

    model = result.task.model.eval()
    device = next(model.parameters()).device
    images = torch.stack([result.dataset[i] for i in result.eval_indices]).to(device)
    terms, mu = _losses(model, images, result.config.seed)
    pairs = min(INTERPOLATION_PAIRS, len(images) // 2)
    frames = model.interpolate(images[:pairs], images[pairs:2 * pairs], steps=STEPS)
    factors = getattr(result.dataset, "factors", None)
    factors = None if factors is None else factors[result.eval_indices]
    return dict(**terms, active_units=active_units(mu), latent_dim=mu.shape[1],
                smoothness=interpolation_smoothness(frames.cpu()), **_factor_metrics(mu, factors))


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


def _check_seeds(seeds, base_seed: int) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"seeds (--seeds) must be a positive int, got {seeds!r}")
    if base_seed + seeds - 1 > MAX_SEED:
        raise UsageError(f"seeds (--seeds) {seeds} from --seed {base_seed} would pass the largest seed {MAX_SEED}")


def run_dir(out: Path, beta: float, seed: int, seeds: int) -> Path:
    """OUT/beta_<β> for one seed, OUT/beta_<β>/seed_<seed> for several."""
    folder = out / f"beta_{beta_name(beta)}"
    return folder / f"seed_{seed}" if seeds > 1 else folder


def compare_beta(base: RunConfig, betas: list[float], *, seeds: int = 1) -> Path | None:
    """Train ``base`` once per β and seed (``base.seed`` + 0 … ``seeds`` − 1; each seed draws its own data, split,
    initialisation and noise, the same for every β) into :func:`run_dir`, evaluate each on ``base.holdout``
    held-out images and write report.md and the side-by-side pictures (first seed) into ``base.out``; returns the
    report's path (None on ranks > 0)."""
    betas = sorted(set(betas))
    if len(betas) < 2:
        raise UsageError(f"--betas needs at least two different values, got {betas}")
    _check_seeds(seeds, base.seed)
    metrics, first, main = {beta: [] for beta in betas}, {}, True
    for beta in betas:
        for seed in range(base.seed, base.seed + seeds):
            started = time.perf_counter()
            result = train(dataclasses.replace(base, beta=beta, seed=seed,
                                               out=str(run_dir(base.out_dir, beta, seed, seeds))))
            seconds, main = time.perf_counter() - started, result.world.is_main
            if main:
                metrics[beta].append(dict(evaluate(result), seconds=seconds))
                first.setdefault(beta, result)
    if not main:
        return None
    _side_by_side(first, base.out_dir)
    report = base.out_dir / "report.md"
    lines = _report(first, metrics, seeds)
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    return report


def _report(first: dict[float, RunResult], metrics: dict[float, list[dict]], seeds: int) -> list[str]:
    """The lines of report.md."""
    betas = sorted(first)
    result = first[betas[0]]
    config, names = result.config, tuple(getattr(result.dataset, "factor_names", ()) or ())
    seed_text = f"seed {config.seed}" if seeds == 1 else \
        f"seeds {config.seed}–{config.seed + seeds - 1} (each its own draw of the data, split, initialisation " \
        f"and noise, the same for every β; numbers are mean ± sample standard deviation over the seeds)"
    folders = [(b, s) for b in betas for s in range(config.seed, config.seed + seeds)]
    return [
        f"# β-VAE comparison: {', '.join('β=' + beta_name(b) for b in betas)}",
        "",
        f"Dataset `{config.dataset}` at {config.image_size}×{config.image_size}, "
        f"{len(result.dataset) - config.holdout} training and {config.holdout} held-out images; "
        f"latent dim {metrics[betas[0]][0]['latent_dim']}, {result.step} steps of batch {config.batch_size}, "
        f"lr {config.learning_rate:g}, {seed_text}. All numbers are measured on the held-out images.",
        "",
        *metric_table(metrics),
        "",
        "## What the numbers show",
        "",
        *findings(metrics, names),
        "",
        *_factor_section(metrics, names, config.seed),
        "## Pictures",
        "",
        f"From seed {config.seed}. Held-out inputs and their reconstructions (one row per β):",
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
        "Per run (`loss.png`, `metrics.csv`, `reconstructions.png`, `samples.png`, `interpolation.png`): "
        + ", ".join(f"[β={beta_name(b)}{f', seed {s}' if seeds > 1 else ''}]"
                    f"({run_dir(Path(), b, s, seeds).as_posix()}/)" for b, s in folders),
        "",
        "Metrics: recon and KL are the two loss terms (z sampled); the floor is the least reconstruction loss any "
        "decoder reaches on these images (bce: Σ_i H(x_i) of the continuous targets, mse: 0) and the excess is "
        "recon − floor; pixel MSE is that of decode(μ); a latent unit is active when the variance over the data of "
        "its posterior mean exceeds 0.01 (Burda et al. 2016); interpolation smoothness is "
        "`genfast.metrics.interpolation_smoothness` (lower = smoother); MIG is the mutual information gap (Chen et "
        "al. 2018) between the posterior means and the known factors.",
        "",
    ]


def _factor_section(metrics: dict[float, list[dict]], names: tuple[str, ...], seed: int) -> list[str]:
    """## Which latent carries each factor: the per-factor table and, per β, the MI matrix of the first seed."""
    table = factor_table(metrics, names)
    if not table:
        return []
    lines = ["## Which latent carries each factor", "",
             "Normalised mutual information I(z_d; v) / H(v) between each factor v and each latent's posterior "
             "mean (`genfast.metrics.factor_latent_mi`, 20 bins). Per factor: its top latent in each seed, that "
             "latent's normalised MI, the gap to the second latent, and the chance level (the top normalised MI "
             "once the factor is shuffled against the latents: what unrelated latents score on this many images).",
             "", *table, ""]
    for beta in sorted(metrics):
        lines += [f"β={beta_name(beta)}, seed {seed}: the latents that rank first or second for some factor:", "",
                  *mi_matrix(metrics[beta][0]["factor_mi"], names), ""]
    return lines
