"""Sink correction: rewrite the calibrated rows of ``out`` in place (pass 3 of ACT).

For every (query block, pair) program, reading only the sink keys of that pair (a padded index
list, gathered by index):

    m_i = sum_{j in S} P_ij,    w_i = sum_{j in S} P_ij v_j        (P_ij = exp2(s2_ij - lse2_i))

and then, for pairs that are calibrated (``slot >= 0``),

    o_i = beta * w_i + (1 - beta * m_i) / (1 - m_i) * (u_i - w_i)

with ``u`` the fp32 plain output the forward kept for this pair. Rows with ``m_i == 0`` or no
non-sink mass keep ``u`` (cast exactly as the plain pass casts it).

Cancellation guard: when ``1 - m_i < STABLE_REST`` the difference ``u - w`` has lost too many
digits. If a row block holds such a row, the program makes one extra pass over the keys those
rows see and sums the non-sink part directly (``rest_i = sum_{j not in S} P_ij`` and
``r_i = sum_{j not in S} P_ij v_j``, sink membership from the dense mask), and uses
``o = beta w + (1 - beta m) / rest * r`` for the flagged rows. Other blocks never pay for it.

Pairs with ``slot < 0`` are stats-only (``return_stats`` on an uncalibrated head): only ``m`` is
written. Reads Q, the sink rows of K and V, lse2, u32; writes ``out`` rows and ``mass`` [P, Nq].
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import LOG2E, key_real, load_rows, load_rows_t, row_real


@configs.maybe_autotune("correction", key=["nq_key", "nk_key", "BLOCK_D"])
@triton.jit
def _sink_correction_kernel(
        Q, K, V, Out, Lse, U32, Pairs, Slots, NSinks, SinkIdx, SinkMask, Kpm, FirstValid, Mass,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        Hq, group, Nq, Nk, D, qk_scale, beta, stable_rest, nq_key, nk_key,
        HAS_KPM: tl.constexpr, IN_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_p = tl.program_id(1)
    bh = tl.load(Pairs + pid_p)
    slot = tl.load(Slots + pid_p)
    n_sinks = tl.load(NSinks + pid_p)
    b = bh // Hq
    h = bh % Hq
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kpm_row = Kpm + b * Nk
    pos_m = (Nk - Nq) + offs_m
    r_ok = row_real(kpm_row, offs_m, Nq, Nk, HAS_KPM)
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_m < Nq, stride_qn,
                  offs_d, d_ok, stride_qd)
    lse2 = tl.load(Lse + bh * Nq + offs_m, mask=r_ok, other=float("inf"))
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    # m_i and w_i over the sink keys only
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    w = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_sinks, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_sinks
        idx = tl.load(SinkIdx + pid_p * Nk + offs_s, mask=s_ok, other=0)
        kt = load_rows_t(k_base, idx, s_ok, stride_kn, offs_d, d_ok, stride_kd)
        s = tl.dot(q, kt, input_precision=IN_PREC) * qk_scale
        vis = r_ok[:, None] & s_ok[None, :] & (idx[None, :] <= pos_m[:, None])
        p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
        mass += tl.sum(p, 1)
        v = load_rows(v_base, idx, s_ok, stride_vn, offs_d, d_ok, stride_vd).to(tl.float32)
        w = tl.dot(p, v, w, input_precision="ieee")
    tl.store(Mass + pid_p * Nq + offs_m, mass, mask=offs_m < Nq)

    if slot >= 0:
        out_mask = (offs_m < Nq)[:, None] & d_ok[None, :]
        u = tl.load(U32 + (slot * Nq + offs_m[:, None]) * D + offs_d[None, :], mask=out_mask,
                    other=0.0)
        rest = 1.0 - mass
        r = u - w
        unstable = r_ok & (mass > 0) & (rest < stable_rest)
        if tl.max(unstable.to(tl.int32), 0) > 0:
            # direct non-sink sums for this block (only blocks with a flagged row get here)
            rest_d = tl.zeros([BLOCK_M], dtype=tl.float32)
            r_d = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            lo = 0
            if HAS_KPM:
                lo = (tl.load(FirstValid + b) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(Nk, Nk - Nq + start_m + BLOCK_M)
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k_ok = key_real(kpm_row, offs_n, Nk, HAS_KPM)
                not_sink = tl.load(SinkMask + pid_p * Nk + offs_n, mask=offs_n < Nk, other=0) == 0
                kt = load_rows_t(k_base, offs_n, offs_n < Nk, stride_kn, offs_d, d_ok, stride_kd)
                s = tl.dot(q, kt, input_precision=IN_PREC) * qk_scale
                vis = (r_ok[:, None] & (k_ok & not_sink)[None, :]
                       & (offs_n[None, :] <= pos_m[:, None]))
                p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
                rest_d += tl.sum(p, 1)
                v = load_rows(v_base, offs_n, offs_n < Nk, stride_vn, offs_d, d_ok,
                              stride_vd).to(tl.float32)
                r_d = tl.dot(p, v, r_d, input_precision="ieee")
            rest = tl.where(unstable, rest_d, rest)
            r = tl.where(unstable[:, None], r_d, r)
        change = r_ok & (mass > 0) & (rest > 0)
        gain = (1.0 - beta * mass) / tl.where(change, rest, 1.0)
        o = tl.where(change[:, None], beta * w + gain[:, None] * r, u)
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
                 + offs_d[None, :] * stride_od, o.to(Out.dtype.element_ty), mask=out_mask)


def compact_sinks(sinks):
    """bool [P, Nk] -> (n_sinks int32 [P], indices int32 [P, Nk] with each pair's sinks first).

    A stable sort on the negated mask: no host synchronisation, no N x N anything.
    """
    n_sinks = sinks.sum(dim=1, dtype=torch.int32)
    order = torch.sort((~sinks).to(torch.int8), dim=1, stable=True).indices
    return n_sinks, order.to(torch.int32).contiguous()


def sink_correction(q, k, v, out, lse2, u32, pairs, slots, sinks, beta, scale, kpm_i8,
                    first_valid, stable_rest):
    """Rewrite ``out`` in place for pairs with ``slots >= 0``; return ``mass`` [P, Nq] fp32.

    ``pairs`` int32 [P] (b*Hq + h), ``slots`` int32 [P] (row of ``u32`` or -1 for stats only),
    ``sinks`` bool [P, Nk].
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

    _sink_correction_kernel[grid](
        q, k, v, out, lse2, u32, pairs, slots, n_sinks, idx, sink_mask,
        kpm_i8 if has_kpm else pairs, first_valid, mass,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // hkv, nq, nk, dim, scale * LOG2E, float(beta), float(stable_rest),
        configs.len_bucket(nq), configs.len_bucket(nk),
        HAS_KPM=has_kpm, IN_PREC=configs.in_precision(q.dtype),
        BLOCK_D=configs.head_block(dim), **meta)
    return mass
