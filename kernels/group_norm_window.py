"""GroupNorm + SiLU window tiles: the split path of a channels-last x whose groups are not a power of two channels
wide (10, 12, 20, 40 channels a group), no lane idle.

A tile is [W channels, BLOCK_S positions] of one sample, W a power of two dividing C (at most MAX_BLOCK_C, at least
the group's channels), so it covers W / CPG groups and parts of the groups at its edges: every lane holds a channel
and a row of W channels loads as 16-byte vectors, where a tile of one group (the split path of kernels/
group_norm_silu.py) leaves 6 of 16 lanes idle for 10 channels and loads 2-element vectors. A window's SLOTS are the
groups it touches (g_lo + j); per-channel sums over a tile are folded into per-slot sums (and per-slot values spread
back to channels) by a [W, SLOTS] one-hot selection. A group spans at most two windows (W ≥ CPG): its pieces.

- forward: a stats kernel writes per (sample, window, split, slot) the (count, mean − K, M2) of its tiles (K = h at
  the group's first element, as in kernels/group_norm_silu.py); the apply kernel merges, for each of its slots, the
  partials of the group's two pieces over all splits in a fixed order (pieces, then splits) and normalizes.
- backward: a reduce kernel writes per-(sample, split, channel) sums P, Q, R (see kernels/group_norm_silu.py); each
  dx program sums the splits of the channels of its slots' groups, folds α·P, α·Q into m1, m2 per slot, and the first
  split of a window writes the per-(b, c) gradients of its channels. A group's m1, m2 are summed in each window that
  touches it, in that window's channel order: the two may differ in the last bit (each is reproducible run to run).
Launches as the split path's: 2 forward, 3 backward (with the dweight / dbias sum).
"""
import triton
import triton.language as tl

from .group_norm_silu import (_activation, _coefficients, _dx, _kernel, _load_add, _load_h, _store_channel_grads,
                              _tile_grad)
from .stats import combine_summaries, store_planes, sum_planes

STREAMED = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")
MERGE_SPLITS = 32  # splits merged a step by the apply kernel, per slot and piece


def slots(cpg: int, window: int) -> tuple[int, int]:
    """(SLOTS: a power of two ≥ the groups a window of ``window`` channels can touch, SPAN: a power of two ≥ their
    channels)."""
    touched = (window + cpg - 2) // cpg + 1
    return triton.next_power_of_2(touched), triton.next_power_of_2(touched * cpg)


