"""Image datasets for the reference models: procedural cartoon faces with known generative factors, and loaders for
local CelebA, image folders, MNIST IDX files and scikit-learn's bundled 8×8 digits. Nothing is ever downloaded.

Every dataset yields float32 images (C, H, W) in [0, 1]. ``faces``, ``mnist`` and ``digits`` are held in memory as
uint8 (20,000 faces at 64×64 take 246 MB); ``celeba`` and ``folder`` keep a list of files, check each file's header
when the dataset is built (files PIL cannot identify are skipped, with one warning that counts them) and decode an
image on ``__getitem__`` (a file whose data turns out damaged, e.g. truncated, is skipped then: the next decodable
file takes its place, with one warning).
"""
from __future__ import annotations

import gzip
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

DATASETS = ("faces", "celeba", "folder", "mnist", "digits")
FACE_FACTORS = ("lighting", "rotation", "smile", "face_shape", "hue")
DEFAULT_NUM_FACES = 20_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CELEBA_CROP = 148  # the usual center crop of the 178×218 aligned CelebA images before resizing
_RENDER_CHUNK = 256  # faces rendered per batch: keeps each float intermediate (1 MB at 64×64) in cache


class ImageDataset(Dataset):
    """Images (C, H, W) float32 in [0, 1], held either as a uint8 tensor (N, C, S, S) (``images``) or as a list of
    image files decoded, center-cropped to a square (or to ``crop``) and resized to S on access (``files``).

    Attributes: ``channels``, ``image_size``, ``factors`` (float (N, K) generative factors in [0, 1], or None) and
    ``factor_names`` (K names, or ())."""

    def __init__(self, *, channels: int, image_size: int, images: Optional[Tensor] = None,
                 files: Optional[Sequence[Path]] = None, crop: Optional[int] = None,
                 factors: Optional[Tensor] = None, factor_names: Sequence[str] = ()):
        if (images is None) == (files is None):
            raise ValueError("ImageDataset needs exactly one of images= (a uint8 tensor) or files=")
        self.channels = channels
        self.image_size = image_size
        self.images = images
        self.files = list(files) if files is not None else None
        self.crop = crop
        self.factors = factors
        self.factor_names = tuple(factor_names)
        self.damaged: list[Path] = []  # files whose data could not be decoded (found on first decode)

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        if self.files is None:
            return self.images[index].float() / 255.0
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            if path in self.damaged:
                continue
            try:
                image = _decode(path, channels=self.channels, image_size=self.image_size, crop=self.crop)
            except (OSError, ValueError, SyntaxError) as error:  # a readable header over bad data (truncated)
                self._skip(path, error)
                continue
            return image.float() / 255.0
        raise OSError(f"none of the {len(self.files)} image files can be decoded "
                      f"(first: {str(self.damaged[0])!r})")

    def _skip(self, path: Path, error: Exception) -> None:
        """Count a damaged file: it and every later one are replaced by the next decodable file (so a run and
        its resume see the same images); one warning, at the first."""
        self.damaged.append(path)
        if len(self.damaged) == 1:
            warnings.warn(f"skipping damaged image file {str(path)!r} ({type(error).__name__}: {error}): each damaged "
                          "file is replaced by the next decodable one; ImageDataset.damaged lists them",
                          stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# faces


def make_faces(n: int, *, seed: int = 0, image_size: int = 64) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """``n`` procedural cartoon faces, RGB float32 (n, 3, image_size, image_size) in [0, 1], with their generative
    factors (n, 5) in [0, 1] named :data:`FACE_FACTORS`, drawn uniformly from a ``torch.Generator`` seeded with
    ``seed`` (the same seed gives the same faces):

    - ``lighting``: light azimuth from the viewer's left (0) to right (1); Lambert shading of the head as an ellipsoid,
    - ``rotation``: head yaw; eyes, pupils, nose, mouth and hair parting shift sideways, the far eye narrows,
    - ``smile``: mouth curvature, from a frown (0) through a straight mouth (0.5) to a smile (1),
    - ``face_shape``: head width relative to its height, from narrow (0) to round (1),
    - ``hue``: skin hue, over the first three quarters of the colour wheel.

    Shapes are signed distances on the pixel grid with anti-aliased edges one pixel wide, rendered in batches."""
    _check_int(n, "n", minimum=0)
    _check_image_size(image_size, minimum=16)
    factors = torch.rand(n, len(FACE_FACTORS), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    images = torch.cat([_render_faces(chunk, image_size) for chunk in factors.split(_RENDER_CHUNK)]) if n else \
        torch.empty(0, 3, image_size, image_size)
    return images, factors, FACE_FACTORS


def _render_faces(factors: Tensor, image_size: int) -> Tensor:
    """Faces (B, 3, S, S) in [0, 1] from factors (B, 5) in [0, 1] (see :func:`make_faces`)."""
    lighting, rotation, smile, shape, hue = (factors[:, i, None, None] for i in range(5))
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2.0 - 1.0
    y, x = coords[None, :, None], coords[None, None, :]  # image coordinates in [-1, 1], y pointing down
    pixel = 2.0 / image_size

    def coverage(sdf: Tensor) -> Tensor:  # anti-aliased inside-ness of a signed distance, edges one pixel wide
        return (0.5 - sdf / pixel).clamp(0.0, 1.0)

    yaw = (rotation - 0.5) * 2.0  # in [-1, 1]
    head_rx, head_ry, head_cy = 0.50 + 0.22 * shape, 0.74, 0.06
    hx, hy = x / head_rx, (y - head_cy) / head_ry  # head-ellipse coordinates
    head_r = _length(hx, hy)
    head = coverage((head_r - 1.0) * torch.minimum(head_rx, torch.full_like(head_rx, head_ry)))

    # Lambert shading of the head as an ellipsoid lit from azimuth a (0 = the viewer), slightly from above
    azimuth = (lighting - 0.5) * 2.4
    light = torch.stack([torch.sin(azimuth), torch.full_like(azimuth, -0.35), torch.cos(azimuth)])
    light = light / light.norm(dim=0, keepdim=True)
    nz = torch.sqrt((1.0 - head_r * head_r).clamp_min(0.0))
    shade = 0.3 + 0.75 * (hx * light[0] + hy * light[1] + nz * light[2]).clamp_min(0.0)

    skin = _hsv_to_rgb(hue * 0.75, 0.45, 0.95)  # (3, B, 1, 1)
    background = torch.tensor([0.20, 0.24, 0.30]).view(3, 1, 1, 1) + 0.12 * (y + 1.0) / 2.0
    image = torch.lerp(background, skin * shade, head)

    # hair: the top of the head above a line whose parting follows the yaw
    hairline = head_cy - 0.42 * head_ry + 0.10 * (x - 0.55 * yaw * head_rx).abs()
    hair = head * coverage(y - hairline)
    hair_colour = torch.tensor([0.25, 0.16, 0.10]).view(3, 1, 1, 1) * (0.6 + 0.5 * shade)
    image = torch.lerp(image, hair_colour, hair)

    # features shift sideways with the yaw; the eye on the far side narrows
    centre = 0.32 * yaw * head_rx
    eye_white, pupil = torch.zeros_like(head_r), torch.zeros_like(head_r)
    for side in (-1.0, 1.0):
        eye_x = centre + side * 0.40 * head_rx * (1.0 - 0.25 * side * yaw)
        eye_rx = 0.11 * (1.0 - 0.35 * (side * yaw).clamp_min(0.0))
        ex, ey = (x - eye_x) / eye_rx, (y + 0.05) / 0.07
        eye_white = torch.maximum(eye_white, coverage((_length(ex, ey) - 1.0) * 0.07))
        px, py = x - eye_x - 0.04 * yaw, y + 0.05
        pupil = torch.maximum(pupil, coverage(_length(px, py) - 0.045))
    image = torch.lerp(torch.lerp(image, torch.tensor(0.95), eye_white), torch.tensor(0.08), pupil)

    nx, ny = x - centre * 1.25, (y - 0.20) / 0.10
    nose = coverage((_length(nx / 0.05, ny) - 1.0) * 0.05) * head
    image = image * (1.0 - 0.25 * nose)

    # mouth: the parabola y = y0 − c·(x − centre)², c from the smile, stroked 0.035 thick over |x − centre| < w
    curvature = (smile - 0.5) * 4.0
    mx, half_width = x - centre, 0.30 * head_rx
    curve = 0.45 - curvature * (mx * mx - half_width * half_width / 3.0)
    distance = (y - curve).abs() / torch.sqrt(1.0 + (2.0 * curvature * mx) ** 2)
    beyond = (mx.abs() - half_width).clamp_min(0.0)
    mouth = coverage(_length(distance, beyond) - 0.035)
    image = torch.lerp(image, torch.tensor([0.55, 0.12, 0.15]).view(3, 1, 1, 1), mouth)
    return image.clamp(0.0, 1.0).permute(1, 0, 2, 3).contiguous()


def _length(a: Tensor, b: Tensor) -> Tensor:
    """√(a² + b²) (torch.hypot guards against overflow, which these coordinates cannot reach, at 3× the cost)."""
    return torch.sqrt(a * a + b * b)


def _hsv_to_rgb(h: Tensor, s: float, v: float) -> Tensor:
    """RGB (3, *h.shape) of hue ``h`` in [0, 1) with saturation ``s`` and value ``v``."""
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0])
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# loaders


