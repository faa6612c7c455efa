"""In-kernel Philox normal noise: the stream defined in ``genfast/reference/random.py``.

One Philox call yields four normals (two Box-Muller pairs), so a block of BLOCK elements costs BLOCK/4 calls.
On a GPU, sin and cos are the hardware approximations (``sin.approx.f32``, absolute error < 1e-6 on [-π, π]):
libdevice's exact versions carry a local-memory range reduction for huge arguments that θ ∈ [-π, π) never needs.
The interpreter, which cannot call libdevice, uses the exact functions.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from genfast._shared import triton_interpret


@triton.jit
def _sin_cos_exact(theta):
    return tl.sin(theta), tl.cos(theta)


@triton.jit
def _sin_cos_fast(theta):
    return libdevice.fast_sinf(theta), libdevice.fast_cosf(theta)


_sin_cos = _sin_cos_exact if triton_interpret() else _sin_cos_fast


@triton.jit
def load_philox_key(seed_ptr):
    """Load the int64 pair ``[key, offset]`` and split the offset into the two high counter words."""
    key = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    offset = tl.load(seed_ptr + 1).to(tl.uint64, bitcast=True)
    return key, (offset & 0xFFFFFFFF).to(tl.uint32), (offset >> 32).to(tl.uint32)


@triton.jit
def _box_muller(x_u, x_v):
    u = ((x_u >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    v = (x_v >> 8).to(tl.float32) * 5.9604644775390625e-08 - 0.5
    r = tl.sqrt(-2.0 * tl.log(u))
    sin, cos = _sin_cos(v * 6.283185307179586)
    return r * cos, r * sin


@triton.jit
def philox_normal_block(key, off_lo, off_hi, sample, start, BLOCK: tl.constexpr):
    """fp32 normals for elements ``start .. start+BLOCK`` of sample ``sample``; ``start`` is a multiple of 4."""
    tl.static_assert(BLOCK % 4 == 0)
    c0 = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zeros = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    c1 = zeros + sample.to(tl.uint32)
    x0, x1, x2, x3 = tl.philox(key, c0, c1, zeros + off_lo, zeros + off_hi)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    # interleave so that element 4k + i is n_i of counter k
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])


@triton.jit
def _philox_normal_kernel(seed_ptr, out_ptr, sample_numel, BLOCK: tl.constexpr):
    """Writes the noise of a (batch, sample_numel) fp32 tensor: used to test the stream against the reference."""
    chunk = tl.program_id(0)
    sample = tl.program_id(1)
    key, off_lo, off_hi = load_philox_key(seed_ptr)
    start = chunk * BLOCK
    noise = philox_normal_block(key, off_lo, off_hi, sample, start, BLOCK)
    cols = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + sample.to(tl.int64) * sample_numel + cols, noise, mask=cols < sample_numel)


NOISE_BLOCK = 1024


def philox_normal(seed, batch, sample_numel):
    """Triton twin of ``genfast.reference.random.philox_normal``."""
    out = torch.empty((batch, sample_numel), dtype=torch.float32, device=seed.device)
    if out.numel():
        grid = (triton.cdiv(sample_numel, NOISE_BLOCK), batch)
        _philox_normal_kernel[grid](seed, out, sample_numel, BLOCK=NOISE_BLOCK)
    return out
