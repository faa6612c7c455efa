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
  and normalizes its tiles. Backward: a reduce kernel writes partial per-(b, c) sums; the dx kernel's programs
  each merge their row's partials into the two per-group coefficients (the first program of a row also writes its
  per-(b, c) gradients) and apply them: x is read twice forward, x and dy twice backward. NHWC groups of a width
  that is not a power of two take window tiles instead (kernels/group_norm_window.py), no lane idle.
The kernels that read add, scale or shift have the flags HAS_ADD / HAS_SCALE_SHIFT (absent inputs cost no
zero-filling launch); every kernel has the group's channel count CPG as a constant, so a group's first channel
(bg % G)·CPG has a known divisibility and NHWC tiles load and store vectors. weight, bias, add, scale and shift are
read in their own dtypes and computed in fp32.

Backward. With dm = dy·silu'(m), silu'(m) = σ(m)·(1 + m·(1 − σ(m))), per-(b, c) sums over space
    P = Σ dm,   Q = Σ dm·x̂,   R = Σ x̂,
and per group (N = C/G·S elements, dx̂ = α·dm)   m1 = Σ_c α·P / N = mean_g(dx̂),   m2 = Σ_c α·Q / N = mean_g(dx̂·x̂):
    dx = rstd·(α·dm − m1 − x̂·m2)          dadd = Σ_s dx = rstd·(α·P − S·m1 − R·m2)
    dshift = P    dscale = w·Q + b·P     dweight = Σ_b (1 + scale)·Q    dbias = Σ_b (1 + scale)·P
