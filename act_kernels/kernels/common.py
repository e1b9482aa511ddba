"""Small @triton.jit helpers shared by several kernels (masks and tile loads).

Conventions of every kernel in this package:

* logits are kept in base 2: ``s2 = (q . k) * scale * log2(e)``, so ``P = exp2(s2 - lse2)``;
* ``lse2`` (written by the forward / decode kernels) is the base-2 log-sum-exp of a row,
  ``log2(sum_j 2^{s2_ij})``; a row that sees no key (a padded query row) gets ``+inf``, which makes
  every recomputed probability of that row exactly 0;
* query row ``i`` sits at absolute position ``p = Nk - Nq + i`` and sees keys ``j <= p``
  that are real (key-padding mask), provided the row itself is real; with a sliding window
  (``docs/spec.md``, "Attention windows") also ``j > p - window``. Every kernel takes the window
  as a runtime integer argument; "no window" is passed as ``window = Nk``, which no row's
  condition can bite (``p - Nk < 0 <= j``), so the plain path computes exactly what it did
  before windows existed;
* addresses: every offset that grows with B, H, N or D is computed in 64 bits. The coordinates
  from ``head_prologue`` are int64, so ``b * stride_b``, ``bh * Nq``, ``slot * Nq * D`` are
  64-bit products, and tile loads/stores widen their row and column indices before multiplying
  by a stride. (Triton types an integer argument as i32 whenever its value fits, and
  ``tl.program_id`` is i32: ``b * stride_qb`` would wrap past 2**31 elements, e.g. at
  B=4, H=32, N=128k, D=128.)
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def window_arg(window, nk: int) -> int:
    """The kernels' runtime ``window`` argument: ``W`` (``None``, no window, is passed as ``Nk``,
    which masks nothing), clamped to ``Nk``."""
    return nk if window is None else min(int(window), nk)


@triton.jit
def dim_lanes(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The head-dim lanes ``offs_d`` [BLOCK_D] and their mask ``d_ok``. ``HEAD_DIM`` is a
    constexpr: when it is a power of two (``BLOCK_D == HEAD_DIM``) the mask is a constant true,
    which the compiler folds away (no lane is masked); otherwise only the padded lanes
    ``HEAD_DIM .. BLOCK_D - 1`` are. The lanes are hinted contiguous and block-aligned."""
    offs_d = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_D), BLOCK_D), BLOCK_D)
    if HEAD_DIM == BLOCK_D:
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = offs_d < HEAD_DIM
    return offs_d, d_ok


