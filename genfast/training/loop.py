"""The one training loop: data order, steps, metrics (and sample quality with --eval-every), checkpoints, resume,
Ctrl-C and NaN handling, DDP."""
from __future__ import annotations

import csv
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import genfast
from ..checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..plots import plot_losses
from .config import RunConfig, UsageError
from .distributed import World, all_true, gather, init_world, resolve_device, shutdown
from .precision import precision_reason
from .quality import EVAL_COLUMNS, TrainingEval
from .tasks import TASKS, NonFiniteLoss, Task

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; the CLI exits with 128 + ``signum``
    (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


class _StopOnSignal:
    """The first SIGINT or SIGTERM (Ctrl-C; schedulers, ``docker stop`` and torchrun's shutdown send SIGTERM) asks
    the loop to stop after the current step and save; a second one raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool):
        self.signum: int | None = None
        self.quiet = quiet
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to quit at "
                  "once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _progress(total: int, initial: int, config: RunConfig, world: World):
    from tqdm import tqdm

    disable = config.quiet or not world.is_main or not sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=disable, file=sys.stderr, desc=f"train {config.model}",
                unit="step", dynamic_ncols=True)


def evaluated(rows: list[dict]) -> tuple[str, ...]:
    """:data:`EVAL_COLUMNS` when a row holds them (the run evaluated with --eval-every), else ()."""
    return EVAL_COLUMNS if any("fid" in row for row in rows) else ()


def write_metrics(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    """metrics.csv: step, epoch, the task's columns, images/s and, with --eval-every, fid, kid, precision and
    recall (blank at the steps that were not evaluated), one row a step (floats in full precision)."""
    fields = ("step", "epoch") + columns + ("images_per_s",) + evaluated(rows)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(fields)
            for row in rows:
                writer.writerow(["" if row.get(k) is None else repr(row[k]) for k in fields])

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
    pictures into ``config.out``. Raises :class:`UsageError` (bad settings or paths: an output folder this call
    created is removed again if still empty), :class:`NonFiniteLoss` (the last good checkpoint is kept) or
    :class:`Interrupted` (after saving a checkpoint)."""
    world = init_world(config.device)
    created = not config.out_dir.exists()
    try:
        return _train(config, world)
    except UsageError:
        if created and world.is_main and config.out_dir.is_dir() and not any(config.out_dir.iterdir()):
            config.out_dir.rmdir()
        raise
    finally:
        shutdown(world)


def _train(config: RunConfig, world: World) -> RunResult:
    config, saved, device = _settings(config, world)
    _seed_everything(config.seed)
    data = _Data.load(config, world)
    try:
        task = TASKS[config.model](config, channels=data.dataset.channels, device=device, world=world)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Each process draws its own noise; the seed, and so the whole run, is fixed by --seed.
    noise = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + world.rank)
    try:
        evaluation = TrainingEval(config, data, device) if config.eval_every and world.is_main else None
    except ValueError as exc:  # too few reference images
        raise UsageError(f"--eval-every: {exc}") from None
    run = _Run(config, world, device, data, task, noise, evaluation)
    if saved is not None:
        run.restore(saved)
    else:
        with genfast.use_backend(config.backend):
            task.start(data.dataset, data.train_indices)
    total = config.epochs * data.steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    preview = torch.stack([data.dataset[i] for i in (data.eval_indices or data.train_indices)[:16]]).to(device)
    task.train()
    run.train_until(total)
    run.save()
    task.train(False)
    if world.is_main:
        plot_losses(run.history, task.plotted + evaluated(run.history), config.out_dir / "loss.png",
                    title=f"{config.model} on {config.dataset} ({run.step} steps)")
        with genfast.use_backend(config.backend):
            task.write_outputs(config.out_dir, preview)
    return RunResult(config=config, task=task, dataset=data.dataset, eval_indices=data.eval_indices,
                     history=run.history, step=run.step, world=world)


CHECKPOINT_KEYS = ("config", "channels", "task", "step", "epoch", "position", "history", "rng")


def _settings(config: RunConfig, world: World) -> tuple[RunConfig, dict | None, torch.device]:
    """(the run's config, resumed from the checkpoint with ``--resume``; that checkpoint or None; the device),
    after checking every setting; rank 0 checks that the output folder can be written (creating it) and removes
    the temporary files of a write that was killed."""
    if not config.resume:  # a resumed run's settings are checked once they are the checkpoint's
        config.check()
    _check_out(config.out_dir)
    saved = None
    if config.resume:
        try:
            saved = load_checkpoint(config.out_dir / CHECKPOINT, keys=CHECKPOINT_KEYS)
            config, ignored = config.resumed_from(saved["config"], config.given)
            config.check()
        except (FileNotFoundError, ValueError, TypeError) as exc:
            raise UsageError(f"--resume: {exc}") from None
        if ignored and world.is_main and not config.quiet:
            print(f"warning: --resume continues the checkpoint's run and ignores {'; '.join(ignored)}",
                  file=sys.stderr)
    device = resolve_device(config.device, world)
    config = config.resolved(device)
    reason = precision_reason(config.precision, device)
    if reason is not None:
        raise UsageError(f"--precision {config.precision}: {reason}")
    reason = config.backend_reason(device)
    if reason is not None:
        raise UsageError(f"--backend {config.backend} is not available: {reason}")
    if config.batch_size % world.size:
        raise UsageError(f"--batch-size {config.batch_size} must be divisible by the {world.size} processes")
    if world.is_main:
        _make_out(config.out_dir)
    return config, saved, device