def load_dataset(name: str, *, data_dir=None, image_size: int = 64, num_samples: Optional[int] = None,
                 seed: int = 0) -> ImageDataset:
    """The dataset ``name`` (one of :data:`DATASETS`) as an :class:`ImageDataset` of images in [0, 1]:

    - ``faces``: :func:`make_faces` (3 channels, with factors), ``num_samples`` faces (default
      :data:`DEFAULT_NUM_FACES`) generated from ``seed``;
    - ``celeba``: ``img_align_celeba/*.jpg`` under ``data_dir`` (or ``data_dir`` itself), center crop 148, resize;
    - ``folder``: every png/jpg/jpeg/bmp/webp under ``data_dir`` (recursive), center crop to a square, resize;
    - ``mnist``: ``train-images-idx3-ubyte`` (or ``.gz``) under ``data_dir`` (1 channel), resized to image_size
      (28 → 32 is a 2-pixel zero pad);
    - ``digits``: scikit-learn's bundled 8×8 digits, upsampled bilinearly (1 channel; needs ``genfast[digits]``;
      their classes: :func:`digit_labels`).

    For all but faces, ``num_samples`` (default: all) picks that many images at random (with ``seed``), kept in
    file order."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    _check_image_size(image_size, minimum=8)
    if num_samples is not None:
        _check_int(num_samples, "num_samples", minimum=1)
    if name == "faces":
        images, factors, names = make_faces(DEFAULT_NUM_FACES if num_samples is None else num_samples, seed=seed,
                                            image_size=image_size)
        return ImageDataset(channels=3, image_size=image_size, images=_to_uint8(images), factors=factors,
                            factor_names=names)
    if name == "digits":
        return _in_memory(_digits(), image_size, num_samples, seed)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir, the folder that holds it")
    root = Path(data_dir)
    if name == "mnist":
        return _in_memory(_mnist(root), image_size, num_samples, seed)
    if name == "celeba":
        folder = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
        files = _image_files(folder, recursive=False, extensions=(".jpg",))
        crop = CELEBA_CROP
    else:
        files = _image_files(root, recursive=True, extensions=IMAGE_EXTENSIONS)
        crop = None
    files = _readable(files)
    return ImageDataset(channels=3, image_size=image_size, files=_subset(files, num_samples, seed), crop=crop)


def _in_memory(images: Tensor, image_size: int, num_samples, seed) -> ImageDataset:
    """A dataset of uint8 images (N, 1, h, w) resized to image_size, optionally subsampled."""
    images = images[_subset(range(images.shape[0]), num_samples, seed)]
    return ImageDataset(channels=images.shape[1], image_size=image_size, images=_resize_uint8(images, image_size))


def _subset(items, num_samples, seed) -> list:
    items = list(items)
    if num_samples is None or num_samples >= len(items):
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    return [items[i] for i in keep.tolist()]


def _image_files(folder: Path, *, recursive: bool, extensions: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a directory")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f"no images ({'/'.join(e[1:] for e in extensions)}) found in {str(folder)!r}")
    return files


def _readable(files: list[Path]) -> list[Path]:
    """The files whose header PIL can identify as an image; one warning counts the others."""
    from PIL import Image

    readable = []
    for path in files:
        try:
            with Image.open(path):
                readable.append(path)
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    skipped = len(files) - len(readable)
    if skipped:
        warnings.warn(f"skipped {skipped} of {len(files)} image files that could not be read "
                      f"(first folder: {str(files[0].parent)!r})", stacklevel=3)
    if not readable:
        raise FileNotFoundError(f"none of the {len(files)} image files under {str(files[0].parent)!r} is readable")
    return readable


def _decode(path: Path, *, channels: int, image_size: int, crop: Optional[int]) -> Tensor:
    """uint8 (C, S, S): the image center-cropped to ``crop`` (or to its shorter side) and resized (bicubic,
    antialiased)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        width, height = image.size
        side = min(width, height, crop) if crop else min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _resize_uint8(images: Tensor, image_size: int) -> Tensor:
    """uint8 (N, C, h, w) → uint8 (N, C, S, S): 28 → 32 pads 2 zero pixels per side, other sizes resize
    bilinearly (antialiased when shrinking)."""
    height = images.shape[-1]
    if height == image_size:
        return images.contiguous()
    if height == 28 and image_size == 32:
        return F.pad(images, (2, 2, 2, 2))
    out = [F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=image_size < height) for chunk in images.split(4096)]
    return _to_uint8(torch.cat(out) / 255.0)


