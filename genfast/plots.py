"""Pictures a person looks at: image grids (PIL) and loss curves (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .checkpoint import atomic_write


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError("images must be a tensor (N, C, H, W) with C = 1 or 3, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return images.detach().float().cpu().clamp(0, 1)


def image_grid(images: torch.Tensor, *, nrow: int, padding: int = 2, scale: int = 1,
               row_labels: Sequence[str] | None = None) -> Image.Image:
    """The images (N, C, H, W) in [0, 1] as one RGB picture, ``nrow`` images a row, ``padding`` white pixels
    between them, each enlarged ``scale`` times (nearest neighbour), with an optional text label left of each row."""
    images = _check_images(images)
    n, c, h, w = images.shape
    if n == 0 or nrow < 1:
        raise ValueError(f"need at least one image and nrow >= 1, got {n} images and nrow={nrow}")
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    rows = -(-n // nrow)
    h, w = h * scale, w * scale
    label_width = 0 if not row_labels else 8 + 7 * max(len(label) for label in row_labels)
    canvas = np.full((rows * (h + padding) + padding, label_width + nrow * (w + padding) + padding, 3), 255, np.uint8)
    pixels = (images * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = label_width + padding + (i % nrow) * (w + padding)
        canvas[top:top + h, left:left + w] = pixels[i]
    picture = Image.fromarray(canvas)
    if row_labels:
        draw = ImageDraw.Draw(picture)
        for r, label in enumerate(row_labels):
            draw.text((4, padding + r * (h + padding) + h // 2 - 5), label, fill=(0, 0, 0))
    return picture


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int, padding: int = 2, scale: int = 1,
                    row_labels: Sequence[str] | None = None) -> None:
    """:func:`image_grid` written to ``path`` as PNG (atomically)."""
    picture = image_grid(images, nrow=nrow, padding=padding, scale=scale, row_labels=row_labels)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def plot_losses(rows: Sequence[dict], columns: Sequence[str], path: str | os.PathLike, *, title: str) -> None:
    """One panel per column of ``rows`` (dicts with a ``step`` key; ``None`` or no key = no value at that step)
    against the step, four panels a row, saved as PNG to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(len(columns), 4)
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        points = [(row["step"], row[column]) for row in rows if row.get(column) is not None]
        few = len(points) <= 50  # measured now and then (--eval-every): show the points
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, marker="o" if few else None,
                markersize=3)
        ax.set_xlabel("step")
        ax.set_title(column)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
