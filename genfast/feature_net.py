"""The feature space of genfast's sample-quality metrics: a small CNN that genfast trains itself, on its built-in
procedural faces, to predict their five known factors (lighting, rotation, smile, face_shape, hue). Nothing is
downloaded: the network is trained once per setting and cached on disk under a hash of its settings.

Any image (N, C, S, S) in [0, 1] is brought to ``input_size`` (area averaging, bilinear for other ratios) and to RGB
(a grey image is repeated over the three channels), so one network serves every image size and data set. On the
faces its features describe what varies in the data; for other data sets they are a generic shading, edge and colour
description learned from cartoon faces (see README "Sample quality")."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .data import FACE_FACTORS, make_faces

CACHE_ENV = "GENFAST_CACHE_DIR"
ACCURACY_TOLERANCE = 0.1  # a predicted factor counts as right within ±0.1 of the true one (factors are in [0, 1])


@dataclass(frozen=True, kw_only=True)
class FeatureNetSettings:
    """How the feature network is built and trained; :meth:`digest` (a hash of all of it) names its cache file.

    ``num_faces`` training faces (half rendered at ``input_size``, half at 2·input_size and area-averaged down, so
    that both renderings look familiar), ``holdout`` more for the held-out accuracy, ``epochs`` of Adam (``lr``,
    cosine decay) on the mean squared error of the five factors, batch ``batch_size``, from ``seed``. Channels
    ``width``·(1, 2, 4, 4) down to 4×4, global average pooling, then a ``feature_dim`` SiLU layer: the features.
    Bump ``version`` when the code that trains the network changes."""

    input_size: int = 32
    num_faces: int = 8192
    holdout: int = 1024
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16
    feature_dim: int = 64
    seed: int = 1234
    version: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """sha256 of the settings as sorted JSON, first 16 hex digits."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_SETTINGS = FeatureNetSettings()


class FeatureNet(nn.Module):
    """images (N, 1 or 3, S, S) in [0, 1] → features (N, feature_dim) (``forward``) and predicted factors (N, 5)
    (:meth:`predict_factors`). The features are the embedding e standardised with the mean and standard deviation
    of e over the training faces, (e − m)/s, so that distances are in units of the faces' own spread. Plain torch
    layers only: the metrics do not depend on genfast's backends."""

    def __init__(self, settings: FeatureNetSettings | None = None):
        settings = settings or DEFAULT_SETTINGS
        super().__init__()
        self.settings = settings
        self.num_features = settings.feature_dim  # read by torchmetrics
        w, layers, channels, size = settings.width, [], 3, settings.input_size
        for out in (w, 2 * w, 4 * w, 4 * w):
            stride = 1 if not layers else 2
            layers += [nn.Conv2d(channels, out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, out), out),
                       nn.SiLU()]
            channels, size = out, size // stride
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(channels, settings.feature_dim)
        self.head = nn.Linear(settings.feature_dim, len(FACE_FACTORS))
        self.register_buffer("feature_mean", torch.zeros(settings.feature_dim))
        self.register_buffer("feature_std", torch.ones(settings.feature_dim))

    def prepare(self, images: Tensor) -> Tensor:
        """``images`` at input_size, RGB, centred: 2·x − 1."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError("images must be a tensor (N, C, H, W) with C = 1 or 3, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        x = images.float()
        size = self.settings.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            whole = x.shape[-1] % size == 0 and x.shape[-2] == x.shape[-1]
            x = F.adaptive_avg_pool2d(x, size) if whole else F.interpolate(x, size=(size, size), mode="bilinear",
                                                                          antialias=True, align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x * 2 - 1

    def embedding(self, images: Tensor) -> Tensor:
        """e = SiLU(Linear(mean over positions of the conv trunk)), (N, feature_dim)."""
        h = self.trunk(self.prepare(images).contiguous())
        return F.silu(self.embed(h.mean(dim=(2, 3))))

    def forward(self, images: Tensor) -> Tensor:
        return (self.embedding(images) - self.feature_mean) / self.feature_std

    def predict_factors(self, images: Tensor) -> Tensor:
        """The five factors (N, 5) the network predicts, in the order of :data:`genfast.data.FACE_FACTORS`."""
        return self.head(self.embedding(images))

    def factors_of_features(self, features: Tensor) -> Tensor:
        """:meth:`predict_factors` from the output of ``forward``."""
        return self.head(features * self.feature_std + self.feature_mean)


def cache_dir() -> Path:
    """``$GENFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/genfast``, else ``~/.cache/genfast``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genfast"


