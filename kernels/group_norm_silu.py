"""Fused GroupNorm + SiLU with the time-embedding add and the scale-shift: forward and backward Triton kernels.

    h = x + add,  x̂ = (h − mean)·rstd,  m = x̂·α + β  with  α = w·(1 + scale),  β = b·(1 + scale) + shift,
    y = silu(m) = m·σ(m)  (or y = m)          — see genfast/reference/group_norm_silu.py.

Layout. x is read as (B, C, S) with strides (sB, sC, sS) (NCHW: sS = 1, NHWC: sC = 1); y, dy and dx share them.
A tile is [BLOCK_C channels of one group, BLOCK_S spatial positions]; Triton specialises a stride of 1, so the
contiguous axis vectorises in either layout without a layout copy. Programs are indexed by the row bg = b·G + g.

Statistics are taken relative to K = h at the group's first element, so a large mean (x ≈ 1000 + noise) costs no
precision: a tile's (count, mean, M2) is the two-pass result of its values h − K, and tiles and split partials are
combined with Chan's formula
    n = n_a + n_b,  δ = mean_b − mean_a,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n.

Paths (chosen by `_plan`):
- single pass, for a group that fits one tile (grid B·G): one read of x and one write of y; the backward reads
  x and dy once and writes dx and the per-(b, c) gradients.
- split, for larger groups (grid (B·G, channel blocks × spatial splits), each program a run of tiles). Forward: a
  stats kernel writes partial (count, mean − K, M2); an apply kernel merges its group's partials in a fixed order
  and normalizes its tiles. Backward: a reduce kernel writes partial per-(b, c) sums, a finalize kernel (grid B·G)
  turns them into the per-(b, c) gradients and two per-group coefficients, and a dx kernel applies those.
Only the forward single-pass kernel (small inputs, where a zero-filling launch would cost as much as the kernel)
has the flags HAS_ADD and HAS_SCALE_SHIFT; the other kernels get add, scale and shift materialised, zeros when
absent. Those are (B, C) tensors: no memory traffic next to x, and half the compiled variants.

Backward. With dm = dy·silu'(m), silu'(m) = σ(m)·(1 + m·(1 − σ(m))), per-(b, c) sums over space
    P = Σ dm,   Q = Σ dm·x̂,   R = Σ x̂,
and per group (N = C/G·S elements, dx̂ = α·dm)   m1 = Σ_c α·P / N = mean_g(dx̂),   m2 = Σ_c α·Q / N = mean_g(dx̂·x̂):
    dx = rstd·(α·dm − m1 − x̂·m2)          dadd = Σ_s dx = rstd·(α·P − S·m1 − R·m2)
    dshift = P    dscale = w·Q + b·P     dweight = Σ_b (1 + scale)·Q    dbias = Σ_b (1 + scale)·P
The kernels write (1 + scale)·Q and (1 + scale)·P per (b, c); the launcher sums them over b in a fixed order.
"""
import functools
import inspect
import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from genfast._shared import optional_grad

from . import aot
from .stats import combine_summaries, merge_summaries, store_planes, sum_planes, tile_stats

# ---- heuristics: the one place tiles, splits and warps are chosen -------------------------------------------
MIN_BLOCK_C = 4  # a tile's channel extent: the next power of two of the group's channels, at least this ...
MAX_BLOCK_C = 64  # ... and at most this; groups of more channels take the split path in blocks of MAX_BLOCK_C
SINGLE_TILES = ((1024, 4), (8192, 16))  # (elements, num_warps): a group whose padded tile fits one takes one pass
SPLIT_TILE, SPLIT_WARPS = 2048, 4  # the tile of one loop step of the split kernels
TARGET_PROGRAMS = 1024  # the split path cuts a group's spatial extent until the grid has about this many programs
MERGE_BLOCK = 128  # split partials merged per step by the forward apply kernel
FINALIZE_BLOCK, FINALIZE_WARPS = 128, 4  # channels per step of the backward finalize kernel