@triton.jit
def head_prologue(bh, Hq, group, Kpm, Nk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The shared start of every program that works on one (batch row, query head).

    ``bh = b * Hq + h`` (a program id or an entry of a pair list). Returns, as int64,
    ``(bh, b, h, kvh)`` (``kvh = h // group``, the kv head GQA reads), then the head-dim lanes
    ``offs_d`` and their mask ``d_ok`` (``dim_lanes``), and ``kpm_row``, the key-padding row of
    batch ``b`` (only read when the kernel has a mask).
    """
    b = (bh // Hq).to(tl.int64)            # the divisions in 32 bits (bh < 2**31), then widen
    h = (bh % Hq).to(tl.int64)
    kvh = ((bh % Hq) // group).to(tl.int64)
    offs_d, d_ok = dim_lanes(HEAD_DIM, BLOCK_D)
    return bh.to(tl.int64), b, h, kvh, offs_d, d_ok, Kpm + b * Nk


@triton.jit
def key_real(kpm_row, offs_n, Nk, HAS_KPM: tl.constexpr):
    """bool [BLOCK_N]: key index in range and not padded."""
    ok = offs_n < Nk
    if HAS_KPM:
        ok = ok & (tl.load(kpm_row + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def row_real(kpm_row, offs_m, Nq, Nk, HAS_KPM: tl.constexpr):
    """bool [BLOCK_M]: query row in range and not padded (its position is Nk - Nq + i)."""
    ok = offs_m < Nq
    if HAS_KPM:
        ok = ok & (tl.load(kpm_row + (Nk - Nq) + offs_m, mask=ok, other=0) != 0)
    return ok


@triton.jit
def sees(pos_m, offs_n, window):
    """bool [len(pos_m), len(offs_n)]: rows at positions ``pos_m`` see keys ``offs_n`` (causal and
    window conditions only; padding is checked apart): ``pos - window < key <= pos``, i.e.
    ``0 <= pos - key < window``, one unsigned comparison (a negative difference wraps to a huge
    one); positions and keys are < 2**31."""
    dist = (pos_m[:, None] - offs_n[None, :]).to(tl.uint32, bitcast=True)
    return dist < window


@triton.jit
def in_span(lo_m, hi_m, offs_n):
    """bool [len(lo_m), len(offs_n)]: keys inside each row's interval ``[lo, hi]`` (bidirectional
    blocks, ``kernels.spans``: causal, window and block folded into one interval per row; padding
    is checked apart). An empty interval (``lo > hi``) sees nothing."""
    return (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] <= hi_m[:, None])


@triton.jit
def span_rows(RowLo, RowHi, b, offs_m, Nq):
    """``(lo_m, hi_m)`` int32 [BLOCK_M]: the key intervals of rows ``offs_m`` of batch row ``b``
    (``kernels.spans``); rows past ``Nq`` get an empty one."""
    ok = offs_m < Nq
    lo_m = tl.load(RowLo + b * Nq + offs_m, mask=ok, other=1)
    hi_m = tl.load(RowHi + b * Nq + offs_m, mask=ok, other=0)
    return lo_m, hi_m


@triton.jit
def span_walk(RowLo, RowHi, b, start_m, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks of the row tile starting at ``start_m`` with bidirectional blocks:
    ``(lo, full, mid, hi)`` as in the forward's three stages (``[lo, full)`` and ``[mid, hi)``
    masked, ``[full, mid)`` seen in full by every row). The intervals never shrink from one row
    to the next (``kernels.spans``), so the tile's first and last rows bound them all: ``lo``
    (block-aligned) is the first row's start, ``hi`` one past the last row's end; every row
    sees the keys from the last row's start to the first row's end."""
    last = tl.minimum(start_m + BLOCK_M, Nq) - 1
    lo = (tl.load(RowLo + b * Nq + start_m) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(Nk, tl.load(RowHi + b * Nq + last) + 1)
    mid = tl.maximum(lo, tl.minimum(hi, ((tl.load(RowHi + b * Nq + start_m) + 1) // BLOCK_N)
                                    * BLOCK_N))
    full = tl.minimum(mid, tl.maximum(lo, tl.cdiv(tl.load(RowLo + b * Nq + last), BLOCK_N)
                                      * BLOCK_N))
    return lo, full, mid, hi


@triton.jit
def window_start(pos_first, window, BLOCK_N: tl.constexpr):
    """Start of the first key block that a row at position ``>= pos_first`` can see with this
    window (0 without one): the blocks left of it are skipped, not masked."""
    return (tl.maximum(pos_first - window + 1, 0) // BLOCK_N) * BLOCK_N


@triton.jit
def tile_offsets(offs_r, stride_r, offs_d, stride_d):
    """int64 element offsets [len(offs_r), BLOCK_D] of rows ``offs_r`` (row stride ``stride_r``)
    and lanes ``offs_d`` (stride ``stride_d``); 64-bit so that a row index times a large stride
    (e.g. a sink index times ``H * D`` in a [B, N, H, D] layout) cannot wrap."""
    return (offs_r.to(tl.int64)[:, None] * stride_r
            + offs_d.to(tl.int64)[None, :] * stride_d)


@triton.jit
def load_rows(base, offs_r, r_ok, stride_r, offs_d, d_ok, stride_d):
    """[len(offs_r), BLOCK_D] tile of rows ``offs_r``; masked rows / padded dims read 0."""
    return tl.load(base + tile_offsets(offs_r, stride_r, offs_d, stride_d),
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def load_rows_t(base, offs_r, r_ok, stride_r, offs_d, d_ok, stride_d):
    """Transposed tile [BLOCK_D, len(offs_r)] (K^T for ``tl.dot(q, kT)``)."""
    offs = offs_r.to(tl.int64)[None, :] * stride_r + offs_d.to(tl.int64)[:, None] * stride_d
    return tl.load(base + offs, mask=r_ok[None, :] & d_ok[:, None], other=0.0)


@triton.jit
def store_rows(base, tile, offs_r, r_ok, stride_r, offs_d, d_ok, stride_d):
    """Store a [len(offs_r), BLOCK_D] tile (cast to the pointee type) at rows ``offs_r``."""
    tl.store(base + tile_offsets(offs_r, stride_r, offs_d, stride_d),
             tile.to(base.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def mma(a, b, IN_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation. ``UPCAST`` (interpreter + bfloat16 only): the
    interpreter keeps bf16 as raw uint16 and cannot multiply it, so operands go to fp32 first
    (exact products, fp32 sums: what the tensor cores compute)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=IN_PREC)


@triton.jit
def online_step(acc, l_i, m_i, s, v, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of a row tile's online softmax in base 2: logits ``s`` [M, BLOCK_N]
    (``-inf`` = masked), values ``v`` [BLOCK_N, BLOCK_D]. ``P`` is rounded to ``v``'s dtype for
    the product (tensor cores, as FlashAttention does; pass fp32 ``v`` and ``PREC`` for an fp32
    product). Returns the new ``(acc, l, m)`` and the reference max the sum is relative to (0
    for rows that saw no key yet: no ``inf - inf``)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PREC, UPCAST)
    return acc, l_i, m_new, m_safe


@triton.jit
def attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  kpm_row, skip_row, pos_m, window, lo_m, hi_m, offs_d, d_ok, lo, hi, Nk,
                  qk_scale, BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                  SKIP: tl.constexpr, BLOCKS: tl.constexpr, IN_PREC: tl.constexpr,
                  UPCAST: tl.constexpr, F32_PREC: tl.constexpr):
    """Online softmax in base 2 of a row tile ``q`` over key blocks [lo, hi): updates the
    running max ``m``, sum ``l`` and fp32 accumulator ``acc`` of ``sum 2^(s - m) v``.

    ``CAUSAL``: apply the row's visibility ``pos_m - window < key <= pos_m`` (blocks that some
    row sees only in part: the diagonal, and the left edge of a window); with ``BLOCKS``
    (bidirectional blocks) the row's interval ``lo_m <= key <= hi_m`` instead (``in_span``;
    ``pos_m`` and ``window`` unused; without it ``lo_m``, ``hi_m`` are unused). ``SKIP``: also drop
    the keys whose int8 flag at ``skip_row`` is set (the sinks, for the softmax over non-sink
    keys) and multiply P V with fp32 operands at ``F32_PREC`` (that path serves a cancellation
    guard, where precision matters more than speed); otherwise P is rounded to V's dtype for the
    tensor cores, as FlashAttention does.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
        k_ok = key_real(kpm_row, offs_n, Nk, HAS_KPM)
        if SKIP:
            k_ok = k_ok & (tl.load(skip_row + offs_n, mask=offs_n < Nk, other=0) == 0)
        kt = load_rows_t(k_base, offs_n, offs_n < Nk, stride_kn, offs_d, d_ok, stride_kd)
        s = mma(q, kt, IN_PREC, UPCAST) * qk_scale
        vis = k_ok[None, :]
        if CAUSAL:
            if BLOCKS:
                vis = vis & in_span(lo_m, hi_m, offs_n)
            else:
                vis = vis & sees(pos_m, offs_n, window)
        s = tl.where(vis, s, float("-inf"))
        v = load_rows(v_base, offs_n, offs_n < Nk, stride_vn, offs_d, d_ok, stride_vd)
        if SKIP:
            acc, l_i, m_i, _ = online_step(acc, l_i, m_i, s, v.to(tl.float32), F32_PREC, False)
        else:
            acc, l_i, m_i, _ = online_step(acc, l_i, m_i, s, v, IN_PREC, UPCAST)
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------
# host side: the loop bounds of the kernels, for their ``*_cost`` functions (bytes and FLOPs per
# launch; ``benchmarks/gpu_model.py``)
# ---------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def window_start_host(pos_first: int, window: int, block: int) -> int:
    """``window_start`` on the host (same formula)."""
    return (max(pos_first - window + 1, 0) // block) * block


def loaded_keys(lo: int, hi: int, block: int, limit: int):
    """(blocks, keys fetched) of a loop ``for start in range(lo, hi, block)`` whose tile loads are
    masked by ``key < limit`` (masked rows are not fetched)."""
    if hi <= lo:
        return 0, 0
    blocks = cdiv(hi - lo, block)
    return blocks, min(lo + blocks * block, limit) - lo


def cost(read: float, write: float, flops: float) -> dict:
    """A kernel launch's modelled traffic: HBM bytes read and written (every program's loads
    counted in full, no reuse across programs in L2) and tensor-core FLOPs (the tile products
    as issued, padded rows and lanes included)."""
    return {"read": float(read), "write": float(write), "flops": float(flops)}
