"""Random draws from a torch generator, so ``torch.manual_seed`` governs them: the seeds of the in-kernel Philox
noise, and the small per-sample draws (timesteps, interpolation weights) of the public functions."""
from __future__ import annotations

import functools

import torch

from ._validation import check_generator


def draw(sampler, *args, device: torch.device, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``sampler(*args, **kwargs)`` (e.g. ``torch.randint``) drawn on the generator's device (the default generator
    of ``device`` when ``generator`` is None), on ``device``."""
    check_generator(generator, device)
    if generator is None or generator.device == device:
        return sampler(*args, device=device, generator=generator, **kwargs)
    return sampler(*args, device=generator.device, generator=generator, **kwargs).to(device)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 tensor ``[key, offset]`` on ``device``: 63 random bits each, so calls never share a stream."""
    # randint(high, size): the values of randint(0, high, size), its argument parsing ~1.5 µs cheaper
    if generator is None:  # every call of an op without a generator: one randint, nothing around it
        return torch.randint(2**63 - 1, (2,), dtype=torch.int64, device=device)
    return draw(torch.randint, 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


def unused_seed(device: torch.device) -> torch.Tensor:
    """An int64 ``[0, 0]`` on ``device`` for an op whose seed goes unused (its noise is given, or it draws none):
    made once per device and shared (no op writes its inputs); a fresh one while torch.compile traces or a CUDA
    graph captures (whose memory pool the shared one must not live in)."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(2, dtype=torch.int64, device=device)
    return _zeros_seed(device)


@functools.lru_cache(maxsize=None)
def _zeros_seed(device: torch.device) -> torch.Tensor:
    return torch.zeros(2, dtype=torch.int64, device=device)
