"""Pure-PyTorch references of every fused op: the fallback on any device and the oracle of the kernels."""
import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the references and the kernels compute in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
