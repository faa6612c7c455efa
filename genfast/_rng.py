"""Seeds for the in-kernel Philox noise, drawn from a torch generator so ``torch.manual_seed`` governs them."""
from __future__ import annotations

import torch

from ._validation import check_generator


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 tensor ``[key, offset]`` on ``device``: 63 random bits each, so calls never share a stream.

    Drawn on the generator's device (the default generator of ``device`` when ``generator`` is None)."""
    check_generator(generator, device)
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device)
