"""Random draws from a torch generator, so ``torch.manual_seed`` governs them: the seeds of the in-kernel Philox
noise, and the small per-sample draws (timesteps, interpolation weights) of the public functions."""
from __future__ import annotations

import torch

from ._validation import check_generator


def draw(sampler, *args, device: torch.device, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``sampler(*args, **kwargs)`` (e.g. ``torch.randint``) drawn on the generator's device (the default generator
    of ``device`` when ``generator`` is None), on ``device``."""
    check_generator(generator, device)
    source = generator.device if generator is not None else device
    return sampler(*args, device=source, generator=generator, **kwargs).to(device)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 tensor ``[key, offset]`` on ``device``: 63 random bits each, so calls never share a stream."""
    return draw(torch.randint, 0, 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)