@triton.jit
def _window(C, CPG: tl.constexpr, W: tl.constexpr, SLOTS: tl.constexpr):
    """(sample b, window w, its channels c, their slots' one-hot [W, SLOTS], first slot's group g_lo)."""
    n_win = C // W
    pid = tl.program_id(0)
    b = (pid // n_win).to(tl.int64)
    w = pid % n_win
    c = w * W + tl.arange(0, W)
    g_lo = (w * W) // CPG
    onehot = (c // CPG - g_lo)[:, None] == tl.arange(0, SLOTS)[None, :]
    return b, w, c, onehot, g_lo


@triton.jit
def _fold(v, onehot):
    """Per-channel values [W] summed into their slots [SLOTS]."""
    return tl.sum(tl.where(onehot, v[:, None], 0.0), 0)


@triton.jit
def _spread(v, onehot):
    """Per-slot values [SLOTS] given to their channels [W]."""
    return tl.sum(tl.where(onehot, v[None, :], 0.0), 1)


@triton.jit
def _pivots(x_ptr, add_ptr, b, g_lo, C, sB, sC, CPG: tl.constexpr, HAS_ADD: tl.constexpr, SLOTS: tl.constexpr):
    """K = h at the first element of each slot's group, by scalar loads (one address a slot)."""
    j = tl.arange(0, SLOTS)
    kv = tl.zeros([SLOTS], tl.float32)
    for i in tl.static_range(SLOTS):
        chan = ((g_lo + i) * CPG).to(tl.int64)
        ok = chan < C
        k = tl.load(x_ptr + b * sB + chan * sC, mask=ok, other=0.0).to(tl.float32)
        if HAS_ADD:
            k += tl.load(add_ptr + b * C + chan, mask=ok, other=0.0).to(tl.float32)
        kv = tl.where(j == i, k, kv)
    return kv


@triton.jit
def _tiles(S, n_sp, per_split, BLOCK_S: tl.constexpr):
    sp = tl.program_id(1)
    first = sp * per_split
    return sp, first, tl.minimum(first + per_split, tl.cdiv(S, BLOCK_S))


@_kernel
def _win_stats_kernel(
    x_ptr, add_ptr, part_ptr, G, C, S, sB, sC, sS, n_sp, per_split,
    CPG: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SLOTS: tl.constexpr,
):
    """part[:, b, w, sp, j] = (count, mean − K, M2) of slot j over this program's tiles: shape (3, B, C/W, n_sp,
    SLOTS), every entry written (0, 0, 0 for a slot without channels here)."""
    b, w, c, onehot, g_lo = _window(C, CPG, BLOCK_C, SLOTS)
    sp, first, end = _tiles(S, n_sp, per_split, BLOCK_S)
    cmask = c < C
    add = _load_add(add_ptr, b * C + c, cmask, HAS_ADD, BLOCK_C)
    kc = _spread(_pivots(x_ptr, add_ptr, b, g_lo, C, sB, sC, CPG, HAS_ADD, SLOTS), onehot)
    n_ch = _fold(tl.full([BLOCK_C], 1.0, tl.float32), onehot)
    count = tl.zeros([SLOTS], tl.float32)
    mean = tl.zeros([SLOTS], tl.float32)
    m2 = tl.zeros([SLOTS], tl.float32)
    for st in range(first, end):
        h, offs, mask = _load_h(x_ptr, b * sB + c.to(tl.int64) * sC, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S),
                                S, sS, HAS_ADD)
        d = tl.where(mask, h - kc[:, None], 0.0)
        n_t = n_ch * tl.minimum(S - st * BLOCK_S, BLOCK_S).to(tl.float32)
        mean_t = _fold(tl.sum(d, 1), onehot) / tl.maximum(n_t, 1.0)
        dev = tl.where(mask, d - _spread(mean_t, onehot)[:, None], 0.0)
        count, mean, m2 = combine_summaries(count, mean, m2, n_t, mean_t, _fold(tl.sum(dev * dev, 1), onehot))
    plane = tl.num_programs(0).to(tl.int64) * n_sp * SLOTS
    store_planes(part_ptr, (tl.program_id(0).to(tl.int64) * n_sp + sp) * SLOTS + tl.arange(0, SLOTS), plane, count,
                 mean, m2, None)


@triton.jit
def _merge_pieces(part_ptr, b, g, valid, C, n_sp, CPG: tl.constexpr, W: tl.constexpr, SLOTS: tl.constexpr,
                  MERGE_SPLITS: tl.constexpr):
    """(count, mean − K, M2) of the groups g [SLOTS] from the stats kernel's partials: their first piece's splits in
    order, then their second's."""
    n_win = C // W
    plane = (tl.num_programs(0) * n_sp * SLOTS).to(tl.int64)
    last = (g * CPG + CPG - 1) // W
    count = tl.zeros([SLOTS], tl.float32)
    mean = tl.zeros([SLOTS], tl.float32)
    m2 = tl.zeros([SLOTS], tl.float32)
    for p in tl.static_range(2):
        wp = (g * CPG) // W + p
        ok = valid & (wp <= last)
        base = ((b * n_win + wp) * n_sp) * SLOTS + (g - (wp * W) // CPG)
        for j0 in range(0, n_sp, MERGE_SPLITS):
            j = j0 + tl.arange(0, MERGE_SPLITS)
            m = ok[:, None] & (j < n_sp)[None, :]
            off = base[:, None] + (j * SLOTS)[None, :]
            n_j = tl.load(part_ptr + off, mask=m, other=0.0)
            mean_j = tl.load(part_ptr + plane + off, mask=m, other=0.0)
            m2_j = tl.load(part_ptr + 2 * plane + off, mask=m, other=0.0)
            n_b = tl.sum(n_j, 1)
            mean_b = tl.sum(n_j * mean_j, 1) / tl.maximum(n_b, 1.0)
            dm = mean_j - mean_b[:, None]
            count, mean, m2 = combine_summaries(count, mean, m2, n_b, mean_b, tl.sum(m2_j + n_j * dm * dm, 1))
    return count, mean, m2


@_kernel
def _win_apply_kernel(
    x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, part_ptr, y_ptr, mean_ptr, rstd_ptr,
    G, C, S, sB, sC, sS, n_sp, per_split, eps,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, SLOTS: tl.constexpr, MERGE_SPLITS: tl.constexpr,
):
    b, w, c, onehot, g_lo = _window(C, CPG, BLOCK_C, SLOTS)
    sp, first, end = _tiles(S, n_sp, per_split, BLOCK_S)
    g = g_lo + tl.arange(0, SLOTS)
    valid = (g * CPG < (w + 1) * BLOCK_C) & (g < G)  # the slot's group touches this window
    count, mean_k, m2 = _merge_pieces(part_ptr, b, g, valid, C, n_sp, CPG, BLOCK_C, SLOTS, MERGE_SPLITS)
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
    kv = _pivots(x_ptr, add_ptr, b, g_lo, C, sB, sC, CPG, HAS_ADD, SLOTS)
    first_window = valid & (g * CPG >= w * BLOCK_C) & (sp == 0)  # a group's statistics stored once
    tl.store(mean_ptr + b * G + g, kv + mean_k, mask=first_window)
    tl.store(rstd_ptr + b * G + g, rstd, mask=first_window)
    cmask = c < C
    pidx = b * C + c
    add = _load_add(add_ptr, pidx, cmask, HAS_ADD, BLOCK_C)
    _, _, _, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, c, pidx, cmask, HAS_SCALE_SHIFT)
    kc = _spread(kv, onehot)[:, None]
    mc = _spread(mean_k, onehot)[:, None]
    a = (alpha * _spread(rstd, onehot))[:, None]
    for st in range(first, end):
        h, offs, mask = _load_h(x_ptr, b * sB + c.to(tl.int64) * sC, cmask, add, st * BLOCK_S + tl.arange(0, BLOCK_S),
                                S, sS, HAS_ADD)
        y = _activation(tl.where(mask, (h - kc) - mc, 0.0) * a + beta[:, None], SILU)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_window_setup(w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, C, CPG: tl.constexpr,
                      HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
                      SLOTS: tl.constexpr):
    """(b, w, c, onehot, g_lo, cmask, pidx, add, mean, rstd, w, bias, gain, α, β), per channel of the window."""
    b, w, c, onehot, g_lo = _window(C, CPG, BLOCK_C, SLOTS)
    cmask = c < C
    pidx = b * C + c
    row = b * G + c // CPG
    add = _load_add(add_ptr, pidx, cmask, HAS_ADD, BLOCK_C)
    wt, bias, gain, alpha, beta = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, c, pidx, cmask, HAS_SCALE_SHIFT)
    return (b, w, c, onehot, g_lo, cmask, pidx, add, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), wt, bias, gain,
            alpha, beta)


