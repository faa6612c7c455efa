"""Sample quality in the feature space of :mod:`genfast.feature_net`: FID and KID (torchmetrics), precision and
recall (Kynkäänniemi et al. 2019) and, for the faces, how the samples' predicted factors are spread compared with
the data's. :class:`Evaluator` holds a reference set; :func:`evaluate_checkpoint` is ``genfast eval``."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import atomic_write
from .data import FACE_FACTORS, make_faces
from .feature_net import FeatureNet, load_feature_net

REFERENCE_SEED = 2_718_281  # the faces of the reference set: not the training faces (those come from --seed)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
QUANTILES = 101  # grid of the 1-D Wasserstein distance between predicted-factor distributions


def knn_radii(features: Tensor, k: int, *, chunk: int = 1024) -> Tensor:
    """r_i = ‖φ_i − NN_k(φ_i)‖₂, the distance of each row of ``features`` (N, D) to its k-th nearest other row."""
    radii = [torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(chunk)]
    return torch.cat(radii)


def manifold_coverage(points: Tensor, support: Tensor, radii: Tensor, *, chunk: int = 1024) -> float:
    """The fraction of ``points`` inside the k-NN manifold of ``support``: mean over p of
    [∃ j: ‖p − s_j‖₂ ≤ r_j] (Kynkäänniemi et al. 2019, eq. 1–2)."""
    inside = [(torch.cdist(rows, support) <= radii[None]).any(dim=1) for rows in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features ``fake`` (M, D) against ``real``
    (N, D): precision = the fraction of fake samples inside the real manifold (quality), recall = the fraction of
    real samples inside the fake manifold (diversity); a manifold is the union of balls around its points with
    radius the distance to the k-th nearest neighbour (default k = 3). Both sets need more than k points."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, x in (("real", real), ("fake", fake)):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] <= k:
            raise ValueError(f"{name} must be features (N, D) with N > k = {k}, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    real, fake = real.double(), fake.double()
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def factor_spread(data: Tensor, samples: Tensor, names=FACE_FACTORS) -> dict:
    """Per factor: the mean and standard deviation of the predicted factor over the data and over the samples, and
    the 1-D Wasserstein distance W₁ = ∫₀¹ |F⁻¹(u) − G⁻¹(u)| du between the two (on 101 quantiles)."""
    u = torch.linspace(0, 1, QUANTILES, dtype=torch.float64)
    spread = {}
    for i, name in enumerate(names):
        a, b = data[:, i].double().cpu(), samples[:, i].double().cpu()
        w1 = (torch.quantile(a, u) - torch.quantile(b, u)).abs().mean()
        spread[name] = dict(data_mean=float(a.mean()), data_std=float(a.std()), samples_mean=float(b.mean()),
                            samples_std=float(b.std()), wasserstein=float(w1))
    return spread


def kid_subset_size(num_reference: int, num_samples: int) -> int:
    """min(1000, ⌊min(N, M)/2⌋, at least 2): KID averages the unbiased MMD² over random subsets of this size; at
    most half of the smaller set, so that the subsets differ and their standard deviation says something."""
    return max(2, min(KID_SUBSET_SIZE, min(num_reference, num_samples) // 2))


class _Float64(nn.Module):
    """The feature network with float64 output, so that torchmetrics returns FID and KID in float64."""

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net, self.num_features = net, net.num_features

    def forward(self, images):
        return self.net(images).double()


class Evaluator:
    """FID, KID, precision/recall (and with ``faces`` the predicted-factor spread) of sample sets against the
    ``reference`` images (N, C, S, S) in [0, 1], whose features are computed once.

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½) and KID = the unbiased MMD² with the kernel
    k(x, y) = (xᵀy/d + 1)³ averaged over 100 random subsets (:func:`kid_subset_size`; the standard deviation over
    them in ``kid_std``), both by torchmetrics with the feature network as the feature extractor; precision and
    recall with k-NN manifolds (:func:`precision_recall`).

    Args (keyword-only): net and record (:func:`genfast.feature_net.load_feature_net`; default: the default
    network, loaded or trained), k (default 3), faces (default False), batch_size (default 256), device (default
    the CPU), seed (of the KID subsets, default 0)."""

    def __init__(self, reference: Tensor, *, net: FeatureNet | None = None, record: dict | None = None, k: int = 3,
                 faces: bool = False, batch_size: int = 256, device="cpu", seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        if net is None:
            net, record = load_feature_net()
        if reference.shape[0] <= k:
            raise ValueError(f"the reference set needs more than k = {k} images, got {reference.shape[0]}")
        self.device, self.k, self.faces, self.batch_size, self.seed = torch.device(device), k, faces, batch_size, seed
        self.net, self.record = net.to(self.device).eval(), record
        features = _Float64(self.net)
        common = dict(feature=features, reset_real_features=False, sync_on_compute=False)
        with warnings.catch_warnings():  # KID's note that it keeps every feature in memory
            warnings.simplefilter("ignore", UserWarning)
            self.fid = FrechetInceptionDistance(**common).to(self.device)
            self.kid = KernelInceptionDistance(subsets=KID_SUBSETS, subset_size=2, **common).to(self.device)
        self.num_reference = reference.shape[0]
        self.real_features, self.real_factors = self._update(reference, real=True)

    @torch.no_grad()
    def _update(self, images: Tensor, *, real: bool) -> tuple[Tensor, Tensor]:
        """Feed ``images`` to FID and KID; their features and predicted factors."""
        features, factors = [], []
        for chunk in images.split(self.batch_size):
            chunk = chunk.to(self.device, torch.float32)
            self.fid.update(chunk, real=real)
            self.kid.update(chunk, real=real)
            h = self.net(chunk)
            features.append(h.double())
            factors.append(self.net.factors_of_features(h).double())
        return torch.cat(features), torch.cat(factors)

    def __call__(self, samples: Tensor) -> dict:
        """{fid, kid, kid_std, precision, recall, k, num_samples, num_reference, factors (faces only, else
        None)} of ``samples`` (M, C, S, S) in [0, 1], M > k."""
        if samples.shape[0] <= self.k:
            raise ValueError(f"need more than k = {self.k} samples, got {samples.shape[0]}")
        self.fid.reset()
        self.kid.reset()
        features, factors = self._update(samples, real=False)
        self.kid.subset_size = kid_subset_size(self.num_reference, samples.shape[0])
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.random.default_generator.manual_seed(self.seed)  # KID's subsets (CPU randperm): repeatable
            fid = float(self.fid.compute())
            kid, kid_std = (float(v) for v in self.kid.compute())
        precision, recall = precision_recall(self.real_features, features, k=self.k)
        return dict(fid=fid, kid=kid, kid_std=kid_std, precision=precision, recall=recall, k=self.k,
                    num_samples=samples.shape[0], num_reference=self.num_reference,
                    factors=factor_spread(self.real_factors, factors) if self.faces else None)


def reference_images(config, num: int, *, dataset=None, eval_indices=(), train_indices=()) -> tuple[Tensor, str]:
    """(the real images a run's samples are compared with, in [0, 1]; how they were chosen). faces: ``num`` fresh
    faces from seed :data:`REFERENCE_SEED` (the data distribution, not the training faces); other data sets: the
    first ``num`` held-out images, or training images when the run held none out."""
    if config.dataset == "faces":
        images = make_faces(num, seed=REFERENCE_SEED, image_size=config.image_size)[0]
        return images, f"{num} faces generated with seed {REFERENCE_SEED} (not the training faces)"
    indices, which = (eval_indices, "held-out") if eval_indices else (train_indices, "training")
    indices = list(indices)[:num]
    images = torch.stack([dataset[i] for i in indices])
    return images, f"{len(indices)} {which} images of {config.dataset}"


def write_eval(result: dict, out: Path) -> Path:
    """``out``/eval.json (indented, keys in order)."""
    path = Path(out) / "eval.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    return path


def format_table(result: dict) -> str:
    """The metrics of :meth:`Evaluator.__call__` (plus the run's fields) as a plain-text table."""
    lines = [f"{'metric':<22}{'value':>12}",
             f"{'FID':<22}{result['fid']:>12.4f}",
             f"{'KID':<22}{result['kid']:>12.5f}  ± {result['kid_std']:.5f}",
             f"{'precision (k=' + str(result['k']) + ')':<22}{result['precision']:>12.4f}",
             f"{'recall (k=' + str(result['k']) + ')':<22}{result['recall']:>12.4f}",
             f"{'samples / reference':<22}{result['num_samples']:>7} / {result['num_reference']}"]
    net = result.get("feature_net")
    if net:
        lines.append(f"{'feature network':<22}{net['settings_hash']:>12}  (weights {net['weights_hash']})")
    if result.get("factors"):
        lines += ["", f"{'factor':<12}{'data mean':>10}{'data std':>10}{'samp mean':>10}{'samp std':>10}"
                      f"{'W1':>8}"]
        for name, s in result["factors"].items():
            lines.append(f"{name:<12}{s['data_mean']:>10.3f}{s['data_std']:>10.3f}{s['samples_mean']:>10.3f}"
                         f"{s['samples_std']:>10.3f}{s['wasserstein']:>8.3f}")
    return "\n".join(lines)


def _restore(path, *, device, backend, data_dir, batch_size, sampling=None):
    """(config, task with the checkpoint's weights and EMA, step) of a training checkpoint, with the x̂₀ settings
    ``sampling`` (``--clip-sample`` ...) replacing the run's; one-line :class:`UsageError` for every problem."""
    import dataclasses

    from .checkpoint import load_checkpoint
    from .training import RunConfig, UsageError
    from .training.config import LEGACY
    from .training.distributed import World, resolve_device
    from .training.tasks import TASKS

    try:
        saved = load_checkpoint(path, keys=("config", "channels", "task", "step"))
        config = RunConfig(**{**LEGACY, **saved["config"]})
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(f"--checkpoint: {str(exc).strip().splitlines()[0]}") from None
    overrides = dict(backend=backend, device=device, compile=None, quiet=True, given=())
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if sampling:
        if config.model != "ddpm":
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in sampling)
            raise UsageError(f"{flags}: the x̂₀ settings apply to pixel-space ddpm checkpoints, this is a "
                             f"{config.model} checkpoint")
        overrides.update(sampling)
    config = dataclasses.replace(config, **overrides)
    try:
        config._check_diffusion_settings()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    torch_device = resolve_device(device, World())
    reason = config.backend_reason(torch_device)
    if reason is not None:
        raise UsageError(f"--backend {backend} is not available on {torch_device}: {reason}")
    try:
        task = TASKS[config.model](config, channels=saved["channels"], device=torch_device, world=World())
        task.load_state_dict(saved["task"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # RuntimeError: load_state_dict mismatches
        raise UsageError(f"--checkpoint: {str(exc).strip().splitlines()[0]}") from None
    return config, task, saved["step"], torch_device


def _reference_for(config, num: int):
    """:func:`reference_images` of a restored run (its data set reloaded, split as in training)."""
    if config.dataset == "faces":
        return reference_images(config, num)
    from .training.loop import load_data, split_indices

    dataset = load_data(config)
    train_indices, eval_indices = split_indices(len(dataset), config.holdout, config.seed)
    return reference_images(config, num, dataset=dataset, eval_indices=eval_indices, train_indices=train_indices)


def evaluate_checkpoint(checkpoint, *, out, num: int = 1000, k: int = 3, seed: int = 0, batch_size=None,
                        data_dir=None, device: str = "auto", backend: str = "auto", quiet: bool = False,
                        sampling: dict | None = None) -> dict:
    """``genfast eval``: ``num`` samples of the checkpoint's (averaged) model, drawn with ``seed`` in fp32, against
    ``num`` reference images (:func:`reference_images`); writes ``out``/eval.json (the returned dict) and
    ``out``/samples.png (the first 64 samples). Defaults: num 1000, k 3, seed 0, the run's batch size and data
    folder, device and backend auto. ``sampling``: x̂₀ settings of a ddpm checkpoint's sampler steps
    (``clip_sample``, ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``) replacing the run's
    (by default clipped to [-1, 1]); recorded in eval.json's ``run``."""
    import time

    import genfast
    from .plots import save_image_grid
    from .training import UsageError
    from .training.tasks import grid_columns

    if not str(out).strip():
        raise UsageError("--out must name a folder, got ''")
    started = time.perf_counter()
    config, task, step, torch_device = _restore(checkpoint, device=device, backend=backend, data_dir=data_dir,
                                                batch_size=batch_size, sampling=sampling)
    reference, described = _reference_for(config, num)
    if reference.shape[0] <= k:
        raise UsageError(f"--k {k}: the reference set has only {reference.shape[0]} images ({described})")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    net, record = load_feature_net(quiet=quiet)
    task.train(False)
    with genfast.use_backend(backend), torch.no_grad():
        samples = task.sample(num, generator=torch.Generator(torch_device).manual_seed(seed))
    evaluator = Evaluator(reference, net=net, record=record, k=k, faces=config.dataset == "faces",
                          batch_size=max(config.batch_size, 64), device=torch_device, seed=seed)
    run = dict(model=config.model, dataset=config.dataset, image_size=config.image_size, step=step,
               ema=config.ema, training_precision=config.precision)
    if config.model in ("ddpm", "ldm"):
        run.update(prediction_type=config.prediction_type, sampling=config.sampling)
    result = dict(checkpoint=str(checkpoint), run=run, reference=described, seed=seed, **evaluator(samples),
                  feature_net=dict(settings_hash=record["settings_hash"], weights_hash=record["weights_hash"],
                                   settings=record["settings"], heldout=record["heldout"]),
                  seconds=time.perf_counter() - started)
    shown = samples[:64]
    save_image_grid(shown, out / "samples.png", nrow=grid_columns(len(shown)), scale=2)
    write_eval(result, out)
    return result