The kernels write (1 + scale)·Q and (1 + scale)·P per (b, c); a small kernel sums them over b in a fixed order.
"""
import functools
import inspect
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from genfast._shared import optional_grad

from .stats import combine_summaries, merge_summaries, store_planes, sum_planes, sum_rows_kernel, tile_stats

# ---- heuristics: the one place tiles, splits and warps are chosen -------------------------------------------
MAX_BLOCK_C = 64  # a tile's channel extent: the next power of two of the group's channels, at most this; groups of
# more channels take the split path in blocks of MAX_BLOCK_C
MAX_SINGLE_TILE = 8192  # a group whose padded tile (block_c × next power of two of S) has at most this many
SINGLE_ELEMENTS_PER_THREAD = 16  # elements takes one pass, with tile / (32 · this) warps (1 to 16)
SPLIT_TILE, SPLIT_WARPS = 2048, 4  # the tile of one loop step of the split kernels
SPLIT_PROGRAMS_PER_SM = 4  # the split path cuts a group's spatial extent until the grid has this many programs a SM
DEFAULT_SMS = 132  # an H100 / H200, for CPU tensors (the interpreter, the static report)
MERGE_BLOCK = 128  # split partials merged per step by the forward apply kernel
FINALIZE_BLOCK = 128  # channels per step of the split backward's merge of its partials
PARAM_BLOCK = 128  # channels per program of the dweight / dbias reduction over the batch
SPLIT_DX_MAXNREG = 80  # the split dx kernel's register cap: left to itself ptxas picks 32 and spills in the NCHW
# variants with add (fp16); 64 spills in NHWC ones; 80 spills in none and keeps 6 CTAs a SM
# the pointers of x-sized tensors, whose traffic is the op's bytes (read by `genfast bench --static`)
STREAMED = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")


class _Plan(NamedTuple):
    single: bool
    block_c: int
    block_s: int
    num_warps: int
    n_cblocks: int = 1  # split path: channel blocks per group ...
    n_sp: int = 1  # ... spatial splits per channel block ...
    per_split: int = 1  # ... and tiles per spatial split
    window: bool = False  # split path in window tiles (kernels/group_norm_window.py): block_c channels of a sample


def _plan(channels_per_group: int, spatial: int, rows: int, channels_contiguous: bool = False,
          sms: int | None = None, channels: int = 0) -> _Plan:
    """The path and tiling for groups of ``channels_per_group`` × ``spatial`` elements, ``rows`` = B·G groups. On
    the split path channel blocks of a layout whose channels are not contiguous (NCHW) divide the group's channels
    (no idle lanes for 10 channels a group: blocks of 2); NHWC blocks cover them (a power of two), and groups of
    other widths take windows of a power of two dividing all ``channels`` (C) and spanning several groups."""
    block_c = triton.next_power_of_2(max(channels_per_group, 1))
    block_s = triton.next_power_of_2(max(spatial, 1))
    if block_c <= MAX_BLOCK_C and block_c * block_s <= MAX_SINGLE_TILE:
        num_warps = min(16, max(1, block_c * block_s // (32 * SINGLE_ELEMENTS_PER_THREAD)))
        return _Plan(True, block_c, block_s, num_warps)
    dividing = max(1, channels_per_group & -channels_per_group)  # the largest power of two dividing it (C = 0: 1)
    window = min(channels & -channels, MAX_BLOCK_C)
    windowed = channels_contiguous and dividing < channels_per_group <= window  # CPG not a power of two
    block_c = window if windowed else min(block_c if channels_contiguous else dividing, MAX_BLOCK_C)
    block_s = max(1, SPLIT_TILE // block_c)
    n_cblocks = channels // window if windowed else triton.cdiv(channels_per_group, block_c)
    rows = rows * channels_per_group // channels if windowed else rows  # windows: programs per sample
    n_tiles = max(1, triton.cdiv(spatial, block_s))
    n_sp = max(1, min(n_tiles, triton.cdiv(SPLIT_PROGRAMS_PER_SM * (sms or DEFAULT_SMS), rows * n_cblocks)))
    per_split = triton.cdiv(n_tiles, n_sp)
    return _Plan(False, block_c, block_s, SPLIT_WARPS, n_cblocks, triton.cdiv(n_tiles, per_split), per_split,
                 windowed)


# Split counts stay out of Triton's value specialisation (a 1 would compile one more
# variant). Sizes and strides specialise: a stride of 1 vectorises a tile's contiguous axis, and sizes divisible by
# 16 let masked tiles vectorise. So no kernel converts an int argument to float (a size of 1 arrives as a
# constexpr): the group's element count N comes as a float argument.
_UNSPECIALIZED = ("n_sp", "per_split")


def _kernel(fn):
    return triton.jit(fn, do_not_specialize=[n for n in inspect.signature(fn).parameters if n in _UNSPECIALIZED])


# ---- helpers ------------------------------------------------------------------------------------------------
@triton.jit
def _group_start(bg, G, C, CPG: tl.constexpr, sB, sC):
    """(index of (b, first channel of g) in a (B, C) tensor, memory offset of that channel) for the row bg."""
    b = (bg // G).to(tl.int64)
    chan0 = (bg % G).to(tl.int64) * CPG
    return b * C + chan0, b * sB + chan0 * sC


@triton.jit
def _channels(bg, G, C, CPG: tl.constexpr, sB, sC, cb, BLOCK_C: tl.constexpr):
    """Channel block cb of the row bg: (mask, channel index, (b, c) index, memory offset of each channel)."""
    pidx0, off0 = _group_start(bg, G, C, CPG, sB, sC)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < CPG
    return cmask, (bg % G) * CPG + c, pidx0 + c, off0 + c.to(tl.int64) * sC


@triton.jit
def _pivot(x_ptr, add_ptr, bg, G, C, CPG: tl.constexpr, sB, sC, N, HAS_ADD: tl.constexpr):
    """K = h at the group's first element (0 for an empty group): the pivot the statistics are taken about."""
    pidx0, off0 = _group_start(bg, G, C, CPG, sB, sC)
    nonempty = N > 0
    k = tl.load(x_ptr + off0, mask=nonempty, other=0.0).to(tl.float32)
    if HAS_ADD:
        k += tl.load(add_ptr + pidx0, mask=nonempty, other=0.0).to(tl.float32)
    return k


