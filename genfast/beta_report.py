"""The numbers and sentences of the β-VAE comparison's report.md, computed from per-run metrics
(β → one :func:`genfast.compare_beta.evaluate` dict per seed, each with its ``seconds`` of training).

Every number is the mean over the seeds ± their sample standard deviation s = √(Σ(x − x̄)² / (N − 1)); with one
seed there is no spread and the single value is shown. Two β differ beyond the seeds' noise ("exceeds the spread")
when |x̄_a − x̄_b| > s_a + s_b. A factor is carried by no latent when its top normalised MI is less than
:data:`CARRIED_MARGIN` above its chance level (the top normalised MI once the factor is shuffled against the
latents: what unrelated latents score at this number of images)."""
from __future__ import annotations

import statistics

import torch

CARRIED_MARGIN = 0.1
SCALARS = ("recon", "floor", "excess", "kl", "mse", "active_units", "smoothness", "mig", "seconds")

Stat = tuple[float, "float | None"]  # (mean, sample standard deviation or None for one seed)


def beta_name(beta: float) -> str:
    return f"{beta:g}"


def _stat(values) -> Stat:
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _top_two(factor_mi: torch.Tensor) -> torch.Tensor:
    """(K, 2) the highest and second-highest normalised MI of each factor (the second 0 with a single latent)."""
    top = factor_mi.topk(min(2, factor_mi.shape[1]), dim=1).values
    return torch.cat([top, torch.zeros(top.shape[0], 2 - top.shape[1], dtype=top.dtype)], dim=1)


def summarise(runs: list[dict]) -> dict:
    """Mean ± spread over one β's seeds of each scalar (None where a run has None) and, with factors, per factor k
    of ``top`` (max_d M[k, d]), ``gap`` (top − second), ``chance`` and the top latent of each seed (``latent``)."""
    summary = {key: None if any(r[key] is None for r in runs) else _stat(r[key] for r in runs) for key in SCALARS}
    summary["seeds"], summary["latent_dim"] = len(runs), runs[0]["latent_dim"]
    if runs[0]["factor_mi"] is not None:
        tops = [_top_two(r["factor_mi"]) for r in runs]
        per_factor = range(tops[0].shape[0])
        summary["top"] = [_stat(t[k, 0] for t in tops) for k in per_factor]
        summary["gap"] = [_stat(t[k, 0] - t[k, 1] for t in tops) for k in per_factor]
        summary["chance"] = [_stat(r["chance"][k] for r in runs) for k in per_factor]
        summary["latent"] = [[int(r["factor_mi"][k].argmax()) for r in runs] for k in per_factor]
    return summary


def _summaries(metrics: dict[float, list[dict]]) -> dict[float, dict]:
    return {beta: summarise(metrics[beta]) for beta in sorted(metrics)}


def fmt(stat: Stat, digits: int) -> str:
    mean, spread = stat
    return f"{mean:.{digits}f}" if spread is None else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _verdict(a: Stat, b: Stat, sep: str = ": ") -> str:
    """``sep`` + "exceeds the spread" / "within the spread" by the rule above; "" without a spread."""
    if a[1] is None or b[1] is None:
        return ""
    return sep + ("exceeds the spread" if abs(a[0] - b[0]) > a[1] + b[1] else "within the spread")


def _ratio(a: Stat, b: Stat) -> str:
    return f"{a[0] / b[0]:.2f}×" if b[0] != 0 else "n/a (zero baseline)"


def carried(summary: dict, k: int) -> bool:
    return summary["top"][k][0] >= summary["chance"][k][0] + CARRIED_MARGIN


def _spread_rule(seeds: int) -> str:
    if seeds == 1:
        return ("- Spread: one seed, so every number is a single run with no spread, and no difference below can be "
                "told apart from seed-to-seed noise (`--seeds N` repeats each β).")
    return (f"- Spread: every number is the mean ± the sample standard deviation over {seeds} seeds; a difference "
            "between two β *exceeds the spread* when |difference of the means| > the sum of the two standard "
            "deviations, else it is *within the spread*.")


