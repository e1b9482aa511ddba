"""Sink correction: rewrite the calibrated rows of ``out`` in place (pass 3 of ACT).

For every (query block, pair) program, reading only the sink keys of that pair (a padded index
list, gathered by index):

    m_i = sum_{j in S} P_ij,    w_i = sum_{j in S} P_ij v_j        (P_ij = exp2(s2_ij - lse2_i))

and then, for pairs that are calibrated (``slot >= 0``),

    o_i = beta * w_i + (1 - beta * m_i) / (1 - m_i) * (u_i - w_i)

with ``u`` the fp32 plain output the forward kept for this pair. Rows with ``m_i == 0`` or no
non-sink mass keep ``u`` (cast exactly as the plain pass casts it).

Cancellation guard: when ``1 - m_i < stable_rest`` (the float32 entry of ``calibration``'s table) the difference ``u - w`` has lost too many
digits. If a row block holds such a row, the program makes one extra pass over the keys those
rows see with an online softmax over the *non-sink* keys only (``common.attend_blocks`` with the
dense sink mask as skip mask), which gives the non-sink average
``a_i = sum_{j not in S} P_ij v_j / (1 - m_i)`` at full precision even when ``1 - m_i`` is
subnormal, and ``1 - m_i = 2^(lse2_nonsink - lse2)`` (0 if it underflows: row unchanged). The
flagged rows use ``o = beta w + (1 - beta m) a``. Other blocks never pay for the pass.

Sliding window (``window``, a runtime argument, ``Nk`` for none): a sink outside a row's window
adds nothing to that row's ``m`` and ``w``, and the direct pass walks only the key blocks from
the first row's window on, with the window mask (``common.attend_blocks``).

Bidirectional blocks (``BLOCKS``, ``kernels.spans``): the row's key interval replaces the
causal/window test, and the direct pass walks the tile's intervals (``common.span_walk``).

Pairs with ``slot < 0`` are stats-only (``return_stats`` on an uncalibrated head): only ``m`` is
written. Reads Q, the sink rows of K and V, lse2, u32; writes ``out`` rows and ``mass`` [P, Nq].
"""
import torch
import triton
import triton.language as tl

from . import configs
from .aot import launch
from .common import (LOG2E, attend_blocks, cdiv, cost, head_prologue, in_span, load_rows,
                     load_rows_t, mma, row_real, sees, span_rows, span_walk, store_rows,
                     window_arg, window_start)


