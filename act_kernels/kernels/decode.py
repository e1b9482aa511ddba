"""Decode (Nq == 1): plain output, LSE and the exact ACT correction in one pass over K/V.

Why a bounded candidate list is exact. With one query row, the sink score of key ``j`` is its
probability ``P_j``, and the probabilities sum to 1, so at most ``ceil(1/tau) - 1`` keys can have
``P_j > tau``. While the keys stream by, the running log-sum-exp ``lse_t`` only grows, so a key
with final ``P_j > tau`` also satisfies ``s_j > lse_t + log2(tau)`` at every step ``t`` after it
arrives. The kernel therefore keeps, per program, a buffer of the keys that satisfy that test
*now*; after each block it drops the entries the grown ``lse`` has pushed below the threshold and
inserts the block's new keys that pass. The members of the buffer are keys with probability
``> tau`` under a partial softmax, so there are never more than ``ceil(1/tau) - 1`` of them: a
buffer of ``CAND >= ceil(1 / (tau * 2^-MARGIN)) - 1`` slots never overflows (``MARGIN`` is a tiny
slack in base-2 log units, so rounding in ``lse`` cannot drop a borderline key). The first valid
key is never a sink and is not inserted. Insertion is a rank match (cumulative sums over the free
slots and over the passing keys): no sort, no top-k.

Flash-decoding: the keys are cut into ``num_splits`` splits, one program per (split, b*Hq + h).
Each writes its partial max, sum, accumulator and candidate buffer (the candidate test is done
against the split's own lse, which is <= the global one, so the union of the splits' buffers
still holds every final sink). The epilogue program of each (b, h) merges the partials into the
plain output ``u`` and ``lse2``, keeps the candidates with ``P = exp2(s - lse2) > tau``, gathers
their V rows for ``w = sum P_j v_j`` and ``m = sum P_j``, and applies
``o = beta w + (1 - beta m) / (1 - m) (u - w)``. When ``1 - m < STABLE_REST`` (cancellation in
``u - w``) that row makes one direct pass over K/V with a softmax over the non-sink keys instead
(exact even when ``1 - m`` is subnormal), with the same logit code and the same ``P > tau`` test,
so it picks exactly the same sinks.

Sliding window (``window``, a runtime argument, ``Nk`` for none): the row sees only the last
``W`` keys, so the splits cover only those (from the block holding key ``Nk - W``; the keys of
that block before it are masked), and the direct pass of the epilogue starts there too. The
first valid key excluded from the sinks stays the *sequence's* first valid key, not the first
key of the window (``docs/spec.md``, "Attention windows").

With ``TRACK=False`` (no calibrated head, or the general path's plain pass) the same kernels give
the plain output; the plain arithmetic does not depend on ``TRACK``, so uncalibrated heads are
bit-identical either way.
"""
import math

import torch
import triton
import triton.language as tl

from .. import calibration
from . import configs
from .aot import is_stand_in, launch
from .common import LOG2E, head_prologue, key_real, load_rows, window_arg

# slack of the online candidate test, in log2 units (keys with partial P > tau * 2^-MARGIN kept)
MARGIN = 1e-3
# largest candidate buffer; a tau needing more than this uses the general path
MAX_CAND = 32
LAST = {"overflow": None}   # overflow flags of the last tracked launch (for tests; never synced)


def candidate_slots(tau: float):
    """Buffer size for ``tau`` (a power of two >= the bound), or None if above ``MAX_CAND``."""
    bound = math.ceil(1.0 / (tau * 2.0 ** -MARGIN)) - 1
    slots = max(2, triton.next_power_of_2(max(bound, 1)))
    return slots if slots <= MAX_CAND else None


@triton.jit
def _load_query(q_base, offs_d, d_ok, stride_qd):
    """The single query row of a (b, h) program, fp32 [BLOCK_D] (padded lanes 0)."""
    return tl.load(q_base + offs_d.to(tl.int64) * stride_qd, mask=d_ok, other=0.0).to(tl.float32)


@triton.jit
def _logits(q, k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd, qk_scale):
    """Base-2 logits [BLOCK_N] of the single query row ``q`` (fp32 [BLOCK_D]) against a K block."""
    k = load_rows(k_base, offs_n, n_ok, stride_kn, offs_d, d_ok, stride_kd).to(tl.float32)
    return tl.sum(q[None, :] * k, 1) * qk_scale