def _comparison(s: dict, s0: dict, b: str, b0: str, names: tuple[str, ...]) -> list[str]:
    """The sentences comparing β=b's summary ``s`` with the base β=b0's ``s0``."""
    au = 0 if s["seeds"] == 1 else 1
    lines = [
        f"- Reconstruction: β={b}'s excess over the data's floor is {_ratio(s['excess'], s0['excess'])} that of "
        f"β={b0} ({fmt(s['excess'], 1)} vs {fmt(s0['excess'], 1)} nats per image{_verdict(s['excess'], s0['excess'])};"
        f" loss {fmt(s['recon'], 1)} vs {fmt(s0['recon'], 1)}, {_ratio(s['recon'], s0['recon'])}, of which the "
        f"floor is {fmt(s['floor'], 1)} vs {fmt(s0['floor'], 1)}). Its pixel MSE of the decoded mean is "
        f"{_ratio(s['mse'], s0['mse'])} β={b0}'s ({fmt(s['mse'], 5)} vs {fmt(s0['mse'], 5)}"
        f"{_verdict(s['mse'], s0['mse'])}).",
        f"- KL: β={b} has {_ratio(s['kl'], s0['kl'])} the KL of β={b0} ({fmt(s['kl'], 1)} vs {fmt(s0['kl'], 1)} "
        f"nats per image{_verdict(s['kl'], s0['kl'])}).",
        f"- Active units: β={b} uses {fmt(s['active_units'], au)} of {s['latent_dim']} latent dimensions, β={b0} "
        f"{fmt(s0['active_units'], au)} of {s0['latent_dim']}{_verdict(s['active_units'], s0['active_units'])}.",
    ]
    smooth, smooth0 = s["smoothness"][0], s0["smoothness"][0]
    smoother = "smoother" if smooth < smooth0 else "less smooth" if smooth > smooth0 else "equally smooth"
    lines.append(f"- Interpolation: β={b}'s paths are {smoother} than β={b0}'s (smoothness {fmt(s['smoothness'], 4)}"
                 f" vs {fmt(s0['smoothness'], 4)}, lower = smoother; {_ratio(s['smoothness'], s0['smoothness'])}"
                 f"{_verdict(s['smoothness'], s0['smoothness'])}).")
    if s["mig"] is not None and s0["mig"] is not None:
        mig, mig0 = s["mig"][0], s0["mig"][0]
        direction = "higher" if mig > mig0 else "lower" if mig < mig0 else "the same"
        lines.append(f"- Disentanglement: β={b}'s MIG against the {len(names)} known factors ({', '.join(names)}) is "
                     f"{direction}: {fmt(s['mig'], 3)} vs {fmt(s0['mig'], 3)}{_verdict(s['mig'], s0['mig'])} "
                     "(0 = entangled, 1 = each factor in one latent dimension).")
        per_factor = [f"{name} {fmt(s['top'][k], 2)} vs {fmt(s0['top'][k], 2)}"
                      f"{_verdict(s['top'][k], s0['top'][k], ', ')}" for k, name in enumerate(names)]
        lines.append(f"- Factors: the normalised MI I(z; v) / H(v) of each factor's top latent, β={b} vs β={b0}: "
                     + "; ".join(per_factor) + ".")
    return lines


def _unlearned(summaries: dict[float, dict], names: tuple[str, ...]) -> str:
    """The sentence naming, per β, the factors that no latent carries (by :data:`CARRIED_MARGIN`)."""
    rule = f"the top normalised MI is less than {CARRIED_MARGIN:g} above the chance level"
    missing = []
    for beta, s in summaries.items():
        lost = [f"{name} (top {fmt(s['top'][k], 2)}, chance {fmt(s['chance'][k], 2)})"
                for k, name in enumerate(names) if not carried(s, k)]
        if lost:
            missing.append(f"at β={beta_name(beta)} no latent carries " + ", ".join(lost))
    if not missing:
        return f"- Every factor is carried by some latent at every β (no factor where {rule})."
    return f"- Factors no latent carries ({rule}): " + "; ".join(missing) + "."