@triton.jit
def _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, HAS_SCALE_SHIFT: tl.constexpr):
    """Per channel: (w, b, gain = 1 + scale, α = w·gain, β = b·gain + shift); m = x̂·α + β."""
    w = tl.load(w_ptr + chan, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + chan, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE_SHIFT:
        gain = 1.0 + tl.load(scale_ptr + pidx, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + pidx, mask=cmask, other=0.0).to(tl.float32)
        return w, bias, gain, w * gain, bias * gain + shift
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
def _activation(m, SILU: tl.constexpr):
    if SILU:
        return m * tl.sigmoid(m)
    return m


@triton.jit
def _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, s, S, sS, mean, rstd, alpha, beta, SILU: tl.constexpr,
               HAS_ADD: tl.constexpr):
    """(x̂, dm = dy·silu'(x̂·α + β), offsets, mask) on a tile, x̂ and dm 0 outside the group."""
    h, offs, mask = _load_h(x_ptr, row_off, cmask, add, s, S, sS, HAS_ADD)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = xhat * alpha[:, None] + beta[:, None]
    sig = tl.sigmoid(m)
    if SILU:
        dy = dy * sig * (1.0 + m * (1.0 - sig))
    return xhat, dy, offs, mask


@triton.jit
def _load_add(add_ptr, pidx, cmask, HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr):
    if HAS_ADD:
        return tl.load(add_ptr + pidx, mask=cmask, other=0.0).to(tl.float32)
    return tl.zeros([BLOCK_C], tl.float32)


@triton.jit
def _bwd_setup(w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG: tl.constexpr, sB,
               sC, cb, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a backward program of the row bg needs for channel block cb: (cmask, chan, pidx, row_off, add, mean,
    rstd, w, bias, gain, alpha, beta)."""
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    add = _load_add(add_ptr, pidx, cmask, HAS_ADD, BLOCK_C)
    w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask,
                                               HAS_SCALE_SHIFT)
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
def _store_channel_grads(P, Q, R, w, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask, dparam_ptr, plane,
                         dadd_ptr, dscale_ptr, dshift_ptr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr):
    """The per-(b, c) gradients from the sums P, Q, R (see the module docstring): (1 + scale)·Q and (1 + scale)·P
    in the two planes of dparam, dadd, dscale and dshift in their inputs' dtypes."""
    tl.store(dparam_ptr + pidx, gain * Q, mask=cmask)
    tl.store(dparam_ptr + plane + pidx, gain * P, mask=cmask)
    if HAS_ADD:
        dadd = rstd * (alpha * P - S * m1 - R * m2)
        tl.store(dadd_ptr + pidx, dadd.to(dadd_ptr.dtype.element_ty), mask=cmask)
    if HAS_SCALE_SHIFT:
        tl.store(dscale_ptr + pidx, (w * Q + bias * P).to(dscale_ptr.dtype.element_ty), mask=cmask)
        tl.store(dshift_ptr + pidx, P.to(dshift_ptr.dtype.element_ty), mask=cmask)


# ---- single pass: one program per group ---------------------------------------------------------------------
@_kernel
def _fwd_single_kernel(
    x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr,
    G, C, S, sB, sC, sS, N, eps,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, INNER: tl.constexpr,
):
    bg = tl.program_id(0)
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, 0, BLOCK_C)
    add = _load_add(add_ptr, pidx, cmask, HAS_ADD, BLOCK_C)
    k = _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, HAS_ADD)
    h, offs, mask = _load_h(x_ptr, row_off, cmask, add, tl.arange(0, BLOCK_S), S, sS, HAS_ADD)
    mean_k, dev, m2 = tile_stats(tl.where(mask, h - k, 0.0), mask, N, INNER)
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(N, 1.0) + eps)
    w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, HAS_SCALE_SHIFT)
    y = _activation(dev * (alpha * rstd)[:, None] + beta[:, None], SILU)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + bg, k + mean_k)
    tl.store(rstd_ptr + bg, rstd)


