"""Pass 2 pruned: bound every key's column sum cheaply, sum exactly only the keys that could be
sinks.

:func:`column_bounds` gives an upper bound of ``sum_i P_ij`` per key from one (bfloat16) matmul
and a max per block of rows, with no exponential per entry; a key whose bound stays at most
``tau * count`` cannot be a sink. :func:`candidate_sums` then sums the remaining keys exactly,
and :func:`pruned_column_sums` is the two together (``csrc_notes/act_passes.md``).
"""
from __future__ import annotations

import torch

from .blocks import (block_rows, blocks_seeing, key_span, kv_groups, probs_on_keys, rows_seeing,
                     work_dtype)

# Floats of one block of the bound pass (rows x heads x keys): 1 Mi entries, at least 32 rows.
BOUND_BLOCK_FLOATS = 1 << 20
BOUND_MIN_ROWS = 32
# The bound matmul's key count is rounded up to a multiple of Nk / _WIDTH_STEPS (at least
# _WIDTH_MIN_STEP keys): oneDNN keeps a compiled kernel, about 0.5 MiB, per matmul shape for the
# life of the process, and a causal pass has a span per block of rows (512 at N=16384: ~300 MiB
# kept after the first call). Rounded, a call has at most ~_WIDTH_STEPS shapes, for ~3% more
# products.
_WIDTH_STEPS = 32
_WIDTH_MIN_STEP = 64
# Stand-in for -inf on rows that count for nothing, so that no inf enters a matmul.
_DEAD_ROW = -1e30
_ROUNDING = 2.0 ** -24      # float32's unit roundoff (also used, conservatively, for float64)


# Above this logit slack (huge logits) a bfloat16 bound prunes little: use float32 instead.
MAX_LOW_SLACK = 1.0