@_kernel
def _win_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    G, C, S, sB, sC, sS, n_sp, per_split,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, SLOTS: tl.constexpr,
):
    """part[:, b, sp, c] = (P, Q, R) of this program's tiles; part has shape (3, B, n_sp, C)."""
    b, w, c, onehot, g_lo, cmask, pidx, add, mean, rstd, wt, bias, gain, alpha, beta = _bwd_window_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, C, CPG, HAS_ADD, HAS_SCALE_SHIFT, BLOCK_C,
        SLOTS)
    sp, first, end = _tiles(S, n_sp, per_split, BLOCK_S)
    acc_p = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_q = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_r = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for st in range(first, end):
        xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, b * sB + c.to(tl.int64) * sC, cmask, add,
                                          st * BLOCK_S + tl.arange(0, BLOCK_S), S, sS, mean[:, None], rstd[:, None],
                                          alpha, beta, SILU, HAS_ADD)
        acc_p += dm
        acc_q += dm * xhat
        acc_r += xhat
    n_batch = tl.num_programs(0) // (C // BLOCK_C)
    store_planes(part_ptr, (b * n_sp + sp) * C + c, n_batch.to(tl.int64) * n_sp * C, tl.sum(acc_p, 1),
                 tl.sum(acc_q, 1), tl.sum(acc_r, 1), cmask)


