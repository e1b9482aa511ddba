"""Plain causal attention, FlashAttention-style, with the base-2 log-sum-exp (pass 1 of ACT).

Tiling: one program per (query block of BLOCK_M rows, batch x query head). It holds its Q tile,
walks the key blocks its rows can see with an online softmax in base 2 (running max ``m``, running
sum ``l``, fp32 accumulator), and writes

* ``out``  [B, Hq, Nq, D] in the input dtype (the plain attention output ``u``),
* ``lse2`` [B*Hq, Nq] fp32, base-2 log-sum-exp of each row (``+inf`` for rows that see nothing),
* ``u32``  [n_slots, Nq, D] fp32, the un-rounded output, only for heads that will be calibrated
  (``u_slot[b*Hq + h] >= 0``): the calibration identity needs ``u`` without the bf16/fp16 rounding.

Key blocks are visited in three stages, sharing one loop body (``common.attend_blocks``): the
blocks at the left edge of a sliding window (window mask), the blocks every row of the tile sees
in full (no mask but padding), then the blocks on the diagonal (causal + window + tail masks).
Blocks past the diagonal, blocks entirely left of every row's window (``window`` is a runtime
argument, ``Nk`` for none: then the first stage is empty) and blocks entirely before the first
real key (left padding) are skipped: a windowed tile costs about ``(W + BLOCK_M) / BLOCK_N``
blocks, not ``Nk / BLOCK_N``.
With bidirectional blocks (``BLOCKS``, ``kernels.spans``) the same three stages run between the
bounds of the tile's first and last rows' key intervals, the mask being each row's interval.
GQA: query head ``h`` reads kv head ``h // group`` through its strides, nothing is copied.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .aot import launch
from .common import (LOG2E, attend_blocks, cost, head_prologue, load_rows, loaded_keys, row_real,
                     span_rows, span_walk, store_rows, window_arg, window_start,
                     window_start_host)


@configs.maybe_autotune("forward", key=["nq_key", "nk_key", "HEAD_DIM"])
@triton.jit
def _flash_forward_kernel(
        Q, K, V, Out, Lse, U32, Kpm, FirstValid, USlot, RowLo, RowHi,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        Hq, group, Nq, Nk, qk_scale, window, nq_key, nk_key,
        HAS_KPM: tl.constexpr, BLOCKS: tl.constexpr, IN_PREC: tl.constexpr,
        UPCAST: tl.constexpr, F32_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh, b, h, kvh, offs_d, d_ok, kpm_row = head_prologue(tl.program_id(1), Hq, group, Kpm, Nk,
                                                         HEAD_DIM, BLOCK_D)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos_m = (Nk - Nq) + offs_m

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_m < Nq, stride_qn,
                  offs_d, d_ok, stride_qd)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if BLOCKS:
        # bidirectional blocks: each row's interval (window, block and first real key folded
        # in), the tile's walk bounded by its first and last rows
        lo_m, hi_m = span_rows(RowLo, RowHi, b, offs_m, Nq)
        lo, full, mid, hi = span_walk(RowLo, RowHi, b, start_m, Nq, Nk, BLOCK_M, BLOCK_N)
    else:
        lo_m, hi_m = pos_m, pos_m                           # unused
        # the first row's window starts the walk (block-aligned; 0 without a window)
        lo = window_start(Nk - Nq + start_m, window, BLOCK_N)
        if HAS_KPM:
            lo = tl.maximum(lo, (tl.load(FirstValid + b) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Nk, Nk - Nq + start_m + BLOCK_M)    # one past the last row's position
        mid = tl.maximum(lo, tl.minimum(hi, ((Nk - Nq + start_m + 1) // BLOCK_N) * BLOCK_N))
        # keys from `full` on are inside the last row's window, hence inside every row's
        full = tl.minimum(mid, tl.maximum(lo, tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N)
                                          * BLOCK_N))
    # stage 1: the left edge of the window (of the rows' intervals), mask on (empty without one)
    acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                  stride_vn, stride_vd, kpm_row, Kpm, pos_m, window, lo_m, hi_m,
                                  offs_d, d_ok, lo, full, Nk, qk_scale, BLOCK_N, HAS_KPM, True,
                                  False, BLOCKS, IN_PREC, UPCAST, F32_PREC)
    # stage 2: blocks every row of the tile sees entirely (only padding can mask a key)
    acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                  stride_vn, stride_vd, kpm_row, Kpm, pos_m, window, lo_m, hi_m,
                                  offs_d, d_ok, full, mid, Nk, qk_scale, BLOCK_N, HAS_KPM, False,
                                  False, BLOCKS, IN_PREC, UPCAST, F32_PREC)
    # stage 3: the diagonal blocks (up to the last row's block end), causal (and window) mask on
    acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd,
                                  stride_vn, stride_vd, kpm_row, Kpm, pos_m, window, lo_m, hi_m,
                                  offs_d, d_ok, mid, hi, Nk, qk_scale, BLOCK_N, HAS_KPM, True,
                                  False, BLOCKS, IN_PREC, UPCAST, F32_PREC)

    r_ok = row_real(kpm_row, offs_m, Nq, Nk, HAS_KPM) & (l_i > 0)
    o = acc / tl.where(r_ok, l_i, 1.0)[:, None]
    o = tl.where(r_ok[:, None], o, 0.0)
    lse2 = tl.where(r_ok, m_i + tl.math.log2(tl.where(r_ok, l_i, 1.0)), float("inf"))
    tl.store(Lse + bh * Nq + offs_m, lse2, mask=offs_m < Nq)
    store_rows(Out + b * stride_ob + h * stride_oh, o, offs_m, offs_m < Nq, stride_on,
               offs_d, d_ok, stride_od)
    slot = tl.load(USlot + bh).to(tl.int64)
    if slot >= 0:
        store_rows(U32 + slot * Nq * HEAD_DIM, o, offs_m, offs_m < Nq, HEAD_DIM, offs_d, d_ok,
                   1)


def flash_forward(q, k, v, scale, kpm_i8, first_valid, u_slot, n_slots, window=None,
                  spans=None):
    """Launch the plain pass. Returns ``(out, lse2 [B*Hq, Nq] fp32, u32 [n_slots, Nq, D] fp32)``.

    ``kpm_i8``: int8 [B, Nk] or None; ``first_valid``: int32 [B]; ``u_slot``: int32 [B*Hq]
    (-1: head not calibrated, no fp32 copy written); ``window``: None or ``W >= 1``;
    ``spans``: None or ``kernels.spans.Spans`` (bidirectional blocks, the window folded in).
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty(bsz * hq, nq, device=q.device, dtype=torch.float32)
    u32 = torch.empty(max(n_slots, 1), nq, dim, device=q.device, dtype=torch.float32)
    has_kpm = kpm_i8 is not None
    kpm_arg = kpm_i8 if has_kpm else first_valid   # any valid pointer; never read
    row_lo, row_hi = (first_valid, first_valid) if spans is None else spans[:2]
    meta = configs.interp_meta("forward") if configs.INTERPRET else {}

    def grid(m):
        return (triton.cdiv(nq, m["BLOCK_M"]), bsz * hq)

    launch(_flash_forward_kernel, grid,
        q, k, v, out, lse2, u32, kpm_arg, first_valid, u_slot, row_lo, row_hi,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // hkv, nq, nk, scale * LOG2E, window_arg(window, nk),
        configs.len_bucket(nq), configs.len_bucket(nk),
        HAS_KPM=has_kpm, BLOCKS=spans is not None, **configs.dot_flags(q.dtype),
        F32_PREC=configs.F32_PREC, BLOCK_D=configs.head_block(dim), HEAD_DIM=dim, **meta)
    return out, lse2, u32