def _check_out(out: Path) -> None:
    """``out`` is a folder or can be made one (its nearest existing ancestor is a writable folder)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    ancestor = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {ancestor} is not a writable folder")


def _make_out(out: Path) -> None:
    """Create ``out``, check that a file can be written there, and remove ``.checkpoint.pt.*.tmp`` /
    ``.metrics.csv.*.tmp`` files that a killed write left behind."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    for name in (CHECKPOINT, METRICS):
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


@dataclass
class _Data:
    """A run's dataset, its split into training and held-out images, and the sampler that deals this process its
    share of the training images, ``batch`` a step, ``steps_per_epoch`` steps an epoch."""
    dataset: torch.utils.data.Dataset
    train_indices: list[int]
    eval_indices: list[int]
    sampler: DistributedSampler
    batch: int
    steps_per_epoch: int

    @classmethod
    def load(cls, config: RunConfig, world: World) -> _Data:
        dataset = load_data(config)
        train_indices, eval_indices = split_indices(len(dataset), config.holdout, config.seed)
        batch = config.batch_size // world.size
        sampler = DistributedSampler(Subset(dataset, train_indices), num_replicas=world.size, rank=world.rank,
                                     shuffle=True, seed=config.seed, drop_last=True)
        steps_per_epoch = len(sampler) // batch
        if steps_per_epoch == 0:
            raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_indices)} training "
                             "images")
        return cls(dataset, train_indices, eval_indices, sampler, batch, steps_per_epoch)

    def loader(self, epoch: int, position: int, workers: int) -> DataLoader:
        """The batches of ``epoch`` from its batch ``position`` on: the sampler's order of that epoch, resumed."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[position * self.batch:]
        return DataLoader(self.dataset, batch_size=self.batch, sampler=[self.train_indices[i] for i in order],
                          drop_last=True, num_workers=workers, generator=torch.Generator().manual_seed(0))


@dataclass
class _Run:
    """A run's parts and where it stands: ``step`` steps done, batch ``position`` of epoch ``epoch`` next, the
    metrics of every step in ``history``. A checkpoint holds all of it, so a resumed run continues exactly."""
    config: RunConfig
    world: World
    device: torch.device
    data: _Data
    task: Task
    noise: torch.Generator
    evaluation: TrainingEval | None = None
    step: int = 0
    epoch: int = 0
    position: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def checkpoint_path(self) -> Path:
        return self.config.out_dir / CHECKPOINT

    def restore(self, saved: dict) -> None:
        """Continue from the checkpoint ``saved``: the task's state, the progress and this process's noise stream."""
        self.task.load_state_dict(saved["task"])
        self.step, self.epoch, self.position, self.history = (saved["step"], saved["epoch"], saved["position"],
                                                              saved["history"])
        states = saved["rng"]
        if len(states) == self.world.size:
            set_rng_state(states[self.world.rank], {"noise": self.noise})
        elif self.world.is_main:
            print(f"warning: the checkpoint was written by {len(states)} processes, this run has {self.world.size}; "
                  "the random streams restart from the seed", file=sys.stderr)

    def save(self) -> None:
        """checkpoint.pt and metrics.csv (rank 0), with the random streams of every process."""
        rng = gather(rng_state({"noise": self.noise}), self.world)
        if self.world.is_main:
            save_checkpoint(dict(config=self.config.to_dict(), channels=self.data.dataset.channels,
                                 task=self.task.state_dict(), step=self.step, epoch=self.epoch,
                                 position=self.position, history=self.history, rng=rng), self.checkpoint_path)
            write_metrics(self.history, self.task.columns, self.config.out_dir / METRICS)

    def train_until(self, total: int) -> None:
        """Steps until ``total`` (or until ``max_seconds`` have passed, on every process alike), with a checkpoint
        every ``checkpoint_every`` steps; on SIGINT (in any process) every process stops after the step, saves and
        raises :class:`Interrupted`."""
        config, world = self.config, self.world
        deadline = None if config.max_seconds is None else time.monotonic() + config.max_seconds
        with genfast.use_backend(config.backend), _StopOnSignal(config.quiet or not world.is_main) as stop, \
                _progress(total, min(self.step, total), config, world) as bar:
            while self.step < total:
                for images in self.data.loader(self.epoch, self.position, config.workers):
                    metrics = self._step(images)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if v is not None}, refresh=False)
                    if not all_true(not stop.requested, world, self.device):
                        self.save()
                        raise Interrupted(f"interrupted at step {self.step}: checkpoint saved to "
                                          f"{self.checkpoint_path}; continue with --resume",
                                          stop.signum or signal.SIGTERM)
                    if self.step % config.checkpoint_every == 0 and self.step < total:
                        self.save()
                    if deadline is not None and not all_true(time.monotonic() < deadline, world, self.device):
                        total = self.step
                    if self.step >= total:
                        break

    def _step(self, images: torch.Tensor) -> dict[str, float | None]:
        """One training step on ``images``: its metrics, recorded in ``history``, and the position moved on."""
        started = time.perf_counter()
        try:
            metrics = self.task.step(self.task.prepare(images.to(self.device)), generator=self.noise,
                                     step=self.step + 1)
        except NonFiniteLoss as exc:
            kept = f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path.exists() else \
                "no checkpoint was written before it"
            raise NonFiniteLoss(f"{exc}; stopped, {kept}") from None
        self.step += 1
        row = dict(step=self.step, epoch=self.epoch + 1, **metrics,
                   images_per_s=self.config.batch_size / (time.perf_counter() - started))
        if self.evaluation is not None and self.evaluation.due(self.step):
            row.update(self.evaluation(self.task))
        self.history.append(row)
        self.position += 1
        if self.position == self.data.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return metrics
