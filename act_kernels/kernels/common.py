"""Small @triton.jit helpers shared by several kernels (masks and tile loads).

Conventions of every kernel in this package:

* logits are kept in base 2: ``s2 = (q . k) * scale * log2(e)``, so ``P = exp2(s2 - lse2)``;
* ``lse2`` (written by the forward / decode kernels) is the base-2 log-sum-exp of a row,
  ``log2(sum_j 2^{s2_ij})``; a row that sees no key (a padded query row) gets ``+inf``, which makes
  every recomputed probability of that row exactly 0;
* query row ``i`` sits at absolute position ``Nk - Nq + i`` and sees keys ``j <= Nk - Nq + i``
  that are real (key-padding mask), provided the row itself is real.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
def load_rows(base, offs_r, r_ok, stride_r, offs_d, d_ok, stride_d):
    """[len(offs_r), BLOCK_D] tile of rows ``offs_r``; masked rows / padded dims read 0."""
    return tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def load_rows_t(base, offs_r, r_ok, stride_r, offs_d, d_ok, stride_d):
    """Transposed tile [BLOCK_D, len(offs_r)] (K^T for ``tl.dot(q, kT)``)."""
    return tl.load(base + offs_r[None, :] * stride_r + offs_d[:, None] * stride_d,
                   mask=r_ok[None, :] & d_ok[:, None], other=0.0)