def findings(metrics: dict[float, list[dict]], factor_names: tuple[str, ...]) -> list[str]:
    """The report's sentences, each β against the smallest one, computed from ``metrics`` (β → one
    :func:`genfast.compare_beta.evaluate` dict per seed, with ``seconds``): the spread rule first, then per β the
    comparisons (each difference judged against the spread), then the factors no latent carries."""
    summaries = _summaries(metrics)
    betas = list(summaries)
    s0, b0 = summaries[betas[0]], beta_name(betas[0])
    lines = [_spread_rule(s0["seeds"])]
    for beta in betas[1:]:
        lines += _comparison(summaries[beta], s0, beta_name(beta), b0, factor_names)
    if "top" in s0:
        lines.append(_unlearned(summaries, factor_names))
    return lines


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def metric_table(metrics: dict[float, list[dict]]) -> list[str]:
    """One row per β: reconstruction loss, its floor and excess (and the excess ÷ the smallest β's), KL, pixel MSE,
    active units, interpolation smoothness, MIG (where known) and training time, each mean ± spread."""
    summaries = _summaries(metrics)
    s0 = next(iter(summaries.values()))
    has_mig = any(s["mig"] is not None for s in summaries.values())
    head = ["β", "recon (nats/image)", "floor", "excess over floor", f"excess ÷ β={beta_name(min(metrics))}'s",
            "KL (nats/image)", "pixel MSE", "active units", "interp. smoothness"] + ["MIG"] * has_mig
    lines = [_row(head + ["train time (s)"]), "|" + " --- |" * (len(head) + 1)]
    for beta, s in summaries.items():
        row = [beta_name(beta), fmt(s["recon"], 2), fmt(s["floor"], 2), fmt(s["excess"], 2),
               _ratio(s["excess"], s0["excess"]), fmt(s["kl"], 2), fmt(s["mse"], 5),
               f"{fmt(s['active_units'], 0 if s['seeds'] == 1 else 1)} / {s['latent_dim']}", fmt(s["smoothness"], 4)]
        row += [fmt(s["mig"], 3) if s["mig"] is not None else "–"] * has_mig
        lines.append(_row(row + [fmt(s["seconds"], 0)]))
    return lines


def factor_table(metrics: dict[float, list[dict]], names: tuple[str, ...]) -> list[str]:
    """Per β and factor: the top latent of each seed, its normalised MI, the gap to the second latent, the chance
    level and whether some latent carries the factor (empty without factors)."""
    summaries = _summaries(metrics)
    if "top" not in next(iter(summaries.values())):
        return []
    lines = [_row(["β", "factor", "top latent (per seed)", "top MI / H(v)", "gap to 2nd", "chance level",
                   "carried"]), "|" + " --- |" * 7]
    for beta, s in summaries.items():
        for k, name in enumerate(names):
            lines.append(_row([beta_name(beta), name, ", ".join(f"z{d}" for d in s["latent"][k]), fmt(s["top"][k], 3),
                               fmt(s["gap"][k], 3), fmt(s["chance"][k], 3), "yes" if carried(s, k) else "no"]))
    return lines


def mi_matrix(factor_mi: torch.Tensor, names: tuple[str, ...]) -> list[str]:
    """The normalised MI matrix of one run, factors × the latents that rank first or second for some factor."""
    ranked = factor_mi.topk(min(2, factor_mi.shape[1]), dim=1).indices
    columns = sorted(set(ranked.flatten().tolist()))
    lines = [_row(["factor"] + [f"z{d}" for d in columns]), "|" + " --- |" * (len(columns) + 1)]
    for k, name in enumerate(names):
        lines.append(_row([name] + [f"{float(factor_mi[k, d]):.2f}" for d in columns]))
    return lines