def _bound_dtype(device) -> torch.dtype:
    """The bound pass's matmul dtype: bfloat16 on CPUs that multiply it natively through oneDNN
    (float32 accumulation; the pass is matmul-bound and its rounding is accounted for in the
    bound), else float32. Not on CUDA, where cuBLAS may reduce bfloat16 in reduced precision."""
    if (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def column_bounds(q, k, neg_lse, b_idx, h_idx, scale, window=None):
    """``[P, Nk]`` float32, an upper bound of ``sum_i P_ij`` over the rows that see ``j``.

    No exponential per entry: for each block of rows, one matmul gives ``max_i (s_ij - lse_i)``
    (``-lse_i`` rides along as two extra columns of q, high and low part, against columns of
    ones in k), and the block adds ``(rows of the block that see j) * exp(max)``. The matmul may
    run in bfloat16 (:func:`_bound_dtype`, float32 accumulation); every rounding, of its inputs,
    its output and of the exact path's own logits, widens the bound (:func:`_logit_slack`), so
    it also bounds what :func:`column_sums` would compute.
    """
    nq, dim = q.shape[2], q.shape[3]
    nk = k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = work_dtype(q.dtype)
    bounds = torch.empty(len(b_idx), nk, dtype=torch.float32, device=q.device)
    for (b, kv_head), members in kv_groups(b_idx, h_idx, group).items():
        pairs = [p for p, _ in members]
        heads = len(pairs)
        q_heads = _heads_of(q[b], [h for _, h in members]).to(work)        # [G, Nq, D]
        k_head = k[b, kv_head].to(work)                                    # [Nk, D]
        nl = neg_lse[pairs].clamp(min=_DEAD_ROW).float()                   # [G, Nq]
        low = _bound_dtype(q.device)
        slack = _logit_slack(q_heads, k_head, nl, scale, low)              # [Nk]
        most = float(slack.max())
        if low != torch.float32 and most > MAX_LOW_SLACK:                  # huge logits
            low = torch.float32
            slack = _logit_slack(q_heads, k_head, nl, scale, low)
            most = float(slack.max())
        out_rounding = 2 * torch.finfo(low).eps      # |x - fl(x)| <= 2 u |fl(x)|, u = eps / 2
        # Every entry is lowered by `lift`: exactly, s_ij - lse_i <= 0 (P <= 1) and the product
        # is off by at most the slack, so every computed entry is negative and a column's max is
        # one integer min of the bits (negative_max). The lift comes back with the slack (its
        # own roundings in the split -lse columns are far below lift * 1e-4).
        lift = 2.0 * most + 1e-3
        slack = slack + lift * (1.0 + 1e-4)
        nl_lifted = nl.t() - lift
        # rows: [Nq, G, D + 2] = (scale q, -lse - lift high, low); keys: [Nk, D + 2] = (k, 1, 1)
        q_aug = torch.empty(nq, heads, dim + 2, dtype=low, device=q.device)
        torch.mul(q_heads.transpose(0, 1), scale, out=q_aug[..., :dim])
        q_aug[..., dim] = nl_lifted
        q_aug[..., dim + 1] = nl_lifted - q_aug[..., dim].float()
        k_aug = torch.cat([k_head.to(low), torch.ones(nk, 2, dtype=low, device=q.device)], -1)
        acc = torch.zeros(heads, nk, dtype=torch.float32, device=q.device)
        rows = _bound_rows(nk, heads, window)
        width = nk if window is None else min(nk, rows + window - 1)      # keys of a span
        buffer = torch.empty(min(rows, nq) * heads * width, dtype=low, device=q.device)
        quantum = max(_WIDTH_MIN_STEP, -(-nk // _WIDTH_STEPS))
        key_pos = torch.arange(nk, device=q.device)
        key_pos_f = key_pos.float()
        # What is the same for every full block of rows, relative to its first row: [rows, 1,
        # rows], True where row i does not see the key d > i places after the first row (set to
        # -inf before the max), and how many of its rows see the key d places after its first
        # row, for d = full - width .. full - 1
        full = min(rows, nq)
        ahead = torch.ones(full, full, dtype=torch.bool, device=q.device).triu_(1)[:, None, :]
        seen_full = rows_seeing(torch.arange(full - width, full, device=q.device).float(), 0,
                                 full - 1, window)
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            first_pos, last_pos = nk - nq + r0, nk - nq + r1 - 1
            lo, hi = key_span(first_pos, last_pos, window)
            # the product over a few distinct key counts (see _WIDTH_STEPS), the keys past the
            # span dropped after it
            wide = min(width, nk - lo, -(-(hi - lo) // quantum) * quantum)
            s = torch.mm(q_aug[r0:r1].view((r1 - r0) * heads, dim + 2), k_aug[lo:lo + wide].t(),
                         out=buffer[:(r1 - r0) * heads * wide].view(-1, wide))
            s = s[:, :hi - lo].view(r1 - r0, heads, hi - lo)
            # Only keys past a row are masked: the keys a window has left behind stay in the max
            # (a max over more entries is still a bound, and those entries are small).
            edge = max(first_pos, lo)
            s[:, :, edge - lo:].masked_fill_(ahead[:r1 - r0, :, edge - first_pos:hi - first_pos],
                                             float("-inf"))
            # every key of the span is seen by some row, so the max is finite (no inf - inf)
            top = negative_max(s).float()                                  # [G, keys]
            top = top.add(top.abs(), alpha=out_rounding).add_(slack[lo:hi]).exp_()
            seen = (seen_full[width - full - (first_pos - lo):] if r1 - r0 == full
                    else rows_seeing(key_pos_f[lo:hi], first_pos, last_pos, window))
            acc[:, lo:hi].addcmul_(top, seen)
        bounds[pairs] = acc * (1.0 + (2 * nq + 64) * 4 * _ROUNDING)       # rounding of sums
    return bounds


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def negative_max(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(0)`` of a float tensor whose entries are all negative or ``-inf`` (no NaN, no
    zero), read through its bits as integers: negative floats (sign bit set) order in reverse
    of their bits, so the largest is the smallest integer. CPUs reduce integers an order of
    magnitude faster than bfloat16, and one reduction is all it takes."""
    return x.view(_BITS[x.dtype]).amin(0).view(x.dtype)


def _heads_of(x: torch.Tensor, heads: list) -> torch.Tensor:
    """``x[heads]``: a view when the heads are consecutive (the usual kv group), else a copy."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[heads[0]:heads[0] + len(heads)]
    return x[heads]


def _bound_rows(nk: int, heads: int, window=None) -> int:
    """Rows of one block of the bound pass: ``BOUND_BLOCK_FLOATS`` entries (rows x heads x
    keys), at least ``BOUND_MIN_ROWS``; within a window at most ``W / 2`` rows, so that a block
    computes at most 1.5 times the entries its rows see."""
    if window is None:
        return max(BOUND_MIN_ROWS, BOUND_BLOCK_FLOATS // (nk * heads))
    width = min(nk, window + window // 2)
    return max(BOUND_MIN_ROWS, min(window // 2, BOUND_BLOCK_FLOATS // (width * heads)))


def _logit_slack(q_heads, k_head, neg_lse, scale, low) -> torch.Tensor:
    """``[Nk]``: how far the bound pass's ``scale q_i.k_j - lse_i`` may fall below the exact
    path's, for any row ``i`` (see ``csrc_notes/act_passes.md``).

    With ``u`` the unit roundoff of ``low`` and ``U`` float32's: the inputs are rounded to
    ``low`` (relative ``u + 2U`` on the scaled q, ``u`` on k, ``u^2`` on the split lse), ``D + 2``
    products are summed in float32 (``(D + 2) U``), and the exact path's own float32 logits are
    off by up to ``(D + 3) U``; each term is relative to ``scale |q_i| |k_j| + |lse_i|``.
    """
    dim = q_heads.shape[-1]
    u, big_u = torch.finfo(low).eps / 2, _ROUNDING
    per_qk = 2 * u + u * u + (2 * dim + 8) * big_u * (1 + 3 * u)
    per_lse = u * u + (2 * dim + 6) * big_u * (1 + u)
    norm_rounding = 1 + 1e-3
    q_norm = float(q_heads.float().norm(dim=-1).max()) * norm_rounding
    k_norms = k_head.float().norm(dim=-1) * norm_rounding
    alive = neg_lse > _DEAD_ROW
    lse_max = float(neg_lse[alive].abs().max()) * norm_rounding if bool(alive.any()) else 0.0
    return k_norms * (per_qk * abs(scale) * q_norm) + per_lse * lse_max



def candidate_sums(q, k, neg_lse, b_idx, h_idx, candidates, scale, window=None):
    """``[P, Nk]`` float32: the exact ``sum_i P_ij`` of the keys in ``candidates [P, Nk]``, 0 for
    the others. Each block of rows reads only the candidates it sees."""
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = work_dtype(q.dtype)
    sums = torch.zeros(len(b_idx), nk, dtype=work, device=q.device)
    positions = torch.arange(nk - nq, nk, device=q.device)
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        idx = candidates[p].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        ks = k[b, h // group][idx].to(work)
        qp = q[b, h].to(work)
        acc = torch.zeros(idx.numel(), dtype=work, device=q.device)
        for r0, r1, a, z in blocks_seeing(idx.tolist(), nq, nk, block_rows(idx.numel()),
                                           window):
            acc[a:z] += probs_on_keys(qp[r0:r1], ks[a:z], neg_lse[p, r0:r1], idx[a:z],
                                       positions[r0:r1], scale, window).sum(0)
        sums[p, idx] = acc
    return sums.float()


def pruned_column_sums(q, k, neg_lse, b_idx, h_idx, counts, first, tau, scale, window=None):
    """``(sums, candidates)``: column sums exact for the keys that could be sinks (the
    candidates), 0 for the keys that provably cannot.

    A key is skipped when its :func:`column_bounds` stays at most ``tau * count``: its exact
    score is then at most tau, so it is no sink whichever path computes it. Keys just above or
    just below tau are never skipped (the bound is at least their exact sum), nor is any key
    whose decision is close; the first valid key (never a sink) and keys no row sees are.
    """
    bounds = column_bounds(q, k, neg_lse, b_idx, h_idx, scale, window)
    keys = torch.arange(k.shape[2], device=q.device)
    candidates = (bounds > tau * counts) & (counts > 0) & (keys[None, :] != first[:, None])
    return candidate_sums(q, k, neg_lse, b_idx, h_idx, candidates, scale, window), candidates