@configs.maybe_autotune("correction", key=["nq_key", "nk_key", "HEAD_DIM"])
@triton.jit
def _sink_correction_kernel(
        Q, K, V, Out, Lse, U32, Pairs, Slots, NSinks, SinkIdx, SinkMask, Kpm, FirstValid, Mass,
        RowLo, RowHi,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        Hq, group, Nq, Nk, qk_scale, beta, stable_rest, window, nq_key, nk_key,
        HAS_KPM: tl.constexpr, BLOCKS: tl.constexpr, IN_PREC: tl.constexpr,
        UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_p = tl.program_id(1).to(tl.int64)
    bh, b, h, kvh, offs_d, d_ok, kpm_row = head_prologue(tl.load(Pairs + pid_p), Hq, group, Kpm,
                                                         Nk, HEAD_DIM, BLOCK_D)
    slot = tl.load(Slots + pid_p).to(tl.int64)
    n_sinks = tl.load(NSinks + pid_p)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos_m = (Nk - Nq) + offs_m
    r_ok = row_real(kpm_row, offs_m, Nq, Nk, HAS_KPM)
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_m < Nq, stride_qn,
                  offs_d, d_ok, stride_qd)
    lse2 = tl.load(Lse + bh * Nq + offs_m, mask=r_ok, other=float("inf"))
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if BLOCKS:
        lo_m, hi_m = span_rows(RowLo, RowHi, b, offs_m, Nq)
    else:
        lo_m, hi_m = pos_m, pos_m                           # unused

    # m_i and w_i over the sink keys only
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    w = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_sinks, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_sinks
        idx = tl.load(SinkIdx + pid_p * Nk + offs_s, mask=s_ok, other=0)
        kt = load_rows_t(k_base, idx, s_ok, stride_kn, offs_d, d_ok, stride_kd)
        s = mma(q, kt, IN_PREC, UPCAST) * qk_scale
        vis = r_ok[:, None] & s_ok[None, :]
        if BLOCKS:
            vis = vis & in_span(lo_m, hi_m, idx)
        else:
            vis = vis & sees(pos_m, idx, window)
        p = tl.math.exp2(tl.where(vis, s, float("-inf")) - lse2[:, None])
        mass += tl.sum(p, 1)
        v = load_rows(v_base, idx, s_ok, stride_vn, offs_d, d_ok, stride_vd).to(tl.float32)
        w += mma(p, v, F32_PREC, False)
    tl.store(Mass + pid_p * Nq + offs_m, mass, mask=offs_m < Nq)

    if slot >= 0:
        out_base = Out + b * stride_ob + h * stride_oh
        u_base = U32 + slot * Nq * HEAD_DIM
        rest = 1.0 - mass                       # non-sink mass
        unstable = r_ok & (mass > 0) & (rest < stable_rest)
        if tl.max(unstable.to(tl.int32), 0) > 0:
            # a softmax over the non-sink keys, for this block only: exact even when 1 - m is
            # tiny or subnormal (u - w would have cancelled); these rows are written here
            m_ns = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_ns = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc_ns = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            if BLOCKS:
                lo, lo_full, lo_mid, hi = span_walk(RowLo, RowHi, b, start_m, Nq, Nk, BLOCK_M,
                                                    BLOCK_N)
            else:
                lo = window_start(Nk - Nq + start_m, window, BLOCK_N)
                if HAS_KPM:
                    lo = tl.maximum(lo, (tl.load(FirstValid + b) // BLOCK_N) * BLOCK_N)
                hi = tl.minimum(Nk, Nk - Nq + start_m + BLOCK_M)
            acc_ns, l_ns, m_ns = attend_blocks(
                acc_ns, l_ns, m_ns, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                kpm_row, SinkMask + pid_p * Nk, pos_m, window, lo_m, hi_m, offs_d, d_ok, lo, hi,
                Nk, qk_scale, BLOCK_N, HAS_KPM, True, True, BLOCKS, IN_PREC, UPCAST, F32_PREC)
            has = l_ns > 0
            l_safe = tl.where(has, l_ns, 1.0)
            rest_ns = tl.where(has, tl.math.exp2(m_ns + tl.math.log2(l_safe) - lse2), 0.0)
            u = load_rows(u_base, offs_m, unstable, HEAD_DIM, offs_d, d_ok, 1)
            o = _identity(u, w, mass, acc_ns / l_safe[:, None], rest_ns, beta)
            store_rows(out_base, o, offs_m, unstable, stride_on, offs_d, d_ok, stride_od)
        # the other rows: the identity with the non-sink average (u - w) / (1 - m)
        stable = (offs_m < Nq) & (unstable == 0)
        u = load_rows(u_base, offs_m, stable, HEAD_DIM, offs_d, d_ok, 1)
        avg = (u - w) / tl.where(rest > 0, rest, 1.0)[:, None]
        o = _identity(u, w, mass, avg, rest, beta)
        store_rows(out_base, o, offs_m, stable, stride_on, offs_d, d_ok, stride_od)


@triton.jit
def _identity(u, w, mass, avg, rest, beta):
    """Rows with sink mass ``m > 0`` and non-sink mass ``rest > 0``: ``beta w + (1 - beta m) a``
    (``a`` the non-sink average); the others keep the plain output ``u``."""
    change = (mass > 0) & (rest > 0)
    return tl.where(change[:, None], beta * w + (1.0 - beta * mass)[:, None] * avg, u)


def compact_sinks(sinks):
    """bool [P, Nk] -> (n_sinks int32 [P], indices int32 [P, Nk] with each pair's sinks first).

    A stable sort on the negated mask: no host synchronisation, no N x N anything.
    """
    n_sinks = sinks.sum(dim=1, dtype=torch.int32)
    order = torch.sort((~sinks).to(torch.int8), dim=1, stable=True).indices
    return n_sinks, order.to(torch.int32).contiguous()


def sink_correction(q, k, v, out, lse2, u32, pairs, slots, sinks, beta, scale, kpm_i8,
                    first_valid, stable_rest, window=None, spans=None):
    """Rewrite ``out`` in place for pairs with ``slots >= 0``; return ``mass`` [P, Nq] fp32.

    ``pairs`` int32 [P] (b*Hq + h), ``slots`` int32 [P] (row of ``u32`` or -1 for stats only),
    ``sinks`` bool [P, Nk], ``window`` None or ``W >= 1``, ``spans`` None or
    ``kernels.spans.Spans`` (bidirectional blocks, the window folded in).
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    n_pairs = pairs.numel()
    mass = torch.zeros(n_pairs, nq, device=q.device, dtype=torch.float32)
    if n_pairs == 0:
        return mass
    n_sinks, idx = compact_sinks(sinks)
    sink_mask = sinks.to(torch.int8).contiguous()
    has_kpm = kpm_i8 is not None
    meta = configs.interp_meta("correction") if configs.INTERPRET else {}

    def grid(m):
        return (triton.cdiv(nq, m["BLOCK_M"]), n_pairs)

    launch(_sink_correction_kernel, grid,
        q, k, v, out, lse2, u32, pairs, slots, n_sinks, idx, sink_mask,
        kpm_i8 if has_kpm else pairs, first_valid, mass,
        *((first_valid,) * 2 if spans is None else spans[:2]),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // hkv, nq, nk, scale * LOG2E, float(beta), float(stable_rest),
        window_arg(window, nk), configs.len_bucket(nq), configs.len_bucket(nk),
        HAS_KPM=has_kpm, BLOCKS=spans is not None, **configs.dot_flags(q.dtype),
        F32_PREC=configs.F32_PREC, BLOCK_D=configs.head_block(dim), HEAD_DIM=dim, **meta)
    return mass


def correction_cost(grid, a, n_sinks: int) -> dict:
    """Bytes and FLOPs of one ``_sink_correction_kernel`` launch (``a``: its arguments by name,
    the autotune config included) for ``n_sinks`` sinks per pair (data-dependent: the caller
    states it), without the guard pass: each query block loads its Q tile and ``lse2``, the
    sinks' indices and K and V rows ``BLOCK_S`` at a time, and, for pairs with a slot, ``u``;
    stores the mass and the rewritten ``out`` rows. FLOPs: two ``[BLOCK_M, BLOCK_S, BLOCK_D]``
    products per sink block."""
    n_blocks, pairs = grid
    el, d, bm = a["Q"].element_size(), a["HEAD_DIM"], a["BLOCK_M"]
    calibrated = int((a["Slots"] >= 0).sum())
    read = pairs * 12                # pair, slot and sink count
    write = flops = 0
    for m in range(n_blocks):
        rows = min(bm, a["Nq"] - m * bm)
        read += pairs * (rows * (d * el + 4) + n_sinks * (4 + 2 * d * el))
        read += calibrated * rows * d * 4
        write += pairs * rows * 4 + calibrated * rows * d * el
        flops += pairs * cdiv(n_sinks, a["BLOCK_S"]) * 4 * bm * a["BLOCK_S"] * a["BLOCK_D"]
    return cost(read, write, flops)