@_kernel
def _bwd_single_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dparam_ptr, dadd_ptr, dscale_ptr, dshift_ptr,
    G, C, S, sB, sC, sS, N,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0)
    cmask, chan, pidx, row_off, add, mean, rstd, w, bias, gain, alpha, beta = _bwd_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, 0, HAS_ADD,
        HAS_SCALE_SHIFT, BLOCK_C)
    xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, tl.arange(0, BLOCK_S), S, sS,
                                      mean, rstd, alpha, beta, SILU, HAS_ADD)
    P = tl.sum(dm, 1)
    Q = tl.sum(dm * xhat, 1)
    R = tl.sum(xhat, 1)
    n = tl.maximum(N, 1.0)
    m1 = tl.sum(alpha * P, 0) / n
    m2 = tl.sum(alpha * Q, 0) / n
    tl.store(dx_ptr + offs, _dx(xhat, dm, alpha, rstd, m1, m2).to(dx_ptr.dtype.element_ty), mask=mask)
    _store_channel_grads(P, Q, R, w, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask, dparam_ptr,
                         tl.num_programs(0).to(tl.int64) * CPG, dadd_ptr, dscale_ptr, dshift_ptr, HAS_ADD,
                         HAS_SCALE_SHIFT)


# ---- split path: grid (B·G, channel blocks × spatial splits) ------------------------------------------------
@_kernel
def _fwd_stats_kernel(
    x_ptr, add_ptr, part_ptr, G, C, S, sB, sC, sS, N, n_sp, per_split,
    CPG: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INNER: tl.constexpr,
):
    """part[:, bg, t] = (count, mean − K, M2) of this program's tiles; part has shape (3, B·G, splits)."""
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    add = _load_add(add_ptr, pidx, cmask, HAS_ADD, BLOCK_C)
    k = _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, HAS_ADD)
    n_c = tl.minimum(CPG - cb * BLOCK_C, BLOCK_C).to(tl.float32)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for st in range(first, end):
        h, offs, mask = _load_h(x_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S), S, sS, HAS_ADD)
        n_t = n_c * tl.minimum(S - st * BLOCK_S, BLOCK_S).to(tl.float32)
        mean_t, dev, m2_t = tile_stats(tl.where(mask, h - k, 0.0), mask, n_t, INNER)
        count, mean, m2 = combine_summaries(count, mean, m2, n_t, mean_t, m2_t)
    n_splits = tl.num_programs(1)
    plane = tl.num_programs(0).to(tl.int64) * n_splits
    store_planes(part_ptr, bg.to(tl.int64) * n_splits + t, plane, count, mean, m2, None)


@_kernel
def _fwd_apply_kernel(
    x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, part_ptr, y_ptr, mean_ptr, rstd_ptr,
    G, C, S, sB, sC, sS, N, n_sp, per_split, eps,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, MERGE_BLOCK: tl.constexpr,
):
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    n_splits = tl.num_programs(1)
    plane = tl.num_programs(0).to(tl.int64) * n_splits
    count, mean_k, m2 = merge_summaries(part_ptr, bg.to(tl.int64) * n_splits, plane, n_splits, MERGE_BLOCK)
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
    k = _pivot(x_ptr, add_ptr, bg, G, C, CPG, sB, sC, N, HAS_ADD)
    tl.store(mean_ptr + bg, k + mean_k, mask=t == 0)
    tl.store(rstd_ptr + bg, rstd, mask=t == 0)
    cmask, chan, pidx, row_off = _channels(bg, G, C, CPG, sB, sC, cb, BLOCK_C)
    add = _load_add(add_ptr, pidx, cmask, HAS_ADD, BLOCK_C)
    w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask, HAS_SCALE_SHIFT)
    a = (alpha * rstd)[:, None]
    for st in range(first, end):
        h, offs, mask = _load_h(x_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S), S, sS, HAS_ADD)
        y = _activation(tl.where(mask, (h - k) - mean_k, 0.0) * a + beta[:, None], SILU)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_kernel