class _Plan(NamedTuple):
    single: bool
    block_c: int
    block_s: int
    num_warps: int
    n_cblocks: int = 1  # split path: channel blocks per group ...
    n_sp: int = 1  # ... spatial splits per channel block ...
    per_split: int = 1  # ... and tiles per spatial split


def _plan(channels_per_group: int, spatial: int, rows: int) -> _Plan:
    """The path and tiling for groups of ``channels_per_group`` × ``spatial`` elements, ``rows`` = B·G groups."""
    block_c = max(MIN_BLOCK_C, triton.next_power_of_2(max(channels_per_group, 1)))
    if block_c <= MAX_BLOCK_C:
        for tile, num_warps in SINGLE_TILES:
            if block_c * triton.next_power_of_2(max(spatial, 1)) <= tile:
                return _Plan(True, block_c, tile // block_c, num_warps)
    block_c = min(block_c, MAX_BLOCK_C)
    block_s = max(1, SPLIT_TILE // block_c)
    n_cblocks = triton.cdiv(channels_per_group, block_c)
    n_tiles = max(1, triton.cdiv(spatial, block_s))
    n_sp = max(1, min(n_tiles, triton.cdiv(TARGET_PROGRAMS, rows * n_cblocks)))
    per_split = triton.cdiv(n_tiles, n_sp)
    return _Plan(False, block_c, block_s, SPLIT_WARPS, n_cblocks, triton.cdiv(n_tiles, per_split), per_split)


# Split counts and the activation flag stay out of Triton's value specialisation (a 1 would compile one more
# variant). Sizes and strides specialise: a stride of 1 vectorises a tile's contiguous axis, and sizes divisible by
# 16 let masked tiles vectorise. So no kernel converts an int argument to float (a size of 1 arrives as a
# constexpr): the group's element count N comes as a float argument.
_UNSPECIALIZED = ("n_sp", "per_split", "silu")


def _kernel(fn):
    return triton.jit(fn, do_not_specialize=[n for n in inspect.signature(fn).parameters if n in _UNSPECIALIZED])


# ---- helpers ------------------------------------------------------------------------------------------------
@triton.jit
def _group_start(bg, G, C, CPG, sB, sC):
    """(index of (b, first channel of g) in a (B, C) tensor, memory offset of that channel) for the row bg."""
    b = (bg // G).to(tl.int64)
    chan0 = (bg % G).to(tl.int64) * CPG
    return b * C + chan0, b * sB + chan0 * sC


@triton.jit
def _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C: tl.constexpr):
    """Channel block cb of the row bg: (mask, channel index, (b, c) index, memory offset of each channel)."""
    pidx0, off0 = _group_start(bg, G, C, CPG, sB, sC)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < CPG
    return cmask, (bg % G) * CPG + c, pidx0 + c, off0 + c.to(tl.int64) * sC


@triton.jit
def _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, HAS_ADD: tl.constexpr):
    """K = h at the group's first element (0 for an empty group): the pivot the statistics are taken about."""
    pidx0, off0 = _group_start(bg, G, C, CPG, sB, sC)
    nonempty = N > 0
    k = tl.load(x_ptr + off0, mask=nonempty, other=0.0).to(tl.float32)
    if HAS_ADD:
        k += tl.load(add_ptr + pidx0, mask=nonempty, other=0.0)
    return k


@triton.jit
def _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, HAS_SCALE_SHIFT: tl.constexpr):
    """Per channel: (w, b, gain = 1 + scale, α = w·gain, β = b·gain + shift); m = x̂·α + β."""
    w = tl.load(w_ptr + chan, mask=cmask, other=0.0)
    bias = tl.load(b_ptr + chan, mask=cmask, other=0.0)
    if HAS_SCALE_SHIFT:
        gain = 1.0 + tl.load(scale_ptr + pidx, mask=cmask, other=0.0)
        return w, bias, gain, w * gain, bias * gain + tl.load(shift_ptr + pidx, mask=cmask, other=0.0)
    return w, bias, tl.full(w.shape, 1.0, tl.float32), w, bias


