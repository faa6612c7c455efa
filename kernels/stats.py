"""Statistics helpers of the Triton kernels: numerically stable (count, mean, M2) summaries, two-pass on a tile
and combined with Chan's formula
    n = n_a + n_b,  δ = mean_b − mean_a,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n,
and partials of three statistics kept in three planes of one buffer (statistic i of partial j at ptr[i·plane + j]),
merged in a fixed order: deterministic, no atomics.
"""
import triton
import triton.language as tl


@triton.jit
def combine_summaries(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's combination of two (count, mean, M2) summaries; either may be empty."""
    n = n_a + n_b
    f = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * f, m2_a + m2_b + delta * delta * n_a * f


@triton.jit
def tile_stats(d, mask, n, INNER: tl.constexpr):
    """(mean, deviations from it (0 outside the mask), M2) of the n masked-in values of the 2-D tile d, two-pass;
    each sum runs over axis INNER first (the contiguous one, whose values a thread holds: fewer shuffles)."""
    mean = tl.sum(tl.sum(d, INNER), 0) / tl.maximum(n, 1.0)
    dev = tl.where(mask, d - mean, 0.0)
    return mean, dev, tl.sum(tl.sum(dev * dev, INNER), 0)


@triton.jit
def store_planes(ptr, off, plane, a, b, c, mask):
    """Store the three statistics (a, b, c) of the partials at ``off`` (``mask``: which; None: all)."""
    tl.store(ptr + off, a, mask=mask)
    tl.store(ptr + plane + off, b, mask=mask)
    tl.store(ptr + 2 * plane + off, c, mask=mask)


@triton.jit
def sum_planes(ptr, off, plane, step, n, mask):
    """The three statistics summed over the n partials at off, off + step, ..., in that order."""
    a = tl.zeros(off.shape, tl.float32)
    b = tl.zeros(off.shape, tl.float32)
    c = tl.zeros(off.shape, tl.float32)
    for j in range(0, n):
        a += tl.load(ptr + off + j * step, mask=mask, other=0.0)
        b += tl.load(ptr + plane + off + j * step, mask=mask, other=0.0)
        c += tl.load(ptr + 2 * plane + off + j * step, mask=mask, other=0.0)
    return a, b, c


@triton.jit
def merge_summaries(ptr, base, plane, n, BLOCK: tl.constexpr):
    """The (count, mean, M2) summary of the n summaries stored at base .. base + n, merged BLOCK at a time in a fixed
    order."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jmask = j < n
        n_j = tl.load(ptr + base + j, mask=jmask, other=0.0)
        mean_j = tl.load(ptr + plane + base + j, mask=jmask, other=0.0)
        m2_j = tl.load(ptr + 2 * plane + base + j, mask=jmask, other=0.0)
        n_b = tl.sum(n_j, 0)
        mean_b = tl.sum(n_j * mean_j, 0) / tl.maximum(n_b, 1.0)
        m2_b = tl.sum(m2_j + n_j * (mean_j - mean_b) * (mean_j - mean_b), 0)
        count, mean, m2 = combine_summaries(count, mean, m2, n_b, mean_b, m2_b)
    return count, mean, m2


@triton.jit
def sum_rows_kernel(q_ptr, p_ptr, q_sum_ptr, p_sum_ptr, B, C, BLOCK: tl.constexpr):
    """Σ_b q[b] and Σ_b p[b] of two (B, C) fp32 tables, over b in order, stored in the outputs' dtypes (GroupNorm's
    dweight and dbias)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    off = c.to(tl.int64)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, B):
        dw += tl.load(q_ptr + off, mask=cmask, other=0.0)
        db += tl.load(p_ptr + off, mask=cmask, other=0.0)
        off += C
    tl.store(q_sum_ptr + c, dw.to(q_sum_ptr.dtype.element_ty), mask=cmask)
    tl.store(p_sum_ptr + c, db.to(p_sum_ptr.dtype.element_ty), mask=cmask)