@_kernel
def _win_dx_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr, dx_ptr,
    dparam_ptr, dadd_ptr, dscale_ptr, dshift_ptr, G, C, S, sB, sC, sS, N, n_sp, per_split,
    CPG: tl.constexpr, SILU: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, SLOTS: tl.constexpr, SPAN: tl.constexpr,
):
    b, w, c, onehot, g_lo, cmask, pidx, add, mean, rstd, wt, bias, gain, alpha, beta = _bwd_window_setup(
        w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, C, CPG, HAS_ADD, HAS_SCALE_SHIFT, BLOCK_C,
        SLOTS)
    sp, first, end = _tiles(S, n_sp, per_split, BLOCK_S)
    plane = (tl.num_programs(0) // (C // BLOCK_C)).to(tl.int64) * n_sp * C
    # m1, m2 of the slots' groups from every channel of them (a group may reach past either edge of the window)
    cc = g_lo * CPG + tl.arange(0, SPAN)
    g_end = tl.minimum(((w + 1) * BLOCK_C + CPG - 1) // CPG * CPG, C)  # past the last channel of the last slot
    ccmask = cc < g_end
    P_cc, Q_cc, _ = sum_planes(part_ptr, b * n_sp * C + cc, plane, C, n_sp, ccmask)
    _, _, _, alpha_cc, _ = _coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, cc, b * C + cc, ccmask, HAS_SCALE_SHIFT)
    span_hot = ((cc // CPG - g_lo)[:, None] == tl.arange(0, SLOTS)[None, :]) & ccmask[:, None]
    n = tl.maximum(N, 1.0)
    m1 = _spread(_fold(alpha_cc * P_cc, span_hot) / n, onehot)
    m2 = _spread(_fold(alpha_cc * Q_cc, span_hot) / n, onehot)
    if sp == 0:
        P, Q, R = sum_planes(part_ptr, b * n_sp * C + c, plane, C, n_sp, cmask)
        _store_channel_grads(P, Q, R, wt, bias, gain, alpha, m1, m2, rstd, S, pidx, cmask, dparam_ptr,
                             (tl.num_programs(0) // (C // BLOCK_C)).to(tl.int64) * C, dadd_ptr, dscale_ptr,
                             dshift_ptr, HAS_ADD, HAS_SCALE_SHIFT)
    for st in range(first, end):
        xhat, dm, offs, mask = _tile_grad(x_ptr, dy_ptr, b * sB + c.to(tl.int64) * sC, cmask, add,
                                          st * BLOCK_S + tl.arange(0, BLOCK_S), S, sS, mean[:, None], rstd[:, None],
                                          alpha, beta, SILU, HAS_ADD)
        tl.store(dx_ptr + offs, _dx(xhat, dm, alpha, rstd[:, None], m1[:, None], m2[:, None]).to(
            dx_ptr.dtype.element_ty), mask=mask)


# ---- launchers (called by kernels/group_norm_silu.py's with its plan) ---------------------------------------
def forward(x, w, b, add, scale, shift, y, mean, rstd, shape, eps, plan, blocks):
    batch = x.shape[0]
    grid = (batch * plan.n_cblocks, plan.n_sp)
    n_slots, _ = slots(blocks["CPG"], plan.block_c)
    part = x.new_empty((3, grid[0], plan.n_sp, n_slots), dtype=mean.dtype)
    stats = {k: v for k, v in blocks.items() if k not in ("HAS_SCALE_SHIFT", "SILU")}
    _win_stats_kernel[grid](x, add, part, *shape, plan.n_sp, plan.per_split, SLOTS=n_slots, **stats)
    _win_apply_kernel[grid](x, w, b, add, scale, shift, part, y, mean, rstd, *shape, plan.n_sp, plan.per_split, eps,
                            SLOTS=n_slots, MERGE_SPLITS=MERGE_SPLITS, **blocks)
    return y, mean, rstd


def backward(grad_y, x, args, dx, dparam, grads, shape, n, plan, blocks):
    batch = x.shape[0]
    grid = (batch * plan.n_cblocks, plan.n_sp)
    n_slots, span = slots(blocks["CPG"], plan.block_c)
    part = x.new_empty((3, batch, plan.n_sp, x.shape[1]), dtype=dparam.dtype)
    _win_reduce_kernel[grid](x, grad_y, *args, part, *shape, plan.n_sp, plan.per_split, SLOTS=n_slots, **blocks)
    _win_dx_kernel[grid](x, grad_y, *args, part, dx, dparam, *grads, *shape, n, plan.n_sp, plan.per_split,
                         SLOTS=n_slots, SPAN=span, **blocks)