@triton.jit
def _load_h(x_ptr, row_off, cmask, add, s, S, sS, HAS_ADD: tl.constexpr):
    """(h = x + add on the tile [channels, positions s], 0 outside the group; memory offsets; mask)."""
    mask = cmask[:, None] & (s < S)[None, :]
    offs = row_off[:, None] + s.to(tl.int64)[None, :] * sS
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        h = tl.where(mask, h + add[:, None], 0.0)
    return h, offs, mask


@triton.jit
def _activation(m, silu):
    return tl.where(silu != 0, m * tl.sigmoid(m), m)


@triton.jit
def _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, s, S, sS, mean, rstd, alpha, beta, silu):
    """(x̂, dm = dy·silu'(x̂·α + β), offsets, mask) on a tile, x̂ and dm 0 outside the group."""
    h, offs, mask = _load_h(x_ptr, row_off, cmask, add, s, S, sS, True)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = xhat * alpha[:, None] + beta[:, None]
    sig = tl.sigmoid(m)
    return xhat, tl.where(silu != 0, dy * sig * (1.0 + m * (1.0 - sig)), dy), offs, mask


@triton.jit
def _bwd_setup(w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, cb,
               BLOCK_C: tl.constexpr):
    """What a backward program of the row bg needs for channel block cb: (cmask, chan, pidx, row_off, add, mean,
    rstd, w, bias, gain, alpha, beta)."""
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    add = tl.load(add_ptr + pidx, mask=cmask, other=0.0)
    w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, True)
    return (cmask, chan, pidx, row_off, add, tl.load(mean_ptr + bg), tl.load(rstd_ptr + bg),
            w, bias, gain, alpha, beta)


@triton.jit
def _dx(xhat, dm, alpha, rstd, m1, m2):
    return rstd * (dm * alpha[:, None] - m1 - xhat * m2)


@triton.jit
def _split(n_sp, per_split, S, BLOCK_S: tl.constexpr):
    """(row bg, split t, channel block, first tile, end tile) of this program of a split grid."""
    bg = tl.program_id(0)
    t = tl.program_id(1)
    cb = t // n_sp
    first = (t - cb * n_sp) * per_split
    return bg, t, cb, first, tl.minimum(first + per_split, tl.cdiv(S, BLOCK_S))


@triton.jit
def _store_channel_grads(P, Q, R, w, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask,
                         dwp_ptr, dbp_ptr, dadd_ptr, dscale_ptr, dshift_ptr):
    """The per-(b, c) gradients from the sums P, Q, R (see the module docstring)."""
    tl.store(dwp_ptr + pidx, gain * Q, mask=cmask)
    tl.store(dbp_ptr + pidx, gain * P, mask=cmask)
    tl.store(dadd_ptr + pidx, rstd * (alpha * P - S * m1 - R * m2), mask=cmask)
    tl.store(dscale_ptr + pidx, w * Q + bias * P, mask=cmask)
    tl.store(dshift_ptr + pidx, P, mask=cmask)


# ---- single pass: one program per group ---------------------------------------------------------------------
@_kernel
def _fwd_single_kernel(
    x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr,
    G, C, CPG, S, sB, sC, sS, N, eps, silu,
    HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, 0, BLOCK_C)
    add = tl.zeros([BLOCK_C], tl.float32)
    if HAS_ADD:
        add = tl.load(add_ptr + pidx, mask=cmask, other=0.0)
    k = _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, HAS_ADD)
    h, offs, mask = _load_h(x_ptr, row_off, cmask, add, tl.arange(0, BLOCK_S), S, sS, HAS_ADD)
    mean_k, dev, m2 = tile_stats(tl.where(mask, h - k, 0.0), mask, N)
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(N, 1.0) + eps)
    w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, HAS_SCALE_SHIFT)
    y = _activation(dev * (alpha * rstd)[:, None] + beta[:, None], silu)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + bg, k + mean_k)
    tl.store(rstd_ptr + bg, rstd)