def forward_cost(grid, a) -> dict:
    """Bytes and FLOPs of one ``_flash_forward_kernel`` launch (``a``: its arguments by name,
    the autotune config included), from its walk: each query block of ``BLOCK_M`` rows loads
    its Q tile once and the K and V rows of the key blocks ``[lo, hi)`` (the three stages
    together); it stores ``out``, ``lse2`` and, for heads with a slot, the fp32 ``u``. FLOPs:
    two ``[BLOCK_M, BLOCK_N, BLOCK_D]`` products per block. No left padding is assumed."""
    n_blocks, heads = grid
    el, d, bm, bn = a["Q"].element_size(), a["HEAD_DIM"], a["BLOCK_M"], a["BLOCK_N"]
    nq, nk, window = a["Nq"], a["Nk"], a["window"]
    slots = int((a["USlot"] >= 0).sum())
    read = write = flops = 0
    for m in range(n_blocks):
        start_m = m * bm
        lo = window_start_host(nk - nq + start_m, window, bn)
        blocks, keys = loaded_keys(lo, min(nk, nk - nq + start_m + bm), bn, nk)
        rows = min(bm, nq - start_m)
        read += heads * (rows * d * el + keys * d * el * 2 + 4)
        if a["HAS_KPM"]:
            read += heads * (keys + rows + 4)
        write += heads * rows * (d * el + 4) + slots * rows * d * 4
        flops += heads * blocks * 4 * bm * bn * a["BLOCK_D"]
    return cost(read, write, flops)
