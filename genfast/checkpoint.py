"""Atomic checkpoint files and the random-number state a run needs to resume exactly.

A checkpoint holds tensors and plain Python values only (dicts, lists, tuples, str, int, float, bool, None) and is
read with ``torch.load(weights_only=True)``: loading a file never runs code from it."""
from __future__ import annotations

import os
import pickle
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode of any other new file
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, *, keys: tuple[str, ...] = ()) -> dict:
    """The dict saved by :func:`save_checkpoint`, loaded with ``weights_only=True`` (no code in the file runs).
    FileNotFoundError names the path when there is none; ValueError, in one line, when the file is not such a dict
    (damaged, truncated, another format, objects other than tensors and plain values) or lacks one of ``keys``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):  # NumPy states of older checkpoints
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a refused global, truncated or random bytes, another format: one line each
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc):
            raise ValueError(f"{path} is not a genfast checkpoint: it holds objects other than tensors and plain "
                             "values, and loading it could run code (refused)") from None
        raise ValueError(f"{path} is not a readable genfast checkpoint (damaged, truncated or another format: "
                         f"{type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a genfast checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path} is not a genfast checkpoint: it has no {', '.join(map(repr, missing))}")
    return state


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a training step reads: torch's CPU and CUDA default generators, Python's and NumPy's,
    and the named ``generators``."""
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        python=random.getstate(),
        numpy=_numpy_state(),
        generators={name: g.get_state() for name, g in generators.items()},
    )


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved (the CUDA states only where CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in older checkpoints
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def _numpy_state() -> tuple:
    """NumPy's global state with its key array as an int64 tensor (a NumPy array would need pickled code)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _python_state(state) -> tuple:
    """``random.getstate()`` as saved: tuples may come back as lists."""
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next


def _numpy_array_globals() -> list:
    """What unpickling a plain NumPy array needs (data only, no code): checkpoints written before genfast stored
    NumPy's state as a tensor hold one."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
