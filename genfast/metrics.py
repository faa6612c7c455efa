"""Metrics of a learned latent space: active units, the factor × latent mutual information matrix and the mutual
information gap built on it (disentanglement against known generative factors), the smoothness of latent
interpolations, and the entropy floor of a Bernoulli reconstruction loss."""
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


def factor_latent_mi(latents: Tensor, factors: Tensor, *, num_bins: int = 20) -> Tensor:
    """The normalised mutual information matrix M (K, D), M[k, d] = I(z_d; v_k) / H(v_k) in [0, 1], of ``latents``
    (N, D) and ``factors`` (N, K): the share of factor k's entropy that latent d carries.

    Each latent is discretised into ``num_bins`` equal-width bins over its range (as in disentanglement_lib); a
    factor with at most ``num_bins`` distinct values is used as it is, others are binned the same way. Mutual
    information and entropy in nats from the empirical joint histograms (biased upwards for few samples: independent
    variables score about (bins_z − 1)(bins_v − 1) / (2N·H(v)))."""
    latents = _matrix(latents, "latents")
    factors = _matrix(factors, "factors")
    if latents.shape[0] != factors.shape[0]:
        raise ValueError(f"latents and factors must have the same number of rows N, got {latents.shape[0]} and "
                         f"{factors.shape[0]}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    codes = [_discretise(latents[:, d], num_bins, keep_values=False) for d in range(latents.shape[1])]
    rows = []
    for k in range(factors.shape[1]):
        v = _discretise(factors[:, k], num_bins, keep_values=True)
        entropy = _mutual_information(v, v)
        if entropy <= 0:
            raise ValueError(f"factor {k} is constant: its entropy is 0 and its normalised MI is undefined")
        rows.append(torch.stack([_mutual_information(c, v) for c in codes]) / entropy)
    return torch.stack(rows)


def mutual_information_gap(latents: Tensor, factors: Tensor, *, num_bins: int = 20) -> float:
    """MIG (Chen et al. 2018): (1/K)·Σ_k (M[k, a_k] − M[k, b_k]), with M = :func:`factor_latent_mi` and a_k, b_k the
    two latents of highest mutual information with factor v_k, in [0, 1] (1: each factor is captured by one latent
    alone). ``latents`` (N, D ≥ 2) and ``factors`` (N, K); ``num_bins`` as in :func:`factor_latent_mi`."""
    latents = _matrix(latents, "latents")
    if latents.shape[1] < 2:
        raise ValueError(f"latents must have at least 2 dims (MIG compares the top two), got {latents.shape[1]}")
    top = factor_latent_mi(latents, factors, num_bins=num_bins).topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).mean())


def bernoulli_entropy_floor(images: Tensor) -> Tensor:
    """The least summed binary cross-entropy any decoder can reach on ``images`` (B, ...) with targets in [0, 1]:
    per image Σ_i H(x_i), H(x) = −x·ln x − (1 − x)·ln(1 − x) (0·ln 0 = 0), in nats, shape (B,). BCE(x, p) − H(x) =
    KL(Bern(x) ‖ Bern(p)) ≥ 0, so a loss minus this floor is its excess over a perfect reconstruction."""
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2:
        raise TypeError(f"images must be a floating-point torch.Tensor of shape (B, ...), got "
                        f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError("images must lie in [0, 1] (Bernoulli targets)")
    x = images.detach().double()
    return -(torch.xlogy(x, x) + torch.xlogy(1 - x, 1 - x)).flatten(1).sum(dim=1)


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
