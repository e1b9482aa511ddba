"""Decode (Nq == 1): plain output, LSE and the exact ACT correction in one pass over K/V.

GQA packing. One program holds the ``g = Hq / Hkv`` query rows of one kv head (its *group*) as
the rows of a ``[BLOCK_G, D]`` tile (``BLOCK_G``: ``g`` rounded up to a power of two, at least
16, the smallest ``tl.dot`` operand; groups larger than ``MAX_BLOCK_G`` are cut into chunks of
``BLOCK_G`` rows). Each K/V block is loaded once for all of them, and the logits and ``P V`` are
two tensor-core products, like the forward kernel's. Padded rows (past ``g``) read 0 and see
no key. Every query row keeps its own running max, sum, accumulator and candidate buffer, so
the argument below holds row by row; the rows of a group only share the loads.

Why a bounded candidate list is exact (for each query row separately). The sink score of key
``j`` is its probability ``P_j``, and the probabilities of a row sum to 1, so at most
``ceil(1/tau) - 1`` keys can have ``P_j > tau``. While the keys stream by, the row's running
log-sum-exp ``lse_t`` only grows, so a key with final ``P_j > tau`` also satisfies
``s_j > lse_t + log2(tau)`` at every step ``t`` after it arrives. The kernel therefore keeps,
per row, a buffer of the keys that satisfy that test *now*; after each block it drops the
entries the grown ``lse`` of that row has pushed below its threshold and inserts the block's
new keys that pass. The members of a row's buffer are keys with probability ``> tau`` under a
partial softmax of that row, so there are never more than ``ceil(1/tau) - 1`` of them: a buffer
of ``CAND >= ceil(1 / (tau * 2^-MARGIN)) - 1`` slots never overflows (``MARGIN`` is a tiny slack
in base-2 log units, so rounding in ``lse`` cannot drop a borderline key). The first valid key
is never a sink and is not inserted. Insertion is a rank match (cumulative sums over the free
slots and over the passing keys): no sort, no top-k; it runs only for the rows that have a
passing key in the block (rare after the first blocks), one row at a time.

Flash-decoding: the keys are cut into ``num_splits`` splits, one program per (split, group
chunk). Each writes, per row, its partial max, sum, accumulator and candidate buffer (the
candidate test is done against the split's own lse, which is <= the global one, so the union
of the splits' buffers still holds every final sink). The epilogue program of each group chunk
merges the partials into the plain output ``u`` and ``lse2`` of every row, keeps the candidates
with ``P = exp2(s - lse2) > tau``, gathers their V rows for ``w = sum P_j v_j`` and
``m = sum P_j``, and applies ``o = beta w + (1 - beta m) / (1 - m) (u - w)`` to the calibrated
rows. When ``1 - m < stable_rest`` (the float32 entry of ``calibration``'s table) for some row (cancellation in ``u - w``) the program makes
one direct pass over the group's K/V (read once for all its rows) with a softmax over each
row's non-sink keys instead (exact even when ``1 - m`` is subnormal: nothing cancels; its ``P V``
rounds ``P`` to V's dtype like the plain pass, an error relative to the output, not amplified
by ``1 / (1 - m)``), with the same logit code and the same ``P > tau`` test, so it picks
exactly the same sinks.

Sliding window (``window``, a runtime argument, ``Nk`` for none): the row sees only the last
``W`` keys, so the splits cover only those (from the block holding key ``Nk - W``; the keys of
that block before it are masked), and the direct pass of the epilogue starts there too. The
first valid key excluded from the sinks stays the *sequence's* first valid key, not the first
key of the window (``docs/spec.md``, "Attention windows").

Bidirectional blocks (``BLOCKS``): the row at ``Nk - 1`` has no later key, so a block only
moves its window's start back to the block's start: ``WinLo`` (int32 ``[B]``, the first key
each batch row's query sees) replaces ``Nk - window``; the splits are laid over all ``Nk`` keys
and each skips the blocks before its row's first key.

Calibrated and uncalibrated rows share a program. With ``TRACK=False`` (no calibrated head, or
the general path's plain pass) the same kernels give the plain output; the plain arithmetic
(logits, online softmax, merge) does not depend on ``TRACK`` nor on a row's flag, and an
uncalibrated row stores ``u`` itself, so uncalibrated rows are bit-identical either way.

``*_cost`` (next to each kernel): bytes and FLOPs one launch moves, from the kernel's own
block loop bounds (``benchmarks/gpu_model.py``).
"""
import math