@triton.jit
def _online_update(m_i, l_i, acc, s, v):
    """One block of a one-row online softmax in base 2: logits ``s`` [BLOCK_N] (-inf = masked),
    values ``v`` [BLOCK_N, BLOCK_D] fp32. Returns the new (max, sum, acc) and the reference max
    the sum is relative to (0 while no key was seen)."""
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc = acc * alpha + tl.sum(p[:, None] * v, 0)
    return m_new, l_i, acc, m_safe


@triton.jit
def _decode_split_kernel(
        Q, K, V, Kpm, FirstValid, PartM, PartL, PartAcc, CandS, CandI, Overflow,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        Hq, group, Nk, D, qk_scale, split_size, num_splits, log2_tau, window,
        HAS_KPM: tl.constexpr, TRACK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAND: tl.constexpr):
    sp = tl.program_id(0)
    bh, b, h, kvh, offs_d, d_ok, kpm_row = head_prologue(tl.program_id(1), Hq, group, Kpm, Nk, D,
                                                         BLOCK_D)
    q = _load_query(Q + b * stride_qb + h * stride_qh, offs_d, d_ok, stride_qd)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    first = 0
    q_real = True
    if HAS_KPM:
        first = tl.load(FirstValid + b)
        q_real = tl.load(kpm_row + Nk - 1) != 0

    win_lo = Nk - window                            # the first key the row sees (0: no window)
    n_lo = (win_lo // BLOCK_N) * BLOCK_N + sp * split_size
    n_hi = tl.minimum(Nk, n_lo + split_size)
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cand_s = tl.full([CAND], float("-inf"), dtype=tl.float32)
    cand_i = tl.full([CAND], -1, dtype=tl.int32)
    over = tl.full([], 0, dtype=tl.int32)
    for start_n in range(tl.maximum(n_lo, (first // BLOCK_N) * BLOCK_N), n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = key_real(kpm_row, offs_n, n_hi, HAS_KPM) & q_real & (offs_n >= win_lo)
        s = _logits(q, k_base, offs_n, offs_n < n_hi, stride_kn, offs_d, d_ok, stride_kd, qk_scale)
        s = tl.where(k_ok, s, float("-inf"))
        v = load_rows(v_base, offs_n, offs_n < n_hi, stride_vn, offs_d, d_ok,
                      stride_vd).to(tl.float32)
        m_i, l_i, acc, m_safe = _online_update(m_i, l_i, acc, s, v)
        if TRACK:
            # keys whose probability under the softmax so far exceeds tau (minus a tiny margin)
            thresh = m_safe + tl.math.log2(l_i) + log2_tau
            keep = cand_s > thresh
            new = k_ok & (s > thresh) & (offs_n != first)
            free = keep == 0
            rank_free = tl.cumsum(free.to(tl.int32), 0) - 1
            rank_new = tl.cumsum(new.to(tl.int32), 0) - 1
            match = (new[:, None] & free[None, :]
                     & (rank_new[:, None] == rank_free[None, :]))           # [BLOCK_N, CAND]
            take = tl.sum(match.to(tl.int32), 0) > 0
            ins_s = tl.sum(tl.where(match, s[:, None], 0.0), 0)
            ins_i = tl.sum(tl.where(match, offs_n[:, None], 0), 0)
            cand_s = tl.where(take, ins_s, tl.where(keep, cand_s, float("-inf")))
            cand_i = tl.where(take, ins_i, tl.where(keep, cand_i, -1))
            n_new = tl.sum(new.to(tl.int32), 0)
            n_free = tl.sum(free.to(tl.int32), 0)
            over = tl.maximum(over, (n_new > n_free).to(tl.int32))

    part = bh * num_splits + sp
    tl.store(PartM + part, m_i)
    tl.store(PartL + part, l_i)
    tl.store(PartAcc + part * BLOCK_D + offs_d, acc)
    if TRACK:
        offs_c = tl.arange(0, CAND)
        tl.store(CandS + part * CAND + offs_c, cand_s)
        tl.store(CandI + part * CAND + offs_c, cand_i)
        tl.store(Overflow + part, over)


@triton.jit
def _decode_epilogue_kernel(
        Q, K, V, Out, Lse, U32, USlot, Cal, Mass, Kpm, FirstValid,
        PartM, PartL, PartAcc, CandS, CandI,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_od,
        Hq, group, Nk, D, qk_scale, num_splits, beta, tau, stable_rest, window,
        HAS_KPM: tl.constexpr, TRACK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, CAND: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    bh, b, h, kvh, offs_d, d_ok, kpm_row = head_prologue(tl.program_id(0), Hq, group, Kpm, Nk, D,
                                                         BLOCK_D)

    # merge the splits' (max, sum, acc)
    m_all = tl.full([], float("-inf"), dtype=tl.float32)
    l_all = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, num_splits, SPLIT_CHUNK):
        offs_c = c0 + tl.arange(0, SPLIT_CHUNK)
        c_ok = offs_c < num_splits
        part = bh * num_splits + offs_c
        mc = tl.load(PartM + part, mask=c_ok, other=float("-inf"))
        lc = tl.load(PartL + part, mask=c_ok, other=0.0)
        ac = tl.load(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], mask=c_ok[:, None],
                     other=0.0)
        m_new = tl.maximum(m_all, tl.max(mc, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_all - m_safe)
        wc = tl.math.exp2(mc - m_safe)
        l_all = l_all * alpha + tl.sum(lc * wc, 0)
        acc = acc * alpha + tl.sum(ac * wc[:, None], 0)
        m_all = m_new
    has = l_all > 0
    u = acc / tl.where(has, l_all, 1.0)
    lse2 = tl.where(has, m_all + tl.math.log2(tl.where(has, l_all, 1.0)), float("inf"))
    o = u

    if TRACK:
        mass = tl.full([], 0.0, dtype=tl.float32)
        if tl.load(Cal + bh) != 0:
            v_base = V + b * stride_vb + kvh * stride_vh
            w = tl.zeros([BLOCK_D], dtype=tl.float32)
            offs_k = tl.arange(0, CAND)
            for sp in range(0, num_splits):
                cs = tl.load(CandS + (bh * num_splits + sp) * CAND + offs_k)
                ci = tl.load(CandI + (bh * num_splits + sp) * CAND + offs_k)
                p = tl.math.exp2(cs - lse2)
                keep = (ci >= 0) & (p > tau)
                p = tl.where(keep, p, 0.0)
                mass += tl.sum(p, 0)
                vr = load_rows(v_base, ci, keep, stride_vn, offs_d, d_ok,
                               stride_vd).to(tl.float32)
                w += tl.sum(p[:, None] * vr, 0)
            # non-sink average a = sum_{j not in S} P_j v_j / (1 - m) and rest = 1 - m
            rest = 1.0 - mass
            avg = (u - w) / tl.where(rest > 0, rest, 1.0)
            if (mass > 0) & (rest < stable_rest):
                # cancellation guard: a softmax over the non-sink keys (same logits, same P > tau
                # test as the candidates), exact even when 1 - m is subnormal
                first = 0
                if HAS_KPM:
                    first = tl.load(FirstValid + b)
                q = _load_query(Q + b * stride_qb + h * stride_qh, offs_d, d_ok, stride_qd)
                k_base = K + b * stride_kb + kvh * stride_kh
                m_ns = tl.full([], float("-inf"), dtype=tl.float32)
                l_ns = tl.full([], 0.0, dtype=tl.float32)
                acc_ns = tl.zeros([BLOCK_D], dtype=tl.float32)
                win_lo = Nk - window
                for start_n in range((tl.maximum(first, win_lo) // BLOCK_N) * BLOCK_N, Nk,
                                     BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    k_ok = key_real(kpm_row, offs_n, Nk, HAS_KPM) & (offs_n >= win_lo)
                    s = _logits(q, k_base, offs_n, offs_n < Nk, stride_kn, offs_d, d_ok,
                                stride_kd, qk_scale)
                    sink = (tl.math.exp2(s - lse2) > tau) & (offs_n != first)
                    s = tl.where(k_ok & (sink == 0), s, float("-inf"))
                    vr = load_rows(v_base, offs_n, offs_n < Nk, stride_vn, offs_d, d_ok,
                                   stride_vd).to(tl.float32)
                    m_ns, l_ns, acc_ns, _ = _online_update(m_ns, l_ns, acc_ns, s, vr)
                l_safe = tl.where(l_ns > 0, l_ns, 1.0)
                rest = tl.where(l_ns > 0, tl.math.exp2(m_ns + tl.math.log2(l_safe) - lse2), 0.0)
                avg = acc_ns / l_safe
            change = (mass > 0) & (rest > 0)
            o = tl.where(change, beta * w + (1.0 - beta * mass) * avg, u)
        tl.store(Mass + bh, mass)

    tl.store(Lse + bh, lse2)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d.to(tl.int64) * stride_od,
             o.to(Out.dtype.element_ty), mask=d_ok)
    slot = tl.load(USlot + bh).to(tl.int64)
    if slot >= 0:
        tl.store(U32 + slot * D + offs_d, u, mask=d_ok)


def decode_attention(q, k, v, scale, kpm_i8, first_valid, u_slot, n_slots, calibrated=None,
                     beta=0.0, tau=1.0, stable_rest=None, split_size=None, window=None):
    """One-query attention. Returns ``(out, lse2 [B*Hq, 1], u32, mass [B*Hq])``.

    ``calibrated``: None (plain only) or int8 [B*Hq]; then ``tau`` must satisfy
    ``candidate_slots(tau) is not None`` and the calibrated heads are corrected in the epilogue.
    ``stable_rest`` (default ``calibration.stable_rest(torch.float32)``): non-sink mass below
    which a calibrated row is recomputed directly (see the module docstring). ``window``: None
    or ``W >= 1`` (the row sees the last ``W`` keys).
    """
    if stable_rest is None:
        stable_rest = calibration.stable_rest(torch.float32)
    bsz, hq, nq, dim = q.shape
    assert nq == 1
    hkv, nk = k.shape[1], k.shape[2]
    bhn = bsz * hq
    dev = q.device
    block_d = configs.head_block(dim)
    win = window_arg(window, nk)
    # the splits cover the keys from the block that holds the window's first key (BLOCK_N does
    # not depend on the length)
    block_n = configs.decode_config(bhn, nk, dim, split_size)[0]
    span = nk - (nk - win) // block_n * block_n
    block_n, split, num_splits, num_warps = configs.decode_config(bhn, span, dim, split_size)
    track = calibrated is not None
    cand = candidate_slots(tau) if track else 2
    if cand is None:
        raise ValueError(f"decode_attention: tau={tau} needs more than {MAX_CAND} candidates")

    part_m = torch.empty(bhn, num_splits, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(bhn, num_splits, block_d, device=dev, dtype=torch.float32)
    if track:
        cand_s = torch.empty(bhn, num_splits, cand, device=dev, dtype=torch.float32)
        cand_i = torch.empty(bhn, num_splits, cand, device=dev, dtype=torch.int32)
        overflow = torch.empty(bhn, num_splits, device=dev, dtype=torch.int32)
        cal = calibrated
    else:
        cand_s = cand_i = overflow = part_m      # never read or written
        cal = u_slot
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty(bhn, 1, device=dev, dtype=torch.float32)
    mass = torch.zeros(bhn, device=dev, dtype=torch.float32)
    u32 = torch.empty(max(n_slots, 1), 1, dim, device=dev, dtype=torch.float32)
    has_kpm = kpm_i8 is not None
    kpm_arg = kpm_i8 if has_kpm else first_valid
    qs = (q.stride(0), q.stride(1), q.stride(3))
    qk_scale = scale * LOG2E

    launch(_decode_split_kernel, (num_splits, bhn),
        q, k, v, kpm_arg, first_valid, part_m, part_l, part_acc, cand_s, cand_i, overflow,
        *qs, *k.stride(), *v.stride(),
        hq, hq // hkv, nk, dim, qk_scale, split, num_splits,
        math.log2(tau) - MARGIN if track else 0.0, win,
        HAS_KPM=has_kpm, TRACK=track, BLOCK_N=block_n, BLOCK_D=block_d, CAND=cand,
        num_warps=num_warps)
    launch(_decode_epilogue_kernel, (bhn,),
        q, k, v, out, lse2, u32, u_slot, cal, mass, kpm_arg, first_valid,
        part_m, part_l, part_acc, cand_s, cand_i,
        *qs, *k.stride(), *v.stride(), out.stride(0), out.stride(1), out.stride(3),
        hq, hq // hkv, nk, dim, qk_scale, num_splits, float(beta), float(tau), float(stable_rest),
        win, HAS_KPM=has_kpm, TRACK=track, BLOCK_N=block_n, BLOCK_D=block_d, CAND=cand,
        SPLIT_CHUNK=16, num_warps=num_warps)
    if track and not is_stand_in(overflow):       # a traced call's flags are not kept
        LAST["overflow"] = overflow
    return out, lse2, u32, mass
