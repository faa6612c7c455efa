"""The report of ``genfast compare-families`` (:mod:`genfast.compare_families`): report.md with the measured table,
the textbook comparison and sentences computed from the numbers, families.json, samples.png and traversals.png."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .compare_families import CONTROL_RANDOM, CONTROL_STARTS, GRID_SAMPLES, SPEED_NUM
from .plots import save_image_grid

# ------------------------------------------------------------------------------------------------------- report
CLAIMS = {  # the textbook comparison that the measurement is held against (not measured)
    "vae": ("medium", "high", "fast", "good control in z"),
    "wgan": ("high", "low (mode collapse)", "fast", "hard to control"),
    "ddpm": ("best", "high", "slow", "very good control"),
    "ldm": ("best (as diffusion)", "high", "~8× faster than pixel diffusion (Rombach et al. 2022: ~8× compression)",
            "very good control"),
}
SHARED_LOAD = 1.0  # a 1-minute load average at the start from which the CPU counts as shared with other work
OFF_MANIFOLD = 0.1  # precision below which a model's samples are called "not yet faces"
NAMES = {"vae": "VAE", "wgan": "WGAN-GP", "ddpm": "DDPM (pixels)", "ldm": "LDM (latent DDPM)"}


def _f(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _main_control(r: dict) -> dict | None:
    return r["control"][0] if r["control"] else None


def measured_table(results: dict, meta: dict) -> list[str]:
    head = ["model", "FID ↓", "KID ↓", "precision ↑", "recall ↑", "pairwise feature dist.", "images/s", "ms/image",
            "train s", "train steps"]
    if meta["faces"]:
        head += ["control ↑", "cleanliness ↑", "response"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model, r in results.items():
        q, sp, t = r["quality"], r["speed"], r["training"]
        row = [NAMES[model], _f(q["fid"], 2), f"{q['kid']:.4f} ± {q['kid_std']:.4f}", _f(q["precision"]),
               _f(q["recall"]), _f(r["pairwise_distance"], 2), f"{sp['images_per_s']:.1f}",
               f"{sp['ms_per_image']:.2f}", f"{t['seconds']:.0f}", "+".join(str(s["steps"]) for s in t["stages"])]
        if meta["faces"]:
            c = _main_control(r)
            row += [_f(c["control"]), _f(c["cleanliness"]), _f(c["response"])]
        lines.append("| " + " | ".join(row) + " |")
    real = ["real faces" if meta["faces"] else "real images", "–", "–", "–", "–",
            _f(meta["real_pairwise_distance"], 2), "–", "–", "–", "–"] + (["–"] * 3 if meta["faces"] else [])
    lines.append("| " + " | ".join(real) + " |")
    return lines


def control_table(results: dict) -> list[str]:
    from .data import FACE_FACTORS

    head = ["latent", "dims", "control", "cleanliness", "response"] + [f"{f} (clean / resp.)" for f in FACE_FACTORS]
    head += ["random dirs: strength", "random dirs: cleanliness"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results.values():
        for c in r["control"]:
            row = [c["latent"], str(c["dims"]), _f(c["control"]), _f(c["cleanliness"]), _f(c["response"])]
            row += [f"{c['per_factor'][f]['cleanliness']:.2f} / {c['per_factor'][f]['response']:+.3f}"
                    for f in FACE_FACTORS]
            row += [_f(c["random_strength"]), _f(c["random_cleanliness"])]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _verdict(ok: bool) -> str:
    return "agrees" if ok else "does not agree"


def findings(results: dict, meta: dict) -> list[str]:
    """The textbook claims, point by point, against the measured numbers (each sentence from ``results``)."""
    r, lines = results, []
    fid = {m: x["quality"]["fid"] for m, x in r.items()}
    recall = {m: x["quality"]["recall"] for m, x in r.items()}
    ms = {m: x["speed"]["ms_per_image"] for m, x in r.items()}
    n = lambda m: NAMES[m]  # noqa: E731
    ranked = sorted(fid, key=fid.get)
    lines.append("- **Quality ranking (FID, lower is better):** " + " < ".join(f"{n(m)} {fid[m]:.2f}" for m in ranked)
                 + ".")
    diffusion = [m for m in ("ddpm", "ldm") if m in r]
    others = [m for m in ("vae", "wgan") if m in r]
    if diffusion and others:
        best_d, best_o = min(diffusion, key=fid.get), min(others, key=fid.get)
        lines.append(f"- *Diffusion — best quality*: best diffusion FID {n(best_d)} {fid[best_d]:.2f} "
                     f"{'<' if fid[best_d] < fid[best_o] else '≥'} best of VAE/GAN {n(best_o)} {fid[best_o]:.2f}: "
                     f"{_verdict(fid[best_d] < fid[best_o])}.")
    if "vae" in r and "wgan" in r:
        ok = fid["wgan"] < fid["vae"]
        lines.append(f"- *GAN high quality, VAE medium*: GAN FID {fid['wgan']:.2f} {'<' if ok else '≥'} VAE "
                     f"{fid['vae']:.2f} (precision {r['wgan']['quality']['precision']:.2f} vs "
                     f"{r['vae']['quality']['precision']:.2f}): {_verdict(ok)}.")
    if "wgan" in r and len(r) > 1:
        rest = [m for m in r if m != "wgan"]
        lower = [m for m in rest if recall["wgan"] < recall[m]]
        ratio = r["wgan"]["pairwise_distance"] / meta["real_pairwise_distance"]
        lines.append(f"- *GAN — low diversity (mode collapse)*: GAN recall {recall['wgan']:.3f} vs "
                     + ", ".join(f"{n(m)} {recall[m]:.3f}" for m in rest)
                     + f"; lower than {len(lower)} of {len(rest)}; its samples' mean pairwise feature distance is "
                     f"{ratio:.2f}× the real images': {_verdict(len(lower) == len(rest))}"
                     + ("" if len(lower) == len(rest) else " (not the least diverse)") + ".")
    for m in [m for m in ("vae", "ddpm", "ldm") if m in r]:
        ratio = r[m]["pairwise_distance"] / meta["real_pairwise_distance"]
        high = [o for o in r if o != m and recall[m] >= recall[o]]
        lines.append(f"- *{n(m)} — high diversity*: recall {recall[m]:.3f} (≥ {len(high)} of the {len(r) - 1} other "
                     f"models), pairwise feature distance {ratio:.2f}× the real images': "
                     f"{_verdict(len(high) >= (len(r) - 1) / 2)}.")
    fast = [m for m in ("vae", "wgan") if m in r]
    for d in diffusion:
        for f in fast:
            lines.append(f"- *{n(f)} fast, diffusion slow*: {n(d)} takes {ms[d] / ms[f]:.0f}× the time per image of "
                         f"the {n(f)} ({ms[d]:.2f} vs {ms[f]:.3f} ms, {meta['settings']['sample_steps']} DDIM steps):"
                         f" {_verdict(ms[d] > ms[f])}.")
    if "ddpm" in r and "ldm" in r:
        speedup = ms["ddpm"] / ms["ldm"]
        c = r["ldm"]["control"][0]["dims"] if r["ldm"]["control"] else None
        pixels = meta["settings"]["image_size"] ** 2 * 3
        comp = f"; the latent has {pixels / c:.0f}× fewer numbers than the image" if c else ""
        steps = meta["settings"]["sample_steps"]
        lines.append(f"- *LDM ~8× faster than pixel diffusion*: at the same image size, U-Net and {steps} DDIM steps "
                     f"the LDM generates {speedup:.1f}× faster than the pixel DDPM "
                     f"({ms['ldm']:.2f} vs {ms['ddpm']:.2f} ms per image, decoding included{comp}): "
                     + ("agrees (≥ 4×)" if speedup >= 4 else "a speed-up, smaller than ~8×" if speedup > 1
                        else "does not agree") + ".")
    for m, x in r.items():
        if x["quality"]["precision"] < OFF_MANIFOLD:
            steps = "+".join(str(st["steps"]) for st in x["training"]["stages"])
            lines.append(f"- **{n(m)}: its samples are not yet faces** — precision {x['quality']['precision']:.3f} "
                         f"(< {OFF_MANIFOLD:g} of its samples inside the real images' manifold) after {steps} steps: "
                         "its diversity and control numbers describe what it draws instead, not control of faces.")
    if meta["faces"]:
        ctl = {m: _main_control(x)["control"] for m, x in r.items()}
        if "vae" in r and "wgan" in r:
            ok = ctl["vae"] > ctl["wgan"]
            lines.append(f"- *VAE good control, GAN hard to control*: control score VAE {ctl['vae']:.3f} "
                         f"{'>' if ok else '≤'} GAN {ctl['wgan']:.3f} (cleanliness "
                         f"{_main_control(r['vae'])['cleanliness']:.2f} vs "
                         f"{_main_control(r['wgan'])['cleanliness']:.2f}): {_verdict(ok)}.")
        for d in diffusion:
            rivals = [m for m in others]
            better = [m for m in rivals if ctl[d] > ctl[m]]
            lines.append(f"- *{n(d)} — very good control* (through its DDIM x_T): control {ctl[d]:.3f} vs "
                         + (", ".join(f"{n(m)} {ctl[m]:.3f}" for m in rivals) or "no VAE/GAN in this run")
                         + (f": {_verdict(len(better) == len(rivals))}." if rivals else "."))
        if "ldm" in r and len(r["ldm"]["control"]) > 1:
            z = r["ldm"]["control"][1]
            lines.append(f"- The LDM's first-stage VAE latent (traversed directly, then decoded): control "
                         f"{z['control']:.3f}, cleanliness {z['cleanliness']:.2f}, response {z['response']:+.3f}.")
        if "ddpm" in r:
            c = _main_control(r["ddpm"])
            lines.append(f"- *Pixel DDPM, what is measurable*: with the deterministic DDIM (eta 0) x_T → image is a "
                         f"function, so the traversal is measurable: x_T has {c['dims']} dimensions of pixel-shaped "
                         f"noise with no learned structure; the found directions move their factor by "
                         f"{c['response']:+.3f} per prior s.d. (cleanliness {c['cleanliness']:.2f}), random ones by "
                         f"{c['random_strength']:.3f} at most (cleanliness {c['random_cleanliness']:.2f}). The "
                         f"textbook's 'very good control' of diffusion means guidance/conditioning, which an "
                         f"unconditional model trained here does not have.")
    else:
        lines.append(f"- Controllability and factor spread: not available on `{meta['settings']['dataset']}` "
                     "(only the built-in faces have known factors and the factor predictor).")
    return lines


def limits(results: dict, meta: dict) -> list[str]:
    s = meta["settings"]
    budget = f"{s['steps']} steps" if s["steps"] else f"{s['seconds']:g} s of training"
    images = next(iter(results.values())).get("train_images", s["num_samples"])
    control = [
        f"- Controllability: {CONTROL_STARTS} starting points × 5 steps per direction, directions found from the "
        f"{s['eval_num']} evaluation samples; with the factor predictor (feature network, held-out R² in the JSON) "
        "as the judge, its errors on poor samples add noise.",
    ] if meta["faces"] else []
    epochs = ", ".join(f"{NAMES[m]} {st['steps'] * s['batch_size'] / images:.1f}"
                       for m, r in results.items() for st in r["training"]["stages"][-1:])
    return [
        f"- Budget: {budget} per model (the LDM's split between its VAE and its latent DDPM). Epochs over the "
        f"{images} training images (last stage): {epochs}. Every model is far from converged; the "
        "ranking can change with longer training — diffusion models in particular need many more steps than a "
        "VAE or a GAN to reach their best quality, so a small equal budget favours the fast learners.",
        f"- Metrics from {s['eval_num']} samples against {meta['reference']}: FID is biased upwards at this size "
        "(compare models only with each other, within one run); KID's ± is the s.d. over its subsets.",
        f"- Networks of width {s['base_channels']}, {s['image_size']}×{s['image_size']} images, "
        f"{s['sample_steps']} DDIM steps: small models and few sampling steps lower the diffusion models' quality.",
        "- Diffusion as diffusers runs it: the pixel DDPM's sampler clips x̂₀ to [-1, 1] in every step, the LDM's "
        "leaves its latents unclipped (as Stable Diffusion); both train with the gradient norm clipped to 1 but "
        "without the recipe's 500-update learning-rate warm-up, which would take up most of these budgets.",
        "- Speeds are wall-clock times on the run's machine (below) and vary with its load; on a shared CPU compare "
        "ratios rather than absolute values. Training seconds include building the data and the model and the "
        "pictures each run writes.",
        *control,
    ]


def _load_text(load) -> str:
    if not load or load.get("start") is None:
        return ""
    shared = (" (other processes shared the CPU: absolute times are slower than on an idle machine)"
              if load["start"] >= SHARED_LOAD else "")
    return f"; 1-minute load average {load['start']:.1f} at the start and {load['end']:.1f} at the end{shared}"


def write_outputs(results: dict, meta: dict, out: Path, *, total_seconds: float) -> Path:
    from .data import FACE_FACTORS

    models = list(results)
    grid = torch.cat([meta["real_grid"].cpu()] + [results[m]["grid"] for m in models])
    save_image_grid(grid, out / "samples.png", nrow=GRID_SAMPLES, scale=3,
                    row_labels=["real"] + [m for m in models])
    rows, labels = [], []
    for m in models:
        for c in results[m]["control"]:
            for f, name in enumerate(FACE_FACTORS):
                rows.append(c["traversals"][f])
                labels.append(f"{c['latent']}: {name}")
    if rows:
        save_image_grid(torch.cat(rows), out / "traversals.png", nrow=rows[0].shape[0], scale=3, row_labels=labels)
    s, mach = meta["settings"], meta["machine"]
    command = "genfast compare-families " + " ".join(shlex.quote(a) for a in meta["command"]) \
        if meta.get("command") is not None else f"genfast compare-families --out {s['out']}"
    budget = f"{s['steps']} steps" if s["steps"] else f"{s['seconds']:g} s"
    lines = [
        "# Families of generative models, measured side by side",
        "",
        f"VAE, WGAN-GP, pixel-space DDPM and latent diffusion trained on `{s['dataset']}` at "
        f"{s['image_size']}×{s['image_size']} ({s['num_samples']} images) with the same budget of {budget} per "
        f"model, batch {s['batch_size']}, seed {s['seed']}. The whole run took {total_seconds / 60:.1f} min.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch threads: {mach['torch_threads']}"
        + (f", GPU {mach['gpu']}" if mach.get("gpu") else "") + f"; torch {mach['torch']}, Python {mach['python']}"
        + _load_text(meta.get("load_average")) + ".",
        "",
        "## Measured",
        "",
        *measured_table(results, meta),
        "",
        "FID/KID/precision/recall: `genfast.evaluation.Evaluator` in the feature space of `genfast.feature_net` "
        "against " + meta["reference"] + ". Pairwise feature distance: mean Euclidean distance between the samples'"
        " (standardised) features, the real images' in the last row. Speed: `task.sample` of "
        f"{SPEED_NUM} images after a warm-up (fastest of up to 5 runs). Training: wall-clock seconds of `train` and "
        "steps reached (LDM: VAE + latent DDPM, both counted).",
        "",
        "## The textbook comparison",
        "",
        "| model | quality | diversity | sampling speed | control |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {NAMES[m]} | " + " | ".join(CLAIMS[m]) + " |" for m in models],
        "",
        "## Where the measurement agrees, and where not",
        "",
        *findings(results, meta),
        "",
        "## What the small budget limits",
        "",
        *limits(results, meta),
        "",
    ]
    if meta["faces"]:
        lines += [
            "## Controllability",
            "",
            "For each latent: per factor f, the *found* direction d_f is the unit vector of the ridge regression of "
            "the factor predictor's output on the latents of the evaluation samples; from "
            f"{CONTROL_STARTS} fresh prior samples z0, the images of z0 + a·d for a in −2…2 (prior s.d.s) are scored "
            "by the factor predictor and each factor's slope against a fitted (averaged over the starts). "
            "**response** = the slope of f along d_f (factor units per s.d.; > 0 = the intended way), "
            "**cleanliness** = |slope of f| / Σ over the 5 factors of |slope| (1 = only f moves, 0.2 = all "
            "equally), **control** = mean over the factors of max(response, 0) × cleanliness. "
            f"Random directions ({CONTROL_RANDOM}): the largest slope and its share. "
            "The DDPM and LDM latents are the DDIM starting noise x_T (eta 0: deterministic); the \"ldm (VAE z)\" "
            "row starts from the LDM's own samples of the scaled first-stage latent, not from N(0, I), so its a "
            "is in units of that unit-variance latent and its row is not comparable with the others.",
            "",
            *control_table(results),
            "",
            "Traversals along the found directions (first start, a = −2 … 2):",
            "",
            "![traversals](traversals.png)",
            "",
        ]
    lines += [
        "## Samples",
        "",
        f"First row real images, then {GRID_SAMPLES} samples per model (seed {s['seed']}):",
        "",
        "![samples](samples.png)",
        "",
        "All numbers are in `families.json`; each model's training folder holds `metrics.csv`, `loss.png` and its "
        "own pictures.",
        "",
    ]
    report = out / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    data = dict(meta, real_grid=None, total_seconds=total_seconds,
                models={m: {k: v for k, v in r.items() if k != "grid"} for m, r in results.items()})
    for r in data["models"].values():
        r["control"] = [{k: v for k, v in c.items() if k != "traversals"} for c in r["control"]]
    data.pop("real_grid")
    atomic_write(out / "families.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))
    return report