def _bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    G, C, S, sB, sC, sS, n_sp, per_split,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """part[:, bg, sp, c] = (P, Q, R) of this program's tiles; part has shape (3, B·G, n_sp, C/G)."""
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    cmask, chan, pidx, row_off, add, mean, rstd, w, bias, gain, alpha, beta = _bwd_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, cb, HAS_ADD,
        HAS_SCALE_SHIFT, BLOCK_C)
    acc_p = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_q = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_r = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for st in range(first, end):
        xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S),
                                          S, sS, mean, rstd, alpha, beta, SILU, HAS_ADD)
        acc_p += dm
        acc_q += dm * xhat
        acc_r += xhat
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    off = (bg.to(tl.int64) * n_sp + (t - cb * n_sp)) * CPG + c
    store_planes(part_ptr, off, tl.num_programs(0).to(tl.int64) * n_sp * CPG, tl.sum(acc_p, 1), tl.sum(acc_q, 1),
                 tl.sum(acc_r, 1), cmask)


@triton.jit
def _channel_sums(part_ptr, bg, rows, CPG: tl.constexpr, n_sp, cb, BLOCK: tl.constexpr):
    """(P, Q, R) of channel block cb of the row bg: the reduce kernel's partials summed over splits in order."""
    c = cb * BLOCK + tl.arange(0, BLOCK)
    plane = rows.to(tl.int64) * n_sp * CPG
    return sum_planes(part_ptr, bg.to(tl.int64) * n_sp * CPG + c, plane, CPG, n_sp, c < CPG)


@triton.jit
def _finalize(part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, rstd, dparam_ptr, dadd_ptr, dscale_ptr, dshift_ptr,
              bg, rows, G, C, S, N, n_sp, write, CPG: tl.constexpr, HAS_ADD: tl.constexpr,
              HAS_SCALE_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """(m1, m2) of the row bg from the reduce kernel's partials, and, where ``write``, its per-(b, c) gradients."""
    n = tl.maximum(N, 1.0)
    m1 = 0.0
    m2 = 0.0
    for cb in range(0, tl.cdiv(CPG, BLOCK)):
        cmask, chan, pidx, _ = _channels(bg, G, C, CPG, 0, 0, cb, BLOCK)
        P, Q, R = _channel_sums(part_ptr, bg, rows, CPG, n_sp, cb, BLOCK)
        w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask,
                                                   HAS_SCALE_SHIFT)
        m1 += tl.sum(alpha * P, 0)
        m2 += tl.sum(alpha * Q, 0)
    m1 = m1 / n
    m2 = m2 / n
    if write:
        for cb in range(0, tl.cdiv(CPG, BLOCK)):
            cmask, chan, pidx, _ = _channels(bg, G, C, CPG, 0, 0, cb, BLOCK)
            P, Q, R = _channel_sums(part_ptr, bg, rows, CPG, n_sp, cb, BLOCK)
            w, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, chan, pidx, cmask,
                                                       HAS_SCALE_SHIFT)
            _store_channel_grads(P, Q, R, w, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask, dparam_ptr,
                                 rows.to(tl.int64) * CPG, dadd_ptr, dscale_ptr, dshift_ptr, HAS_ADD, HAS_SCALE_SHIFT)
    return m1, m2