def weights_digest(net: nn.Module) -> str:
    """sha256 of the network's parameters and buffers (name, dtype, shape and bytes), first 16 hex digits: equal
    digests mean equal weights, so the metrics of two machines are comparable."""
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_feature_net(settings: FeatureNetSettings | None = None, *, cache: str | os.PathLike | None = None,
                     quiet: bool = False) -> tuple[FeatureNet, dict]:
    """(the feature network of ``settings`` (default :data:`DEFAULT_SETTINGS`) in eval mode on the CPU, its record:
    settings, ``settings_hash``, ``weights_hash``, ``heldout`` accuracy, training seconds). Read from ``cache``
    (default :func:`cache_dir`)/feature-net-<digest>.pt, else trained on the CPU (a message on stderr unless
    ``quiet``) and written there."""
    settings = settings or DEFAULT_SETTINGS
    path = Path(cache if cache is not None else cache_dir()) / f"feature-net-{settings.digest()}.pt"
    with torch.random.fork_rng(devices=[]):  # the initial weights come from the settings' seed, and building
        torch.random.default_generator.manual_seed(settings.seed)  # the network leaves the caller's stream alone
        net = FeatureNet(settings)
    if path.is_file():
        saved = load_checkpoint(path, keys=("settings", "state", "heldout"))
        if saved["settings"] != settings.to_dict():
            raise ValueError(f"{path} holds a feature network of other settings than its name says; remove it")
        net.load_state_dict(saved["state"])
        record = {k: saved[k] for k in ("settings", "heldout", "seconds")}
    else:
        if not quiet:
            print(f"genfast: training the feature network for the sample-quality metrics once "
                  f"({settings.num_faces} faces, {settings.epochs} epochs; cached in {path})", file=sys.stderr)
        started = time.perf_counter()
        heldout = train_feature_net(net, settings)
        record = dict(settings=settings.to_dict(), heldout=heldout, seconds=time.perf_counter() - started)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(dict(record, state=net.state_dict()), path)
        if not quiet:
            print(f"genfast: feature network trained in {record['seconds']:.0f} s; held-out "
                  f"{describe_accuracy(heldout)}", file=sys.stderr)
    record.update(settings_hash=settings.digest(), weights_hash=weights_digest(net))
    return net.eval().requires_grad_(False), record


def describe_accuracy(heldout: dict) -> str:
    """One line: the held-out R² of each factor and the fraction of predictions within the tolerance."""
    r2 = ", ".join(f"{name} {value:.3f}" for name, value in heldout["r2"].items())
    return f"R² {r2}; within ±{ACCURACY_TOLERANCE:g}: {heldout['accuracy']:.3f}"


def _faces(n: int, seed: int, size: int) -> tuple[Tensor, Tensor]:
    """``n`` faces at ``size``: the first half rendered at size, the rest at 2·size and area-averaged down."""
    small = n // 2
    a, fa, _ = make_faces(small, seed=seed, image_size=size)
    b, fb, _ = make_faces(n - small, seed=seed + 1, image_size=2 * size)
    return torch.cat([a, F.avg_pool2d(b, 2)]), torch.cat([fa, fb])


def train_feature_net(net: FeatureNet, settings: FeatureNetSettings) -> dict:
    """Train ``net`` on faces to regress their factors (MSE, Adam, cosine-decayed lr), set its feature
    standardisation from the training faces, and return its held-out
    accuracy on ``holdout`` other faces: per-factor R² = 1 − Σ(ŷ − y)²/Σ(y − ȳ)², mean absolute error, and the
    fraction of predictions within ±:data:`ACCURACY_TOLERANCE`."""
    images, factors = _faces(settings.num_faces, settings.seed, settings.input_size)
    steps_per_epoch = max(1, settings.num_faces // settings.batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps_per_epoch * settings.epochs)
    order = torch.Generator().manual_seed(settings.seed)
    net.train()
    for _ in range(settings.epochs):
        permutation = torch.randperm(len(images), generator=order)
        for i in range(steps_per_epoch):
            batch = permutation[i * settings.batch_size:(i + 1) * settings.batch_size]
            loss = F.mse_loss(net.predict_factors(images[batch]), factors[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        embedded = torch.cat([net.embedding(chunk) for chunk in images.split(256)])
        net.feature_mean.copy_(embedded.mean(0))
        net.feature_std.copy_(embedded.std(0).clamp_min(1e-6))
    test_images, test_factors = _faces(settings.holdout, settings.seed + 2, settings.input_size)
    with torch.no_grad():
        predicted = torch.cat([net.predict_factors(chunk) for chunk in test_images.split(256)])
    return factor_accuracy(predicted, test_factors)


def factor_accuracy(predicted: Tensor, true: Tensor) -> dict:
    """{"r2": {factor: R²}, "mae": {factor: mean |ŷ − y|}, "accuracy": mean over factors and images of
    [|ŷ − y| ≤ tolerance]} for predictions and true factors (N, 5)."""
    error = (predicted.double() - true.double())
    variance = ((true.double() - true.double().mean(0)) ** 2).sum(0).clamp_min(1e-12)
    r2 = 1 - (error ** 2).sum(0) / variance
    mae = error.abs().mean(0)
    return dict(r2={n: float(v) for n, v in zip(FACE_FACTORS, r2)},
                mae={n: float(v) for n, v in zip(FACE_FACTORS, mae)},
                accuracy=float((error.abs() <= ACCURACY_TOLERANCE).double().mean()))