@_kernel
def _bwd_single_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dwp_ptr, dbp_ptr, dadd_ptr, dscale_ptr, dshift_ptr,
    G, C, CPG, S, sB, sC, sS, N, silu,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    cmask, chan, pidx, row_off, add, mean, rstd, w, bias, gain, alpha, beta = _bwd_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, 0, BLOCK_C)
    xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, tl.arange(0, BLOCK_S), S, sS,
                                      mean, rstd, alpha, beta, silu)
    P = tl.sum(dm, 1)
    Q = tl.sum(dm * xhat, 1)
    R = tl.sum(xhat, 1)
    n = tl.maximum(N, 1.0)
    m1 = tl.sum(alpha * P, 0) / n
    m2 = tl.sum(alpha * Q, 0) / n
    tl.store(dx_ptr + offs, _dx(xhat, dm, alpha, rstd, m1, m2).to(dx_ptr.dtype.element_ty), mask=mask)
    _store_channel_grads(P, Q, R, w, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask,
                         dwp_ptr, dbp_ptr, dadd_ptr, dscale_ptr, dshift_ptr)


# ---- split path: grid (B·G, channel blocks × spatial splits) ------------------------------------------------
@_kernel
def _fwd_stats_kernel(
    x_ptr, add_ptr, part_ptr, G, C, CPG, S, sB, sC, sS, N, n_sp, per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """part[:, bg, t] = (count, mean − K, M2) of this program's tiles; part has shape (3, B·G, splits)."""
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    add = tl.load(add_ptr + pidx, mask=cmask, other=0.0)
    k = _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, True)
    n_c = tl.minimum(CPG - cb * BLOCK_C, BLOCK_C).to(tl.float32)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for st in range(first, end):
        h, offs, mask = _load_h(x_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S), S, sS, True)
        n_t = n_c * tl.minimum(S - st * BLOCK_S, BLOCK_S).to(tl.float32)
        mean_t, dev, m2_t = tile_stats(tl.where(mask, h - k, 0.0), mask, n_t)
        count, mean, m2 = combine_summaries(count, mean, m2, n_t, mean_t, m2_t)
    n_splits = tl.num_programs(1)
    plane = tl.num_programs(0).to(tl.int64) * n_splits
    store_planes(part_ptr, bg.to(tl.int64) * n_splits + t, plane, count, mean, m2, None)


@_kernel
def _fwd_apply_kernel(
    x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, part_ptr, y_ptr, mean_ptr, rstd_ptr,
    G, C, CPG, S, sB, sC, sS, N, n_sp, per_split, eps, silu,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_BLOCK: tl.constexpr,
):
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    n_splits = tl.num_programs(1)
    plane = tl.num_programs(0).to(tl.int64) * n_splits
    count, mean_k, m2 = merge_summaries(part_ptr, bg.to(tl.int64) * n_splits, plane, n_splits, MERGE_BLOCK)
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
    k = _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, True)
    tl.store(mean_ptr + bg, k + mean_k, mask=t == 0)
    tl.store(rstd_ptr + bg, rstd, mask=t == 0)
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    add = tl.load(add_ptr + pidx, mask=cmask, other=0.0)
    w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, True)
    a = (alpha * rstd)[:, None]
    for st in range(first, end):
        h, offs, mask = _load_h(x_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S), S, sS, True)
        y = _activation(tl.where(mask, (h - k) - mean_k, 0.0) * a + beta[:, None], silu)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_kernel