import torch
import triton
import triton.language as tl

from .. import calibration
from . import configs
from .aot import launch
from .common import (LOG2E, cost, dim_lanes, key_real, load_rows, load_rows_t, loaded_keys, mma,
                     online_step, store_rows, window_arg)

# slack of the online candidate test, in log2 units (keys with partial P > tau * 2^-MARGIN kept)
MARGIN = 1e-3
# largest candidate buffer; a tau needing more than this uses the general path
MAX_CAND = 32


def candidate_slots(tau: float):
    """Buffer size for ``tau`` (a power of two >= the bound), or None if above ``MAX_CAND``."""
    bound = math.ceil(1.0 / (tau * 2.0 ** -MARGIN)) - 1
    slots = max(2, triton.next_power_of_2(max(bound, 1)))
    return slots if slots <= MAX_CAND else None


@triton.jit
def _group_prologue(pid, Hq, Hkv, group, n_chunks, Kpm, Nk, HEAD_DIM: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows of group chunk ``pid = (b * Hkv + kvh) * n_chunks + chunk``: ``(b, kvh)`` (int64),
    the query head of each row ``h_rows`` and its flat index ``bh_rows = b * Hq + h`` (int64
    [BLOCK_G]), ``g_ok`` (row inside the group), the head-dim lanes and the padding row."""
    chunk = pid % n_chunks
    b = (pid // n_chunks // Hkv).to(tl.int64)
    kvh = (pid // n_chunks % Hkv).to(tl.int64)
    offs_g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    h_rows = kvh * group + offs_g
    offs_d, d_ok = dim_lanes(HEAD_DIM, BLOCK_D)
    return b, kvh, h_rows, offs_g < group, b * Hq + h_rows, offs_d, d_ok, Kpm + b * Nk


@triton.jit
def _insert_candidates(cand_s, cand_i, over, new, s, offs_n, BLOCK_G: tl.constexpr,
                       CAND: tl.constexpr):
    """Put each row's passing keys ``new`` [BLOCK_G, BLOCK_N] (logits ``s``) into the free slots
    (``-inf``) of its buffer, by rank; rows without a new key are skipped."""
    offs_g = tl.arange(0, BLOCK_G)
    for r in range(0, BLOCK_G):
        sel = offs_g == r
        new_r = tl.sum(tl.where(sel[:, None], new.to(tl.int32), 0), 0) > 0     # [BLOCK_N]
        n_new = tl.sum(new_r.to(tl.int32), 0)
        if n_new > 0:
            s_r = tl.sum(tl.where(sel[:, None], s, 0.0), 0)
            cs_r = tl.sum(tl.where(sel[:, None], cand_s, 0.0), 0)                # [CAND]
            ci_r = tl.sum(tl.where(sel[:, None], cand_i, 0), 0)
            free = cs_r == float("-inf")
            rank_free = tl.cumsum(free.to(tl.int32), 0) - 1
            rank_new = tl.cumsum(new_r.to(tl.int32), 0) - 1
            match = (new_r[:, None] & free[None, :]
                     & (rank_new[:, None] == rank_free[None, :]))            # [BLOCK_N, CAND]
            take = tl.sum(match.to(tl.int32), 0) > 0
            cs_r = tl.where(take, tl.sum(tl.where(match, s_r[:, None], 0.0), 0), cs_r)
            ci_r = tl.where(take, tl.sum(tl.where(match, offs_n[:, None], 0), 0), ci_r)
            cand_s = tl.where(sel[:, None], cs_r[None, :], cand_s)
            cand_i = tl.where(sel[:, None], ci_r[None, :], cand_i)
            n_free = tl.sum(free.to(tl.int32), 0)
            over = tl.where(sel, tl.maximum(over, (n_new > n_free).to(tl.int32)), over)
    return cand_s, cand_i, over


@triton.jit
def _decode_split_kernel(
        Q, K, V, Kpm, FirstValid, Cal, PartM, PartL, PartAcc, CandS, CandI, Overflow, WinLo,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        Hq, Hkv, group, n_chunks, Nk, qk_scale, split_size, num_splits, log2_tau, window,
        HAS_KPM: tl.constexpr, TRACK: tl.constexpr, BLOCKS: tl.constexpr, IN_PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAND: tl.constexpr):
    sp = tl.program_id(0)
    b, kvh, h_rows, g_ok, bh_rows, offs_d, d_ok, kpm_row = _group_prologue(
        tl.program_id(1), Hq, Hkv, group, n_chunks, Kpm, Nk, HEAD_DIM, BLOCK_G, BLOCK_D)
    q = load_rows(Q + b * stride_qb, h_rows, g_ok, stride_qh, offs_d, d_ok, stride_qd)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    first = 0
    row_ok = g_ok
    if HAS_KPM:
        first = tl.load(FirstValid + b)
        row_ok = row_ok & (tl.load(kpm_row + Nk - 1) != 0)

    skip_to = first                                 # the walk starts at this key's block
    if BLOCKS:
        # bidirectional blocks: the row's first key, per batch row (the window extended to the
        # start of the row's block, the first real key folded in); the splits cover every key
        win_lo = tl.load(WinLo + b)
        n_lo = sp * split_size
        skip_to = win_lo
    else:
        win_lo = Nk - window                        # the first key the row sees (0: no window)
        n_lo = (win_lo // BLOCK_N) * BLOCK_N + sp * split_size
    n_hi = tl.minimum(Nk, n_lo + split_size)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    cand_s = tl.full([BLOCK_G, CAND], float("-inf"), dtype=tl.float32)
    cand_i = tl.full([BLOCK_G, CAND], -1, dtype=tl.int32)
    over = tl.zeros([BLOCK_G], dtype=tl.int32)
    cal = g_ok
    if TRACK:
        cal = g_ok & (tl.load(Cal + bh_rows, mask=g_ok, other=0) != 0)
    for start_n in range(tl.maximum(n_lo, (skip_to // BLOCK_N) * BLOCK_N), n_hi, BLOCK_N):
        offs_n = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
        k_ok = key_real(kpm_row, offs_n, n_hi, HAS_KPM) & (offs_n >= win_lo)
        kt = load_rows_t(k_base, offs_n, offs_n < n_hi, stride_kn, offs_d, d_ok, stride_kd)
        s = mma(q, kt, IN_PREC, UPCAST) * qk_scale
        s = tl.where(row_ok[:, None] & k_ok[None, :], s, float("-inf"))
        v = load_rows(v_base, offs_n, offs_n < n_hi, stride_vn, offs_d, d_ok, stride_vd)
        acc, l_i, m_i, m_safe = online_step(acc, l_i, m_i, s, v, IN_PREC, UPCAST)
        if TRACK:
            # each calibrated row: keys whose probability under its softmax so far exceeds tau
            # (minus a tiny margin); drop the entries the grown lse pushed below, then insert
            thresh = m_safe + tl.math.log2(l_i) + log2_tau
            keep = cand_s > thresh[:, None]
            cand_s = tl.where(keep, cand_s, float("-inf"))
            cand_i = tl.where(keep, cand_i, -1)
            new = cal[:, None] & (s > thresh[:, None]) & (offs_n != first)[None, :]
            if tl.max(tl.max(new.to(tl.int32), 1), 0) > 0:
                cand_s, cand_i, over = _insert_candidates(cand_s, cand_i, over, new, s, offs_n,
                                                          BLOCK_G, CAND)

    part = bh_rows * num_splits + sp
    tl.store(PartM + part, m_i, mask=g_ok)
    tl.store(PartL + part, l_i, mask=g_ok)
    tl.store(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])
    if TRACK:
        offs_c = tl.arange(0, CAND)
        tl.store(CandS + part[:, None] * CAND + offs_c[None, :], cand_s, mask=cal[:, None])
        tl.store(CandI + part[:, None] * CAND + offs_c[None, :], cand_i, mask=cal[:, None])
        tl.store(Overflow + part, over, mask=g_ok)


@triton.jit
def _decode_epilogue_kernel(
        Q, K, V, Out, Lse, U32, USlot, Cal, Mass, Kpm, FirstValid,
        PartM, PartL, PartAcc, CandS, CandI, WinLo,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_od,
        Hq, Hkv, group, n_chunks, Nk, qk_scale, num_splits, beta, tau, stable_rest, window,
        HAS_KPM: tl.constexpr, TRACK: tl.constexpr, BLOCKS: tl.constexpr, IN_PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAND: tl.constexpr):
    b, kvh, h_rows, g_ok, bh_rows, offs_d, d_ok, kpm_row = _group_prologue(
        tl.program_id(0), Hq, Hkv, group, n_chunks, Kpm, Nk, HEAD_DIM, BLOCK_G, BLOCK_D)

    # merge the splits' (max, sum, acc), every row of the group at once
    m_all = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_all = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for sp in range(0, num_splits):
        part = bh_rows * num_splits + sp
        mc = tl.load(PartM + part, mask=g_ok, other=float("-inf"))
        lc = tl.load(PartL + part, mask=g_ok, other=0.0)
        ac = tl.load(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], mask=g_ok[:, None],
                     other=0.0)
        m_new = tl.maximum(m_all, mc)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_all - m_safe)
        wc = tl.math.exp2(mc - m_safe)
        l_all = l_all * alpha + lc * wc
        acc = acc * alpha[:, None] + ac * wc[:, None]
        m_all = m_new
    has = l_all > 0
    u = acc / tl.where(has, l_all, 1.0)[:, None]
    lse2 = tl.where(has, m_all + tl.math.log2(tl.where(has, l_all, 1.0)), float("inf"))
    o = u

    if TRACK:
        cal = g_ok & (tl.load(Cal + bh_rows, mask=g_ok, other=0) != 0)
        v_base = V + b * stride_vb + kvh * stride_vh
        mass = tl.zeros([BLOCK_G], dtype=tl.float32)
        w = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        offs_c = tl.arange(0, CAND)
        if tl.max(cal.to(tl.int32), 0) > 0:
            for sp in range(0, num_splits):
                cpart = (bh_rows * num_splits + sp)[:, None] * CAND + offs_c[None, :]
                cs = tl.load(CandS + cpart, mask=cal[:, None], other=float("-inf"))
                ci = tl.load(CandI + cpart, mask=cal[:, None], other=-1)
                p = tl.math.exp2(cs - lse2[:, None])
                keep = (ci >= 0) & (p > tau)
                p = tl.where(keep, p, 0.0)
                mass += tl.sum(p, 1)
                if tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:
                    # gather the sinks' V rows, one slot of every row at a time
                    for c in range(0, CAND):
                        sel = (offs_c == c)[None, :] & keep
                        idx = tl.sum(tl.where(sel, ci, 0), 1)
                        vr = load_rows(v_base, idx, tl.sum(sel.to(tl.int32), 1) > 0,
                                       stride_vn, offs_d, d_ok, stride_vd).to(tl.float32)
                        w += tl.sum(tl.where(sel, p, 0.0), 1)[:, None] * vr
        # non-sink average a = sum_{j not in S} P_j v_j / (1 - m) and rest = 1 - m
        rest = 1.0 - mass
        avg = (u - w) / tl.where(rest > 0, rest, 1.0)[:, None]
        unstable = cal & (mass > 0) & (rest < stable_rest)
        if tl.max(unstable.to(tl.int32), 0) > 0:
            # cancellation guard: a softmax over each unstable row's non-sink keys (same logits,
            # same P > tau test as the candidates), exact even when 1 - m is subnormal; the
            # group's K/V is read once for all its rows
            first = 0
            if HAS_KPM:
                first = tl.load(FirstValid + b)
            q = load_rows(Q + b * stride_qb, h_rows, g_ok, stride_qh, offs_d, d_ok, stride_qd)
            k_base = K + b * stride_kb + kvh * stride_kh
            m_ns = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_ns = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc_ns = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            if BLOCKS:
                win_lo = tl.load(WinLo + b)
            else:
                win_lo = Nk - window
            for start_n in range((tl.maximum(first, win_lo) // BLOCK_N) * BLOCK_N, Nk, BLOCK_N):
                offs_n = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
                k_ok = key_real(kpm_row, offs_n, Nk, HAS_KPM) & (offs_n >= win_lo)
                kt = load_rows_t(k_base, offs_n, offs_n < Nk, stride_kn, offs_d, d_ok, stride_kd)
                s = mma(q, kt, IN_PREC, UPCAST) * qk_scale
                sink = (tl.math.exp2(s - lse2[:, None]) > tau) & (offs_n != first)[None, :]
                s = tl.where(unstable[:, None] & k_ok[None, :] & (sink == 0), s, float("-inf"))
                vr = load_rows(v_base, offs_n, offs_n < Nk, stride_vn, offs_d, d_ok, stride_vd)
                acc_ns, l_ns, m_ns, _ = online_step(acc_ns, l_ns, m_ns, s, vr, IN_PREC, UPCAST)
            l_safe = tl.where(l_ns > 0, l_ns, 1.0)
            rest = tl.where(unstable,
                            tl.where(l_ns > 0, tl.math.exp2(m_ns + tl.math.log2(l_safe) - lse2),
                                     0.0), rest)
            avg = tl.where(unstable[:, None], acc_ns / l_safe[:, None], avg)
        change = cal & (mass > 0) & (rest > 0)
        o = tl.where(change[:, None], beta * w + (1.0 - beta * mass)[:, None] * avg, u)
        tl.store(Mass + bh_rows, mass, mask=g_ok)

    tl.store(Lse + bh_rows, lse2, mask=g_ok)
    store_rows(Out + b * stride_ob, o, h_rows, g_ok, stride_oh, offs_d, d_ok, stride_od)
    slot = tl.load(USlot + bh_rows, mask=g_ok, other=-1).to(tl.int64)
    store_rows(U32, u, slot, slot >= 0, HEAD_DIM, offs_d, d_ok, 1)


def decode_attention(q, k, v, scale, kpm_i8, first_valid, u_slot, n_slots, calibrated=None,
                     beta=0.0, tau=1.0, stable_rest=None, split_size=None, window=None,
                     win_lo=None):
    """One-query attention. Returns ``(out, lse2 [B*Hq, 1], u32, mass [B*Hq])``.

    ``calibrated``: None (plain only) or int8 [B*Hq]; then ``tau`` must satisfy
    ``candidate_slots(tau) is not None`` and the calibrated heads are corrected in the epilogue.
    ``stable_rest`` (default ``calibration.stable_rest(torch.float32)``): non-sink mass below
    which a calibrated row is recomputed directly (see the module docstring). ``window``: None
    or ``W >= 1`` (the row sees the last ``W`` keys). ``win_lo``: None or int32 ``[B]``, the
    first key each batch row's query sees (bidirectional blocks: ``kernels.spans``, the window
    and the first real key folded in; ``window`` is then not read): the splits cover all
    ``Nk`` keys and each skips the blocks before its row's first key.
    """
    if stable_rest is None:
        stable_rest = calibration.stable_rest(torch.float32)
    bsz, hq, nq, dim = q.shape
    assert nq == 1
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    bhn = bsz * hq
    dev = q.device
    block_d = configs.head_block(dim)
    block_g, n_chunks = configs.decode_group_block(group)
    programs = bsz * hkv * n_chunks              # per split: one per group chunk
    spans = win_lo is not None
    win = nk if spans else window_arg(window, nk)
    # the splits cover the keys from the block that holds the window's first key (BLOCK_N does
    # not depend on the length)
    block_n = configs.decode_config(programs, nk, dim, block_g, split_size, q.element_size())[0]
    span = nk - (nk - win) // block_n * block_n
    block_n, split, num_splits, num_warps = configs.decode_config(programs, span, dim, block_g,
                                                                  split_size, q.element_size())
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
    win_lo_arg = win_lo if spans else first_valid       # any valid pointer; read only if spans
    qs = (q.stride(0), q.stride(1), q.stride(3))
    qk_scale = scale * LOG2E
    flags = configs.dot_flags(q.dtype)
    blocks = dict(BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_DIM=dim, CAND=cand)

    launch(_decode_split_kernel, (num_splits, programs),
        q, k, v, kpm_arg, first_valid, cal, part_m, part_l, part_acc, cand_s, cand_i, overflow,
        win_lo_arg, *qs, *k.stride(), *v.stride(),
        hq, hkv, group, n_chunks, nk, qk_scale, split, num_splits,
        math.log2(tau) - MARGIN if track else 0.0, win,
        HAS_KPM=has_kpm, TRACK=track, BLOCKS=spans, **flags, **blocks, num_warps=num_warps)
    launch(_decode_epilogue_kernel, (programs,),
        q, k, v, out, lse2, u32, u_slot, cal, mass, kpm_arg, first_valid,
        part_m, part_l, part_acc, cand_s, cand_i, win_lo_arg,
        *qs, *k.stride(), *v.stride(), out.stride(0), out.stride(1), out.stride(3),
        hq, hkv, group, n_chunks, nk, qk_scale, num_splits, float(beta), float(tau),
        float(stable_rest), win, HAS_KPM=has_kpm, TRACK=track, BLOCKS=spans, **flags, **blocks,
        num_warps=num_warps)
    return out, lse2, u32, mass


def _rows(a):
    """(query rows, calibrated rows) of a decode launch."""
    rows = a["Q"].shape[0] * a["Q"].shape[1]
    cal = int((a["Cal"] != 0).sum()) if a["TRACK"] else 0
    return rows, cal


def split_cost(grid, a) -> dict:
    """Bytes and FLOPs of one ``_decode_split_kernel`` launch (``a``: its arguments by name),
    from its loop: each program loads its rows' q, then the K and V rows of the key blocks
    ``[n_lo, n_hi)`` of its split (``HEAD_DIM`` lanes; the load mask drops keys past ``n_hi``),
    and stores each row's partials (and the candidate buffers of calibrated rows). FLOPs: two
    ``[BLOCK_G, BLOCK_N, BLOCK_D]`` products per block. No left padding is assumed (``first``
    = 0: padding only shortens the loop)."""
    n_splits, programs = grid
    el, d, bn = a["Q"].element_size(), a["HEAD_DIM"], a["BLOCK_N"]
    rows, cal = _rows(a)
    win_lo = a["Nk"] - a["window"]
    blocks = keys = 0
    for sp in range(n_splits):
        n_lo = (win_lo // bn) * bn + sp * a["split_size"]
        nb, nkeys = loaded_keys(n_lo, min(a["Nk"], n_lo + a["split_size"]), bn, a["Nk"])
        blocks, keys = blocks + nb, keys + nkeys
    read = n_splits * rows * d * el + programs * keys * d * el * 2
    write = n_splits * rows * (8 + a["BLOCK_D"] * 4)
    if a["HAS_KPM"]:
        read += programs * (keys + 5 * n_splits)
    if a["TRACK"]:
        read += n_splits * rows
        write += n_splits * (cal * a["CAND"] * 8 + rows * 4)
    flops = programs * blocks * 4 * a["BLOCK_G"] * bn * a["BLOCK_D"]
    return cost(read, write, flops)


def epilogue_cost(grid, a) -> dict:
    """Bytes of one ``_decode_epilogue_kernel`` launch without its guard pass: each row's
    partials of every split, the candidate buffers of the calibrated rows and the V rows of
    their sinks (at most ``ceil(1/tau) - 1`` per row: an upper bound); stores ``out``, ``lse2``,
    the mass and the fp32 ``u`` of the rows with a slot. The guard pass is ``guard_cost``."""
    el, d, ns = a["Q"].element_size(), a["HEAD_DIM"], a["num_splits"]
    rows, cal = _rows(a)
    slots = int((a["USlot"] >= 0).sum())
    read = ns * rows * (8 + a["BLOCK_D"] * 4) + rows * 4
    write = rows * (d * el + 4) + slots * d * 4
    if a["TRACK"]:
        sinks = math.ceil(1.0 / a["tau"]) - 1
        read += rows + ns * cal * a["CAND"] * 8 + cal * sinks * d * el
        write += rows * 4
    return cost(read, write, 0)


def guard_cost(grid, a) -> dict:
    """Bytes and FLOPs of the epilogue's direct pass if every program took it (rows with
    ``1 - m < stable_rest`` (the float32 entry of ``calibration``'s table); data-dependent): the group's q and its window's K/V blocks."""
    programs, el, d, bn = grid[0], a["Q"].element_size(), a["HEAD_DIM"], a["BLOCK_N"]
    blocks, keys = loaded_keys((max(0, a["Nk"] - a["window"]) // bn) * bn, a["Nk"], bn, a["Nk"])
    rows = a["Q"].shape[0] * a["Q"].shape[1]
    return cost(rows * d * el + programs * keys * d * el * 2, 0,
                programs * blocks * 4 * a["BLOCK_G"] * bn * a["BLOCK_D"])
