"""Counter-based Philox-4x32-10 normal noise in plain PyTorch: the same stream as the Triton kernels.

The noise of a tensor of shape (B, ...) whose batch dimension is outermost in memory is defined per sample: the
j-th element of sample b in memory order is lane ``j % 4`` of

    Philox4x32-10(key = seed, counter = (j // 4, b, offset_lo, offset_hi))

turned into normals by Box-Muller on pairs of 24-bit uniforms: u = ((x0 >> 8) + 1)·2⁻²⁴ ∈ (0, 1],
v = (x1 >> 8)·2⁻²⁴ − ½, r = √(−2 ln u), θ = 2πv, (n0, n1) = (r cos θ, r sin θ), and likewise (x2, x3) → (n2, n3).
The uniforms are exact in fp32, so backends differ only by the last bits of log/sqrt/sin/cos.
``seed`` is an int64 tensor ``[key, offset]`` (each read as an unsigned 64-bit word), used with tensor ops only:
nothing is read back to the host. uint32 words are held in int64 tensors here.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
TWO_POW_M24 = 2.0**-24
MAX_SAMPLE_NUMEL = 2**34  # the per-sample counter j // 4 is one 32-bit word


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product of the uint32 constant ``a`` and uint32 values ``b``.

    The int64 product wraps modulo 2**64 (two's complement, as PyTorch's CPU and CUDA kernels compute it), which
    keeps both words exact; the known-answer tests in tests/test_noise.py check this on every run."""
    product = b * a
    return (product >> 32) & MASK32, product & MASK32


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox-4x32 with 10 rounds (Salmon et al. 2011), as ``tl.philox``; counters are int64 tensors of uint32, the
    key words ints or 0-dim int64 tensors of uint32."""
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _box_muller(x_u: torch.Tensor, x_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = ((x_u >> 8) + 1).to(torch.float32) * TWO_POW_M24
    v = (x_v >> 8).to(torch.float32) * TWO_POW_M24 - 0.5
    r = torch.sqrt(-2.0 * torch.log(u))
    theta = v * (2.0 * math.pi)
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_normal(seed: torch.Tensor, batch: int, sample_numel: int) -> torch.Tensor:
    """fp32 standard normals of shape (batch, sample_numel): row b, column j is element j of sample b."""
    if sample_numel > MAX_SAMPLE_NUMEL:
        raise ValueError(f"noise: at most {MAX_SAMPLE_NUMEL} elements per sample, got {sample_numel}")
    key, offset = seed.unbind()
    device = seed.device
    groups = (sample_numel + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).expand(batch, groups)
    c1 = torch.arange(batch, dtype=torch.int64, device=device)[:, None].expand(batch, groups)
    c2 = (offset & MASK32).expand(batch, groups)
    c3 = ((offset >> 32) & MASK32).expand(batch, groups)  # >> is arithmetic: the mask keeps the word's 32 bits
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, key & MASK32, (key >> 32) & MASK32)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(batch, groups * 4)[:, :sample_numel]


def noise_like(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The Philox noise for ``x`` (batch dimension first and outermost in memory), in ``x``'s layout, fp32."""
    batch = x.shape[0]
    sample_numel = x.numel() // batch if batch else 0
    flat = philox_normal(seed, batch, sample_numel).reshape(-1)
    if x.dim() == 0 or x.is_contiguous():
        return flat.view(x.shape)
    # element at memory position p of x gets flat[p]: valid for any non-overlapping dense layout
    return flat.as_strided(x.shape, x.stride())
