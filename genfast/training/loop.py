"""The one training loop: data order, steps, metrics, checkpoints, resume, Ctrl-C and NaN handling, DDP."""
from __future__ import annotations

import csv
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import genfast
from .._backend import why_not
from ..checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..plots import plot_losses
from .config import RunConfig, UsageError
from .distributed import World, all_true, gather, init_world, resolve_device, shutdown
from .tasks import TASKS, NonFiniteLoss, Task

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


class Interrupted(Exception):
    """Training stopped on SIGINT after saving a checkpoint (the CLI exits with code 130)."""


@dataclass
class RunResult:
    config: RunConfig
    task: Task
    dataset: torch.utils.data.Dataset
    eval_indices: list[int]
    history: list[dict]
    step: int
    world: World


def split_indices(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: the last ``holdout`` of a permutation of range(n) drawn from ``seed``."""
    if not 0 <= holdout < n:
        raise UsageError(f"--holdout must be in [0, {n}) for a dataset of {n} images, got {holdout}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:n - holdout], order[n - holdout:]


def load_data(config: RunConfig):
    """The dataset of a run; a missing folder or a bad setting becomes a :class:`UsageError`."""
    from ..data import load_dataset

    try:
        return load_dataset(config.dataset, data_dir=config.data_dir, image_size=config.image_size,
                            num_samples=config.num_samples, seed=config.seed)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise UsageError(str(exc)) from None


class _StopOnSigint:
    """The first SIGINT asks the loop to stop after the current step (and save); a second one raises
    KeyboardInterrupt at once."""

    def __init__(self, quiet: bool):
        self.requested = False
        self.quiet = quiet
        self.previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _progress(total: int, initial: int, config: RunConfig, world: World):
    from tqdm import tqdm

    disable = config.quiet or not world.is_main or not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=disable, file=sys.stderr, desc=f"train {config.model}",
                unit="step", dynamic_ncols=True)


def write_metrics(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    """metrics.csv: step, epoch, the task's columns and images/s, one row a step (floats in full precision)."""
    fields = ("step", "epoch") + columns + ("images_per_s",)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(fields)
            for row in rows:
                writer.writerow(["" if row[k] is None else repr(row[k]) for k in fields])

    atomic_write(path, write)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.csv as dicts of floats (ints for step and epoch, None for blanks)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (None if v == "" else int(v) if k in ("step", "epoch") else float(v)) for k, v in row.items()}
            for row in rows]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def train(config: RunConfig) -> RunResult:
    """Train ``config.model`` as configured; rank 0 writes checkpoint.pt, metrics.csv, loss.png and the task's
    pictures into ``config.out``. Raises :class:`UsageError` (bad settings or paths), :class:`NonFiniteLoss` (the
    last good checkpoint is kept) or :class:`Interrupted` (after saving a checkpoint)."""
    world = init_world(config.device)
    try:
        return _train(config, world)
    finally:
        shutdown(world)


def _train(config: RunConfig, world: World) -> RunResult:
    out = config.out_dir
    checkpoint_path = out / CHECKPOINT
    saved = None
    if config.resume:
        try:
            saved = load_checkpoint(checkpoint_path)
            config = config.resumed_from(saved["config"])
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--resume: {exc}") from None
    device = resolve_device(config.device, world)
    reason = why_not(config.backend, device)
    if reason is not None:
        raise UsageError(f"--backend {config.backend} is not available: {reason}")
    if config.batch_size % world.size:
        raise UsageError(f"--batch-size {config.batch_size} must be divisible by the {world.size} processes")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)

    _seed_everything(config.seed)
    dataset = load_data(config)
    train_indices, eval_indices = split_indices(len(dataset), config.holdout, config.seed)
    batch = config.batch_size // world.size
    sampler = DistributedSampler(Subset(dataset, train_indices), num_replicas=world.size, rank=world.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_indices)} training images")
    try:
        task = TASKS[config.model](config, channels=dataset.channels, device=device, world=world)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    # Each process draws its own noise; the seed, and so the whole run, is fixed by --seed.
    noise = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + world.rank)
    step, epoch, position, history = 0, 0, 0, []
    if saved is not None:
        task.load_state_dict(saved["task"])
        step, epoch, position, history = saved["step"], saved["epoch"], saved["position"], saved["history"]
        states = saved["rng"]
        if len(states) == world.size:
            set_rng_state(states[world.rank], {"noise": noise})
        elif world.is_main:
            print(f"warning: the checkpoint was written by {len(states)} processes, this run has {world.size}; "
                  "the random streams restart from the seed", file=sys.stderr)

    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    preview = torch.stack([dataset[i] for i in (eval_indices or train_indices)[:16]]).to(device)

    def save():
        rng = gather(rng_state({"noise": noise}), world)
        if world.is_main:
            save_checkpoint(dict(config=config.to_dict(), channels=dataset.channels, task=task.state_dict(), step=step, epoch=epoch,
                                 position=position, history=history, rng=rng), checkpoint_path)
            write_metrics(history, task.columns, out / METRICS)

    task.train()
    with genfast.use_backend(config.backend), _StopOnSigint(config.quiet or not world.is_main) as stop, \
            _progress(total, min(step, total), config, world) as bar:
        while step < total:
            sampler.set_epoch(epoch)
            order = list(sampler)[position * batch:]
            loader = DataLoader(dataset, batch_size=batch, sampler=[train_indices[i] for i in order], drop_last=True,
                                num_workers=config.workers, generator=torch.Generator().manual_seed(0))
            for images in loader:
                started = time.perf_counter()
                try:
                    metrics = task.step(task.prepare(images.to(device)), generator=noise, step=step + 1)
                except NonFiniteLoss as exc:
                    kept = f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.exists() else \
                        "no checkpoint was written before it"
                    raise NonFiniteLoss(f"{exc}; stopped, {kept}") from None
                step += 1
                history.append(dict(step=step, epoch=epoch + 1, **metrics,
                                    images_per_s=config.batch_size / (time.perf_counter() - started)))
                position += 1
                if position == steps_per_epoch:
                    epoch, position = epoch + 1, 0
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if v is not None}, refresh=False)
                if not all_true(not stop.requested, world, device):
                    save()
                    raise Interrupted(f"interrupted at step {step}: checkpoint saved to {checkpoint_path}; "
                                      "continue with --resume")
                if step % config.checkpoint_every == 0 and step < total:
                    save()
                if step >= total:
                    break
    save()
    task.train(False)
    if world.is_main:
        plot_losses(history, task.plotted, out / "loss.png",
                    title=f"{config.model} on {config.dataset} ({step} steps)")
        task.write_outputs(out, preview)
    return RunResult(config=config, task=task, dataset=dataset, eval_indices=eval_indices, history=history,
                     step=step, world=world)
