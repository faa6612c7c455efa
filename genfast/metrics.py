"""Metrics of a learned latent space: active units, the mutual information gap (disentanglement against known
generative factors) and the smoothness of latent interpolations."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor


def active_units(mu: Tensor, *, threshold: float = 0.01) -> int:
    """The number of latent dims whose posterior mean varies over the data (Burda et al. 2016):
    #{d : Var_x(E[z_d | x]) > threshold}, for ``mu`` (N, D) the posterior means of N inputs (population variance)."""
    mu = _matrix(mu, "mu")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold < 0:
        raise ValueError(f"threshold must be a real number >= 0, got {threshold!r}")
    return int((mu.double().var(dim=0, unbiased=False) > threshold).sum())


def mutual_information_gap(latents: Tensor, factors: Tensor, *, num_bins: int = 20) -> float:
    """MIG (Chen et al. 2018): (1/K)·Σ_k (I(z_a; v_k) − I(z_b; v_k)) / H(v_k), with z_a, z_b the two latents of
    highest mutual information with factor v_k, in [0, 1] (1: each factor is captured by one latent alone).

    ``latents`` (N, D) and ``factors`` (N, K). Each latent is discretised into ``num_bins`` equal-width bins over its
    range (as in disentanglement_lib); a factor with at most ``num_bins`` distinct values is used as it is, others
    are binned the same way. Mutual information and entropy in nats from the empirical joint histograms."""
    latents = _matrix(latents, "latents")
    factors = _matrix(factors, "factors")
    if latents.shape[0] != factors.shape[0]:
        raise ValueError(f"latents and factors must have the same number of rows N, got {latents.shape[0]} and "
                         f"{factors.shape[0]}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    if latents.shape[1] < 2:
        raise ValueError(f"latents must have at least 2 dims (MIG compares the top two), got {latents.shape[1]}")
    codes = torch.stack([_discretise(latents[:, d], num_bins, keep_values=False) for d in range(latents.shape[1])])
    gaps = []
    for k in range(factors.shape[1]):
        v = _discretise(factors[:, k], num_bins, keep_values=True)
        entropy = _mutual_information(v, v)
        if entropy <= 0:
            raise ValueError(f"factor {k} is constant: its entropy is 0 and MIG is undefined")
        mi = torch.stack([_mutual_information(c, v) for c in codes])
        top = mi.topk(2).values
        gaps.append(float((top[0] - top[1]) / entropy))
    return sum(gaps) / len(gaps)


def interpolation_smoothness(frames: Tensor) -> float:
    """How evenly an interpolation moves, for ``frames`` (N, steps, C, H, W), steps ≥ 3: the mean over the N paths
    of max_i d_i / mean_i d_i with d_i = ‖f_{i+1} − f_i‖₂ the L2 distance between consecutive frames. 1 means
    equal steps (the smoothest); a path that jumps in one step scores steps − 1. Lower is smoother. A path whose
    frames are all equal scores 1."""
    if not isinstance(frames, Tensor) or not frames.is_floating_point():
        raise TypeError(f"frames must be a floating-point torch.Tensor, got {type(frames).__name__}")
    if frames.dim() != 5 or frames.shape[1] < 3:
        raise ValueError(f"frames must have shape (N, steps, C, H, W) with steps >= 3, got {tuple(frames.shape)}")
    d = (frames[:, 1:] - frames[:, :-1]).double().flatten(2).norm(dim=2)  # (N, steps − 1)
    mean = d.mean(dim=1)
    ratio = torch.where(mean > 0, d.max(dim=1).values / mean.clamp_min(torch.finfo(d.dtype).tiny), 1.0)
    return float(ratio.mean())


def _matrix(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a real torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1, got {tuple(x.shape)}")
    return x.detach().cpu().double()


def _discretise(x: Tensor, num_bins: int, *, keep_values: bool) -> Tensor:
    """Integer codes (N,) of x: its distinct values when ``keep_values`` and there are at most num_bins of them,
    else equal-width bins over [min, max]."""
    values, codes = torch.unique(x, return_inverse=True)
    if keep_values and values.numel() <= num_bins:
        return codes
    low, high = x.min(), x.max()
    if high == low:
        return torch.zeros_like(x, dtype=torch.long)
    return ((x - low) / (high - low) * num_bins).long().clamp_(0, num_bins - 1)


def _mutual_information(a: Tensor, b: Tensor) -> Tensor:
    """I(a; b) in nats of two integer code vectors, from their joint histogram (I(a; a) = H(a))."""
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    joint /= a.shape[0]
    outer = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    nonzero = joint > 0
    return (joint[nonzero] * (joint[nonzero] / outer[nonzero]).log()).sum()
