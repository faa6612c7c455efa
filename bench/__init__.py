"""genfast benchmark suite (installed as genfast.bench): per-op and end-to-end timings against eager PyTorch and torch.compile."""