def _to_uint8(images: Tensor) -> Tensor:
    return (images * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _mnist(root: Path) -> Tensor:
    """uint8 (N, 1, 28, 28) from the IDX file ``train-images-idx3-ubyte`` (or ``.gz``) under ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder {str(root)!r} does not exist or is not a directory")
    names = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
    candidates = [p for n in names for p in (root / n, root / (n + ".gz"))]
    candidates += [p for c in candidates for p in [root / "raw" / c.name, root / "MNIST" / "raw" / c.name]]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no MNIST file train-images-idx3-ubyte[.gz] found in {str(root)!r}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 16 or int.from_bytes(data[:4], "big") != 2051:
        raise ValueError(f"{str(path)!r} is not an IDX image file (magic number 2051 expected)")
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    if len(data) != 16 + n * rows * cols:
        raise ValueError(f"{str(path)!r} is truncated: {n}×{rows}×{cols} pixels declared, "
                         f"{len(data) - 16} bytes present")
    array = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)
    return torch.from_numpy(array.copy())


def _sklearn_digits():
    """scikit-learn's bundled digits (a Bunch with ``images`` (1797, 8, 8) in 0..16 and ``target`` 0..9)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install genfast[digits]") from error
    return load_digits()


def _digits() -> Tensor:
    """uint8 (1797, 1, 8, 8) from scikit-learn's bundled digits (values 0..16 scaled to 0..255)."""
    images = torch.from_numpy(_sklearn_digits().images).float() / 16.0
    return _to_uint8(images[:, None])


def digit_labels(*, num_samples: Optional[int] = None, seed: int = 0) -> Tensor:
    """int64 (N,) class 0..9 of each image of ``load_dataset("digits", num_samples=num_samples, seed=seed)``, in
    the same order (defaults: all 1797 images, seed 0)."""
    if num_samples is not None:
        _check_int(num_samples, "num_samples", minimum=1)
    targets = torch.from_numpy(_sklearn_digits().target).long()
    return targets[_subset(range(targets.shape[0]), num_samples, seed)]


def _check_int(value, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_image_size(image_size, *, minimum: int) -> None:
    _check_int(image_size, "image_size", minimum=minimum)
