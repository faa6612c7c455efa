"""Atomic checkpoint files and the random-number state a run needs to resume exactly."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    Readers see either the old file or the complete new one; if ``write`` fails, the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The dict saved by :func:`save_checkpoint`; FileNotFoundError names the path when there is none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a training step reads: torch's CPU and CUDA default generators, Python's and NumPy's,
    and the named ``generators``."""
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        python=random.getstate(),
        numpy=np.random.get_state(),
        generators={name: g.get_state() for name, g in generators.items()},
    )


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved (the CUDA states only where CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