@_kernel
def _bwd_dx_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr, dx_ptr,
    dparam_ptr, dadd_ptr, dscale_ptr, dshift_ptr, G, C, S, sB, sC, sS, N, n_sp, per_split,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, FINALIZE_BLOCK: tl.constexpr,
):
    """dx of this program's tiles; each program merges its row's partials into (m1, m2) itself, and the first
    program of the row also writes the row's per-(b, c) gradients."""
    bg, t, cb, first, end = _split(n_sp, per_split, S, BLOCK_S)
    cmask, chan, pidx, row_off, add, mean, rstd, w, bias, gain, alpha, beta = _bwd_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, bg, G, C, CPG, sB, sC, cb, HAS_ADD,
        HAS_SCALE_SHIFT, BLOCK_C)
    m1, m2 = _finalize(part_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, rstd, dparam_ptr, dadd_ptr, dscale_ptr,
                       dshift_ptr, bg, tl.num_programs(0), G, C, S, N, n_sp, t == 0, CPG, HAS_ADD, HAS_SCALE_SHIFT,
                       FINALIZE_BLOCK)
    for st in range(first, end):
        xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, row_off, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S),
                                          S, sS, mean, rstd, alpha, beta, SILU, HAS_ADD)
        tl.store(dx_ptr + offs, _dx(xhat, dm, alpha, rstd, m1, m2).to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------------------
def _geometry(x, num_groups):
    """(B, C/G, S, the kernels' shape arguments (G, C, S, sB, sC, sS), the group's element count N = C/G·S as a
    float) of x read as (B, C, S); the op hands over x with collapsible spatial dims."""
    batch, channels = x.shape[:2]
    cpg, spatial = channels // num_groups, math.prod(x.shape[2:])
    shape = (num_groups, channels, spatial, *x.view(batch, channels, spatial).stride())
    return batch, cpg, spatial, shape, float(cpg * spatial)


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None (the plan's DEFAULT_SMS) for other devices."""
    return _cuda_sm_count(device.index) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _channels_contiguous(shape) -> bool:
    """Whether the kernels' shape arguments (G, C, S, sB, sC, sS) are those of a channels-last (NHWC) x."""
    return shape[4] == 1 and shape[5] != 1


def _inputs(x, weight, bias, add, scale, shift):
    """(w, b, add, scale, shift, flags) for the kernels: (C,) and (B, C) tensors contiguous in their own dtypes
    (loaded as fp32), absent weight / bias as ones / zeros, a missing one of scale and shift as zeros, and the
    flags HAS_ADD and HAS_SCALE_SHIFT; a pointer behind a flag that is off gets x (never read)."""
    channels = x.shape[1]
    w = weight.contiguous() if weight is not None else torch.ones(channels, dtype=torch.float32, device=x.device)
    b = bias.contiguous() if bias is not None else torch.zeros(channels, dtype=torch.float32, device=x.device)
    if (scale is None) != (shift is None):
        zeros = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        scale, shift = (zeros if t is None else t for t in (scale, shift))
    flags = dict(HAS_ADD=add is not None, HAS_SCALE_SHIFT=scale is not None)
    add, scale, shift = (t.contiguous() if t is not None else x for t in (add, scale, shift))
    return w, b, add, scale, shift, flags


def _launch_setup(x, num_groups, silu, flags):
    """(rows B·G, the plan, the kernels' shape arguments, N, the constexprs every kernel of the plan takes)."""
    batch, cpg, spatial, shape, n = _geometry(x, num_groups)
    rows = batch * num_groups
    plan = _plan(cpg, spatial, rows, channels_contiguous=_channels_contiguous(shape), sms=_sm_count(x.device),
                 channels=shape[1])
    blocks = dict(CPG=cpg, SILU=bool(silu), **flags, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                  num_warps=plan.num_warps)
    return rows, plan, shape, n, blocks


def group_norm_silu(x, weight, bias, add, scale, shift, num_groups, eps, silu):
    """Launcher of the forward: (y, mean, rstd) like ``genfast.reference.group_norm_silu.group_norm_silu``."""
    y = torch.empty_like(x)
    mean = torch.empty((x.shape[0], num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.shape[0] == 0:
        return y, mean, rstd
    w, b, add, scale, shift, flags = _inputs(x, weight, bias, add, scale, shift)
    rows, plan, shape, n, blocks = _launch_setup(x, num_groups, silu, flags)
    inner = 0 if _channels_contiguous(shape) else 1  # the tile axis a thread's values run along: C in NHWC
    if plan.single:
        _fwd_single_kernel[(rows,)](x, w, b, add, scale, shift, y, mean, rstd, *shape, n, eps, INNER=inner, **blocks)
        return y, mean, rstd
    if plan.window:
        return _window.forward(x, w, b, add, scale, shift, y, mean, rstd, shape, eps, plan, blocks)
    grid = (rows, plan.n_cblocks * plan.n_sp)
    part = torch.empty((3, rows, grid[1]), dtype=torch.float32, device=x.device)
    stats_blocks = {k: v for k, v in blocks.items() if k not in ("HAS_SCALE_SHIFT", "SILU")}
    _fwd_stats_kernel[grid](x, add, part, *shape, n, plan.n_sp, plan.per_split, INNER=inner, **stats_blocks)
    _fwd_apply_kernel[grid](x, w, b, add, scale, shift, part, y, mean, rstd, *shape, n, plan.n_sp, plan.per_split, eps,
                            MERGE_BLOCK=MERGE_BLOCK, **blocks)
    return y, mean, rstd


def group_norm_silu_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups, silu):
    """Launcher of the backward: (dx, dweight, dbias, dadd, dscale, dshift), an absent input's gradient empty.
    ``grad_y`` has x's strides and dtype. The kernels write (1 + scale)·Q and (1 + scale)·P per (b, c) into the two
    planes of one (2, B, C) buffer, summed over b by one small kernel; dadd, dscale, dshift in their inputs'
    dtypes."""
    dx = torch.empty_like(x)
    dparam = torch.empty((2, *x.shape[:2]), dtype=torch.float32, device=x.device)
    w, b, add_k, scale_k, shift_k, flags = _inputs(x, weight, bias, add, scale, shift)
    # gradient buffers of the kernels' add, scale, shift (x where the flag is off: never written)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if on else x
             for t, on in ((add_k, flags["HAS_ADD"]), (scale_k, flags["HAS_SCALE_SHIFT"]),
                           (shift_k, flags["HAS_SCALE_SHIFT"]))]
    if x.shape[0]:
        rows, plan, shape, n, blocks = _launch_setup(x, num_groups, silu, flags)
        args = (w, b, add_k, scale_k, shift_k, mean, rstd)
        if plan.single:
            _bwd_single_kernel[(rows,)](x, grad_y, *args, dx, dparam, *grads, *shape, n, **blocks)
        elif plan.window:
            _window.backward(grad_y, x, args, dx, dparam, grads, shape, n, plan, blocks)
        else:
            grid = (rows, plan.n_cblocks * plan.n_sp)
            part = torch.empty((3, rows, plan.n_sp, blocks["CPG"]), dtype=torch.float32, device=x.device)
            _bwd_reduce_kernel[grid](x, grad_y, *args, part, *shape, plan.n_sp, plan.per_split, **blocks)
            _bwd_dx_kernel[grid](x, grad_y, *args, part, dx, dparam, *grads, *shape, n, plan.n_sp, plan.per_split,
                                 FINALIZE_BLOCK=FINALIZE_BLOCK, maxnreg=SPLIT_DX_MAXNREG, **blocks)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    if weight is not None or bias is not None:
        channels = x.shape[1]
        sum_rows_kernel[(triton.cdiv(channels, PARAM_BLOCK),)](
            dparam[0], dparam[1], dweight if weight is not None else dparam[0],
            dbias if bias is not None else dparam[1], x.shape[0], channels, BLOCK=PARAM_BLOCK)
    dadd, dscale, dshift = grads
    return (dx, dweight, dbias, optional_grad(dadd, add, x), optional_grad(dscale, scale, x),
            optional_grad(dshift, shift, x))


from . import group_norm_window as _window  # noqa: E402  (its kernels use the helpers above)
