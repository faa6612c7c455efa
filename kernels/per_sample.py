"""Grid, heuristics and launcher shared by the per-sample elementwise kernels (VAE, diffusion, gradient penalty).

Tensors have shape (B, ...) with D = numel / B elements per sample and the batch outermost in memory (contiguous
or channels_last), indexed by memory position. The grid is (cdiv(D, BLOCK), B): axis 0 walks one sample's
elements, axis 1 is the sample, so per-sample scalars (a timestep, α, a norm) are loaded once per program. Batches
beyond CUDA's limit on grid axis 1 run in slices; a kernel gets the slice's first sample as ``sample_base``, so
sample indices (and the noise stream, keyed by them) carry on across slices.
"""
import triton
import triton.language as tl

from .random import load_philox_key, philox_normal_block

# ---- heuristics: the one place block sizes and warps of the per-sample kernels are chosen --------------------
MIN_BLOCK, MAX_BLOCK = 128, 2048  # BLOCK: D rounded up to a power of two, within these bounds
MAX_WARPS = 4  # so a thread takes BLOCK / 128 elements of a large block: its per-sample setup (timestep, schedule
# coefficients in fp64, the Philox key) is amortised over 16 elements
MAX_GRID_SAMPLES = 65535  # CUDA's limit on grid axis 1


def config(sample_numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for D elements per sample: a block no longer than the sample (no idle lanes beyond the
    rounding to a power of two), at most MAX_BLOCK; 8 elements a thread from 256 to 1024 (4 at 128, 16 at 2048)."""
    block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(max(sample_numel, 1))))
    return block, max(1, min(MAX_WARPS, block // 256))


def dims(x) -> tuple[int, int]:
    """(B, D) of a (B, ...) tensor: its batch and the number of elements per sample."""
    batch = x.shape[0]
    return batch, x.numel() // batch if batch else 0


def num_chunks(sample_numel: int) -> int:
    """Programs per sample (grid axis 0)."""
    return triton.cdiv(sample_numel, config(sample_numel)[0])


def launch(kernel, like, *args, **constexprs):
    """Run ``kernel`` over the (B, ...) tensor ``like``; its last two runtime arguments are (sample_base,
    sample_numel), appended here."""
    batch, sample_numel = dims(like)
    if sample_numel == 0:
        return
    block, num_warps = config(sample_numel)
    for base in range(0, batch, MAX_GRID_SAMPLES):
        grid = (triton.cdiv(sample_numel, block), min(MAX_GRID_SAMPLES, batch - base))
        kernel[grid](*args, base, sample_numel, **constexprs, BLOCK=block, num_warps=num_warps)


@triton.jit
def sample_block(sample_base, sample_numel, BLOCK: tl.constexpr):
    """(sample, first column, int64 offsets, mask) of this program's block."""
    sample = sample_base + tl.program_id(1)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    return sample, start, sample.to(tl.int64) * sample_numel + cols, cols < sample_numel


@triton.jit
def block_noise(noise_ptr, seed_ptr, sample, start, offs, mask, LOADED: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 ε of this block: loaded from ``noise_ptr`` (LOADED), else the Philox stream of ``seed_ptr``."""
    if LOADED:
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        key, off_lo, off_hi = load_philox_key(seed_ptr)
        eps = philox_normal_block(key, off_lo, off_hi, sample, start, BLOCK)
    return eps
