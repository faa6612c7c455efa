"""Sample quality during training (``--eval-every``): FID, KID, precision and recall of the (averaged) model's
samples in metrics.csv, plotted next to the loss."""
from __future__ import annotations

import torch

from .config import RunConfig
from .tasks import Task

EVAL_COLUMNS = ("fid", "kid", "precision", "recall")


class TrainingEval:
    """Every ``eval_every`` steps: ``eval_num`` samples of the task's sampling modules (the EMA copies with
    ``--ema``), drawn from a generator seeded with the run's seed (the same latents every time), compared with a
    fixed reference set (:func:`genfast.evaluation.reference_images`). It runs under forked random states, so
    training draws what it would draw without it and a resumed run records the same numbers."""

    def __init__(self, config: RunConfig, data, device: torch.device):
        from ..evaluation import Evaluator, reference_images
        from ..feature_net import load_feature_net

        self.config, self.device = config, device
        net, record = load_feature_net(quiet=config.quiet)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            reference, self.reference = reference_images(config, config.eval_num, dataset=data.dataset,
                                                         eval_indices=data.eval_indices,
                                                         train_indices=data.train_indices)
        self.evaluator = Evaluator(reference, net=net, record=record, faces=config.dataset == "faces",
                                   batch_size=max(config.batch_size, 64), device=device, seed=config.seed)

    def due(self, step: int) -> bool:
        return self.config.eval_every > 0 and step % self.config.eval_every == 0

    def __call__(self, task: Task) -> dict[str, float]:
        """The metrics of :data:`EVAL_COLUMNS` for the task's current weights; the task is left in train mode."""
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, device_type="cuda"), torch.no_grad():
                task.train(False)
                samples = task.sample(self.config.eval_num,
                                      generator=torch.Generator(self.device).manual_seed(self.config.seed))
                result = self.evaluator(samples)
        finally:
            task.train(True)
        return {name: result[name] for name in EVAL_COLUMNS}