def _bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    G, C, CPG, S, sB, sC, sS, n_sp, per_split, silu,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """part[:, bg, sp, c] = (P, Q, R) of this program's tiles; part has shape (3, B·G, n_sp, C/G)."""
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    cmask, chan, pidx, row_off, add, mean, rstd, w, bias, gain, alpha, beta = _bwd_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    acc_p = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_q = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_r = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for st in range(first, end):
        xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S),
                                          S, sS, mean, rstd, alpha, beta, silu)
        acc_p += dm
        acc_q += dm * xhat
        acc_r += xhat
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    off = (bg.to(tl.int64) * n_sp + (t - cb * n_sp)) * CPG + c
    store_planes(part_ptr, off, tl.num_programs(0).to(tl.int64) * n_sp * CPG, tl.sum(acc_p, 1), tl.sum(acc_q, 1),
                 tl.sum(acc_r, 1), cmask)


@triton.jit
def _channel_sums(part_ptr, bg, CPG, n_sp, cb, BLOCK: tl.constexpr):
    """(P, Q, R) of channel block cb of the row bg: the reduce kernel's partials summed over splits in order."""
    c = cb * BLOCK + tl.arange(0, BLOCK)
    plane = tl.num_programs(0).to(tl.int64) * n_sp * CPG
    return sum_planes(part_ptr, bg.to(tl.int64) * n_sp * CPG + c, plane, CPG, n_sp, c < CPG)


@_kernel
def _bwd_finalize_kernel(
    part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, rstd_ptr, coef_ptr,
    dwp_ptr, dbp_ptr, dadd_ptr, dscale_ptr, dshift_ptr, G, C, CPG, S, N, n_sp,
    BLOCK: tl.constexpr,
):
    """Per row bg: the per-(b, c) gradients, and coef[bg] = (m1, m2) for the dx kernel."""
    bg = tl.program_id(0)
    rstd = tl.load(rstd_ptr + bg)
    n = tl.maximum(N, 1.0)
    m1 = 0.0
    m2 = 0.0
    for cb in range(0, tl.cdiv(CPG, BLOCK)):
        cmask, chan, pidx, _ = _channels(bg, G, C, CPG, 0, 0, cb, BLOCK)
        P, Q, R = _channel_sums(part_ptr, bg, CPG, n_sp, cb, BLOCK)
        w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, True)
        m1 += tl.sum(alpha * P, 0)
        m2 += tl.sum(alpha * Q, 0)
    m1 = m1 / n
    m2 = m2 / n
    tl.store(coef_ptr + 2 * bg, m1)
    tl.store(coef_ptr + 2 * bg + 1, m2)
    for cb in range(0, tl.cdiv(CPG, BLOCK)):
        cmask, chan, pidx, _ = _channels(bg, G, C, CPG, 0, 0, cb, BLOCK)
        P, Q, R = _channel_sums(part_ptr, bg, CPG, n_sp, cb, BLOCK)
        w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, True)
        _store_channel_grads(P, Q, R, w, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask,
                             dwp_ptr, dbp_ptr, dadd_ptr, dscale_ptr, dshift_ptr)


