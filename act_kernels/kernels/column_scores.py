"""Column sums of the attention map for the calibrated heads (pass 2 of ACT, ``q k^T`` only).

``colsum[p, j] = sum_{i sees j} P_ij`` with ``P_ij = exp2(s2_ij - lse2_i)`` recomputed tile by
tile against the row normalisers of the plain pass. The grid is (key block, calibrated pair):
each program owns BLOCK_N keys of one (b, h) pair, keeps their K tile, and loops over the query
blocks that can see them (like the dK/dV loop of FlashAttention's backward), so every column sum
is written by exactly one program: no atomics. Query blocks entirely above the key block
(causally blind to it) are skipped, and so, with a sliding window ``W`` (a runtime argument,
``Nk`` for none), are the query blocks below it: keys ``j`` are seen only by the rows at
positions ``j .. j + W - 1``. Key blocks left of every row's window get no program (the grid
starts at the first row's window; their column sums stay 0). Reads Q, K, lse2; writes
``colsum`` [P, Nk] fp32. It never touches V.

With bidirectional blocks (``BLOCKS``, ``kernels.spans``) every key block gets a program, and
it loops over the query blocks of its keys' row ranges (``col_first .. col_end``), masked by
each row's key interval.

Only the pairs listed are launched: an uncalibrated head costs no program at all.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .aot import launch
from .common import (LOG2E, cost, head_prologue, in_span, key_real, load_rows, load_rows_t,
                     loaded_keys, mma, row_real, sees, span_rows, window_arg, window_start,
                     window_start_host)

@configs.maybe_autotune("column", key=["nq_key", "nk_key", "HEAD_DIM"])
@triton.jit
def _column_scores_kernel(
        Q, K, Lse, Pairs, Kpm, ColSum, RowLo, RowHi, ColFirst, ColEnd,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        Hq, group, Nq, Nk, qk_scale, window, nq_key, nk_key,
        HAS_KPM: tl.constexpr, BLOCKS: tl.constexpr, IN_PREC: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    if BLOCKS:
        start_n = tl.program_id(0) * BLOCK_N
    else:
        start_n = window_start(Nk - Nq, window, BLOCK_N) + tl.program_id(0) * BLOCK_N
    pid_p = tl.program_id(1).to(tl.int64)
    bh, b, h, kvh, offs_d, d_ok, kpm_row = head_prologue(tl.load(Pairs + pid_p), Hq, group, Kpm,
                                                         Nk, HEAD_DIM, BLOCK_D)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ok = key_real(kpm_row, offs_n, Nk, HAS_KPM)
    kt = load_rows_t(K + b * stride_kb + kvh * stride_kh, offs_n, offs_n < Nk, stride_kn,
                     offs_d, d_ok, stride_kd)
    q_base = Q + b * stride_qb + h * stride_qh

    col = tl.zeros([BLOCK_N], dtype=tl.float32)
    if BLOCKS:
        # the rows that see some key of this block: the union of its keys' row ranges, whose
        # bounds never decrease with the key: from the first key's first row to the last key's
        # end
        first_row = tl.load(ColFirst + b * Nk + start_n)
        end_row = tl.load(ColEnd + b * Nk + tl.minimum(start_n + BLOCK_N, Nk) - 1)
    else:
        # the rows that see this block: index start_n - (Nk - Nq) (causal) up to the row at
        # position start_n + BLOCK_N - 2 + window (the window of the block's last key)
        first_row = tl.maximum(start_n - (Nk - Nq), 0)
        end_row = tl.minimum(Nq, start_n + BLOCK_N - 1 + window - (Nk - Nq))
    for start_m in range((first_row // BLOCK_M) * BLOCK_M, end_row, BLOCK_M):
        offs_m = tl.multiple_of(start_m, BLOCK_M) + tl.arange(0, BLOCK_M)
        r_ok = row_real(kpm_row, offs_m, Nq, Nk, HAS_KPM)
        q = load_rows(q_base, offs_m, offs_m < Nq, stride_qn, offs_d, d_ok, stride_qd)
        lse2 = tl.load(Lse + bh * Nq + offs_m, mask=r_ok, other=float("inf"))
        s = mma(q, kt, IN_PREC, UPCAST) * qk_scale
        vis = r_ok[:, None] & k_ok[None, :]
        if BLOCKS:
            lo_m, hi_m = span_rows(RowLo, RowHi, b, offs_m, Nq)
            vis = vis & in_span(lo_m, hi_m, offs_n)
        else:
            vis = vis & sees(Nk - Nq + offs_m, offs_n, window)
        p = tl.math.exp2(tl.where(vis, s, float("-inf")) - lse2[:, None])
        col += tl.sum(p, 0)
    tl.store(ColSum + pid_p * Nk + offs_n, col, mask=offs_n < Nk)


def column_scores(q, k, lse2, scale, kpm_i8, pairs, window=None, spans=None):
    """``colsum`` [P, Nk] fp32 for the (b*Hq + h) pairs listed in ``pairs`` (int32 [P]);
    ``window``: None or ``W >= 1``; ``spans``: None or ``kernels.spans.Spans`` (bidirectional
    blocks, the window folded in: every key block gets a program, the row loop is bounded by
    the key block's row ranges)."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    n_pairs = pairs.numel()
    win = window_arg(window, nk)
    blocks = spans is not None
    if blocks:
        win = nk                # the grid covers every key block (their row ranges may be empty)
    # keys left of the first row's window get no program: their sums are the zeros written here
    alloc = torch.empty if win == nk else torch.zeros
    colsum = alloc(n_pairs, nk, device=q.device, dtype=torch.float32)
    if n_pairs == 0:
        return colsum
    has_kpm = kpm_i8 is not None
    meta = configs.interp_meta("column") if configs.INTERPRET else {}

    def grid(m):
        key0 = (max(nk - nq - win + 1, 0) // m["BLOCK_N"]) * m["BLOCK_N"]   # window_start
        return (triton.cdiv(nk - key0, m["BLOCK_N"]), n_pairs)

    launch(_column_scores_kernel, grid,
        q, k, lse2, pairs, kpm_i8 if has_kpm else pairs, colsum,
        *((pairs,) * 4 if spans is None else spans),
        *q.stride(), *k.stride(),
        hq, hq // hkv, nq, nk, scale * LOG2E, win, configs.len_bucket(nq),
        configs.len_bucket(nk),
        HAS_KPM=has_kpm, BLOCKS=blocks, **configs.dot_flags(q.dtype),
        BLOCK_D=configs.head_block(dim), HEAD_DIM=dim, **meta)
    return colsum


def column_cost(grid, a) -> dict:
    """Bytes and FLOPs of one ``_column_scores_kernel`` launch (``a``: its arguments by name, the
    autotune config included), from its loop: each key block loads its K tile once, then the Q
    rows and ``lse2`` of the query blocks that can see it; stores its column sums. FLOPs: one
    ``[BLOCK_M, BLOCK_N, BLOCK_D]`` product per query block."""
    n_blocks, pairs = grid
    el, d, bm, bn = a["Q"].element_size(), a["HEAD_DIM"], a["BLOCK_M"], a["BLOCK_N"]
    nq, nk, window = a["Nq"], a["Nk"], a["window"]
    read = write = flops = 0
    for n in range(n_blocks):
        start_n = window_start_host(nk - nq, window, bn) + n * bn
        keys = min(bn, nk - start_n)
        first_row = max(start_n - (nk - nq), 0)
        blocks, rows = loaded_keys((first_row // bm) * bm,
                                   min(nq, start_n + bn - 1 + window - (nk - nq)), bm, nq)
        read += pairs * (4 + keys * d * el + rows * (d * el + 4))
        if a["HAS_KPM"]:
            read += pairs * (keys + rows)
        write += pairs * keys * 4
        flops += pairs * blocks * 2 * bm * bn * a["BLOCK_D"]
    return cost(read, write, flops)
