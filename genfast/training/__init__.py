"""Training for the reference models: one loop (:func:`train`) and the model-specific steps (:mod:`.tasks`)."""
from .config import MODELS, RunConfig, UsageError
from .ema import EMA
from .loop import CHECKPOINT, METRICS, Interrupted, RunResult, read_metrics, split_indices, train
from .tasks import NonFiniteLoss, build_ddpm, sample_ddpm

__all__ = ["MODELS", "RunConfig", "train", "RunResult", "UsageError", "Interrupted", "NonFiniteLoss",
           "CHECKPOINT", "METRICS", "read_metrics", "split_indices", "build_ddpm", "sample_ddpm", "EMA"]