@_kernel
def _bwd_dx_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, coef_ptr, dx_ptr,
    G, C, CPG, S, sB, sC, sS, n_sp, per_split, silu,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    cmask, chan, pidx, row_off, add, mean, rstd, w, bias, gain, alpha, beta = _bwd_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    m1 = tl.load(coef_ptr + 2 * bg)
    m2 = tl.load(coef_ptr + 2 * bg + 1)
    for st in range(first, end):
        xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S),
                                          S, sS, mean, rstd, alpha, beta, silu)
        tl.store(dx_ptr + offs, _dx(xhat, dm, alpha, rstd, m1, m2).to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------------------
def _geometry(x, num_groups):
    """(B, C/G, S, the kernels' shape arguments (G, C, C/G, S, sB, sC, sS), the group's element count N = C/G·S as a
    float) of x read as (B, C, S); the op hands over x with collapsible spatial dims."""
    batch, channels = x.shape[:2]
    cpg, spatial = channels // num_groups, math.prod(x.shape[2:])
    shape = (num_groups, channels, cpg, spatial, *x.view(batch, channels, spatial).stride())
    return batch, cpg, spatial, shape, float(cpg * spatial)


def _fp32(t):
    return t.to(torch.float32).contiguous()


def _affine(weight, bias, x):
    """weight and bias as fp32 (C,) tensors; absent ones as ones and zeros."""
    channels = x.shape[1]
    w = _fp32(weight) if weight is not None else torch.ones(channels, dtype=torch.float32, device=x.device)
    b = _fp32(bias) if bias is not None else torch.zeros(channels, dtype=torch.float32, device=x.device)
    return w, b


def _conditioning(x, add, scale, shift, materialize: bool):
    """add, scale, shift as fp32 (B, C) tensors, or None where the kernel's flag is off (HAS_ADD, HAS_SCALE_SHIFT).
    A missing one of scale and shift (or, with ``materialize``, any missing one) becomes zeros, one tensor for all."""
    has_scale_shift = materialize or scale is not None or shift is not None
    inputs = ((add, materialize or add is not None), (scale, has_scale_shift), (shift, has_scale_shift))
    zeros = (torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
             if any(t is None and flag for t, flag in inputs) else None)
    return tuple(_fp32(t) if t is not None else zeros if flag else None for t, flag in inputs)


def _or(t, placeholder):
    return placeholder if t is None else t


def group_norm_silu(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    """Launcher of the forward: (y, mean, rstd) like ``genfast.reference.group_norm_silu.group_norm_silu``."""
    batch, cpg, spatial, shape, n = _geometry(x, num_groups)
    rows = batch * num_groups
    y = torch.empty_like(x)
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows == 0:
        return y, mean, rstd
    plan = _plan(cpg, spatial, rows)
    w, b = _affine(weight, bias, x)
    add, scale, shift = _conditioning(x, add, scale, shift, materialize=not plan.single)
    if plan.single:
        _fwd_single_kernel[(rows,)](
            x, w, b, _or(add, w), _or(scale, w), _or(shift, w), y, mean, rstd, *shape, n, eps, int(silu),
            HAS_ADD=add is not None, HAS_SCALE_SHIFT=scale is not None, BLOCK_C=plan.block_c,
            BLOCK_S=plan.block_s, num_warps=plan.num_warps,
        )
        return y, mean, rstd
    grid = (rows, plan.n_cblocks * plan.n_sp)
    part = torch.empty((3, rows, grid[1]), dtype=torch.float32, device=x.device)
    _fwd_stats_kernel[grid](x, add, part, *shape, n, plan.n_sp, plan.per_split, BLOCK_C=plan.block_c,
                            BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    _fwd_apply_kernel[grid](x, w, b, add, scale, shift, part, y, mean, rstd, *shape, n, plan.n_sp, plan.per_split, eps,
                            int(silu), BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, MERGE_BLOCK=MERGE_BLOCK,
                            num_warps=plan.num_warps)
    return y, mean, rstd


def group_norm_silu_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    """Launcher of the backward: (dx, dweight, dbias, dadd, dscale, dshift), an absent input's gradient empty.
    ``grad_y`` has x's strides and dtype. add, scale and shift are materialised (zeros when absent): the backward
    kernels carry no flags, since those inputs and their gradients are (B, C) tensors, no memory traffic."""
    batch, cpg, spatial, shape, n = _geometry(x, num_groups)
    rows = batch * num_groups
    dx = torch.empty_like(x)
    dwp, dbp, dadd, dscale, dshift = (torch.empty(x.shape[:2], dtype=torch.float32, device=x.device) for _ in range(5))
    if rows:
        plan = _plan(cpg, spatial, rows)
        w, b = _affine(weight, bias, x)
        add_k, scale_k, shift_k = _conditioning(x, add, scale, shift, materialize=True)
        args = (w, b, add_k, scale_k, shift_k, mean, rstd)
        blocks = dict(BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
        if plan.single:
            _bwd_single_kernel[(rows,)](x, grad_y, *args, dx, dwp, dbp, dadd, dscale, dshift, *shape, n, int(silu),
                                        **blocks)
        else:
            grid = (rows, plan.n_cblocks * plan.n_sp)
            part = torch.empty((3, rows, plan.n_sp, cpg), dtype=torch.float32, device=x.device)
            coef = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
            _bwd_reduce_kernel[grid](x, grad_y, *args, part, *shape, plan.n_sp, plan.per_split, int(silu), **blocks)
            _bwd_finalize_kernel[(rows,)](part, w, b, scale_k, shift_k, rstd, coef, dwp, dbp, dadd, dscale, dshift,
                                          *shape[:4], n, plan.n_sp, BLOCK=FINALIZE_BLOCK,
                                          num_warps=FINALIZE_WARPS)
            _bwd_dx_kernel[grid](x, grad_y, *args, coef, dx, *shape, plan.n_sp, plan.per_split, int(silu), **blocks)
    return (dx, optional_grad(dwp.sum(0), weight, x), optional_grad(dbp.sum(0), bias, x), optional_grad(dadd, add, x),
            optional_grad(dscale, scale, x), optional_grad(dshift, shift, x))


# ---- ahead-of-time variants ---------------------------------------------------------------------------------
# argument types other than the defaults of kernels/aot.py (x, y, dy, dx in the input dtype, ints i32)
_FP32_PTRS = ("w_ptr", "b_ptr", "add_ptr", "scale_ptr", "shift_ptr", "mean_ptr", "rstd_ptr", "part_ptr", "coef_ptr",
              "dwp_ptr", "dbp_ptr", "dadd_ptr", "dscale_ptr", "dshift_ptr")
_ARG_TYPES = dict.fromkeys(_FP32_PTRS, "*fp32") | {"N": "fp32", "eps": "fp32"}
# The launcher hands the kernels x as (B, C, S) with a contiguous spatial axis (NCHW) or channel axis (NHWC), and
# Triton specialises that stride of 1 into a constant: those are the variants that run.
_variants = functools.partial(aot.variants, types=_ARG_TYPES, unit_args=(("sS",), ("sC",)))


def _block_cs():
    return [1 << i for i in range(MIN_BLOCK_C.bit_length() - 1, MAX_BLOCK_C.bit_length())]


def aot_variants():
    """Every (kernel, signature, constexprs, num_warps) the launchers can pick, for the ahead-of-time compile test."""
    for dtype in ("fp32", "bf16", "fp16"):
        for block_c in _block_cs():
            for tile, num_warps in SINGLE_TILES:
                blocks = dict(BLOCK_C=block_c, BLOCK_S=tile // block_c)
                for has_add, has_scale_shift in itertools.product((0, 1), (0, 1)):
                    yield from _variants(_fwd_single_kernel, dtype,
                                         dict(blocks, HAS_ADD=has_add, HAS_SCALE_SHIFT=has_scale_shift), num_warps)
                yield from _variants(_bwd_single_kernel, dtype, blocks, num_warps)
            blocks = dict(BLOCK_C=block_c, BLOCK_S=SPLIT_TILE // block_c)
            for kernel in (_fwd_stats_kernel, _bwd_reduce_kernel, _bwd_dx_kernel):
                yield from _variants(kernel, dtype, blocks, SPLIT_WARPS)
            yield from _variants(_fwd_apply_kernel, dtype, dict(blocks, MERGE_BLOCK=MERGE_BLOCK), SPLIT_WARPS)
    yield from _variants(_bwd_finalize_kernel, "fp32", dict(BLOCK=FINALIZE_BLOCK), FINALIZE_WARPS)
