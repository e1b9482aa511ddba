"""The portable torch backend of ACT: exact, and never more than a block of rows of P in memory.

Data path for a prefill (``Nq > 1``)::

    q, k, v --plain pass--> out, lse          (fused SDPA kernel; every head)
            --bound pass--> bound of sum_i P_ij (calibrated heads; q k^T in bfloat16, block maxima)
            --exact sums--> sum_i P_ij        (only keys whose bound reaches tau * count)
            --sink selection--> S             (tiny: per key)
            --sink correction--> out          (calibrated heads, sink keys only, by the identity)

``return_stats`` adds the full exact column pass (``column_sums``) to report every key's score.
A decode step (``Nq == 1``) is one short vectorised pass over all heads at once: its single row
of P is as small as the output, so it is calibrated directly, without the identity, and only
when a calibrated row has a sink. See ``csrc_notes/act_passes.md``.
"""
from __future__ import annotations

import os
import warnings

import torch

from .sinks import calibrate_rows, first_valid_index, seen_counts, select_sinks, stable_rest

# Upper bound on the floats of one block of q k^T (rows x keys) held by the column pass and the
# sink correction: 2**18 floats = 1 MiB, small enough to stay in a CPU core's L2 cache.
BLOCK_FLOATS = 1 << 18
MIN_BLOCK_ROWS = 16


# The column pass is matmul-bound: larger blocks (4 MiB, at least 64 rows a head) run faster.
COLUMN_BLOCK_FLOATS = 1 << 20
COLUMN_MIN_ROWS = 64


def _block_rows(width: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_FLOATS // max(width, 1))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# plain pass
# --------------------------------------------------------------------------------------------

def visibility_bias(nq: int, nk: int, key_padding_mask, dtype, device,
                    window=None) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, Nq, Nk]``: 0 where row i sees key j, -inf elsewhere."""
    rows = torch.arange(nk - nq, nk, device=device)[:, None]
    cols = torch.arange(nk, device=device)[None, :]
    sees = cols <= rows
    if window is not None:
        sees = sees & (cols > rows - window)
    sees = sees[None]
    if key_padding_mask is not None:
        sees = sees & key_padding_mask[:, None, :] & key_padding_mask[:, nk - nq:, None]
    bias = torch.zeros(sees.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~sees, float("-inf"))[:, None]


def _plain_blocked(q, k, v, scale, key_padding_mask, window=None):
    """Exact plain attention with its log-sum-exp by blocks of rows, on any device."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = _work_dtype(q.dtype)
    out = torch.empty(bsz, hq, nq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=work, device=q.device)
    qg = q.reshape(bsz, hkv, group, nq, dim)
    rows = _block_rows(nk)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1
        bias = visibility_bias(r1 - r0, kend, None if key_padding_mask is None
                               else key_padding_mask[:, :kend], work, q.device, window)
        s = torch.matmul(qg[:, :, :, r0:r1].to(work), k[:, :, None, :kend].transpose(-1, -2).to(work))
        s = s * scale + bias[:, :, None]
        block_lse = torch.logsumexp(s, dim=-1)
        alive = torch.isfinite(block_lse)
        p = torch.exp(s - torch.where(alive, block_lse, torch.zeros_like(block_lse))[..., None])
        o = torch.matmul(p, v[:, :, None, :kend].to(work))
        out[:, :, r0:r1] = o.reshape(bsz, hq, r1 - r0, dim).to(q.dtype)
        lse[:, :, r0:r1] = torch.where(alive, block_lse, torch.zeros_like(block_lse)).reshape(
            bsz, hq, r1 - r0)
    return out, lse


def plain_attention(q, k, v, scale, key_padding_mask, window=None):
    """``(out [B, Hq, Nq, D], lse [B, Hq, Nq] float32)``, bottom-right causal (within
    ``window`` when given), GQA unrepeated.

    Rows that see no key (padded queries) give 0 output and 0 lse.
    """
    nq, nk = q.shape[2], k.shape[2]
    if q.device.type == "cpu" and q.dtype != torch.float64:
        causal = key_padding_mask is None and nq == nk and window is None
        bias = None if causal else visibility_bias(nq, nk, key_padding_mask, q.dtype, q.device,
                                                   window)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _plain_blocked(q, k, v, scale, key_padding_mask, window)


# --------------------------------------------------------------------------------------------
# column pass
# --------------------------------------------------------------------------------------------

def _column_block(q_rows, k_t, neg_lse_rows, first_pos: int, scale: float):
    """``sum_i P_ij`` over one block of rows of ``G`` heads sharing a kv head: ``[G, kend]``.

    ``q_rows [G, R, D]``, ``k_t [D, kend]``, ``neg_lse_rows [G, R]``; ``P_ij = exp(scale q_i.k_j -
    lse_i)``; row ``i`` sits at ``first_pos + i`` and sees keys up to it. One matmul for the
    ``G`` heads; plain tensor code so that ``torch.compile`` fuses mask, exp and the column sum
    into one sweep after it.
    """
    heads, rows, dim = q_rows.shape
    s = torch.addmm(neg_lse_rows.reshape(-1, 1), q_rows.reshape(heads * rows, dim), k_t,
                    alpha=scale).view(heads, rows, -1)
    pos = first_pos + torch.arange(rows, device=q_rows.device)
    cols = torch.arange(k_t.shape[1], device=q_rows.device)
    s = torch.where(cols[None, :] <= pos[:, None], s, float("-inf"))
    return torch.exp(s).sum(1)


# Below this many q k^T entries per head the compiled block is not worth its compile time.
COMPILE_MIN_ENTRIES = 1 << 20
_compiled_block = None


def _pick_column_block(nq: int, nk: int):
    """The compiled block for large inputs on the CPU (``ACT_KERNELS_COMPILE=0`` turns it off,
    ``=1`` forces it), else the eager one. A failed compile warns once and falls back."""
    global _compiled_block
    mode = os.environ.get("ACT_KERNELS_COMPILE", "auto").lower()
    if mode in ("0", "false", "off") or (mode == "auto" and nq * nk < COMPILE_MIN_ENTRIES):
        return _column_block
    if _compiled_block is None:
        _compiled_block = torch.compile(_column_block, dynamic=True)
    return _compiled_block


def _run_block(fn, *args):
    global _compiled_block
    if fn is _column_block:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        warnings.warn(f"act_kernels: torch.compile of the column pass failed ({err!r:.200}); "
                      "using the slower eager column pass. Set ACT_KERNELS_COMPILE=0 to silence.")
        os.environ["ACT_KERNELS_COMPILE"] = "0"
        _compiled_block = None
        return _column_block(*args)


def _kv_groups(b_idx, h_idx, group: int) -> dict:
    """``{(b, kv_head): [(pair, h), ...]}``: the pairs that read the same kv head."""
    shared = {}
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        shared.setdefault((b, h // group), []).append((p, h))
    return shared


def key_span(first_pos: int, last_pos: int) -> tuple:
    """Keys ``[lo, hi)`` that some row at positions ``first_pos..last_pos`` sees: ``[0, last_pos]``.

    The one place that decides a block of rows' key range (a sliding window would raise ``lo``);
    :func:`_hidden` and :func:`_rows_seeing` give the visibility inside the range.
    """
    return 0, last_pos + 1


def _hidden(row_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """``[rows, keys]`` bool: True where the row at ``row_pos`` does not see the key at ``key_pos``."""
    return key_pos[None, :] > row_pos[:, None]


def _rows_seeing(key_pos: torch.Tensor, first_pos: int, last_pos: int) -> torch.Tensor:
    """How many rows at positions ``first_pos..last_pos`` see each key of ``key_pos`` (all in the
    rows' :func:`key_span`)."""
    return (last_pos + 1 - key_pos).clamp_(max=last_pos + 1 - first_pos)


def column_sums(q, k, neg_lse, b_idx, h_idx, scale):
    """``[P, Nk]`` float32: ``sum_i P_ij`` over the rows that see ``j``, for each (b, h) pair.

    The exact column pass over every key (``return_stats`` uses it: it reports every score).
    ``neg_lse`` is ``-lse`` with ``-inf`` on rows that must not count (padded queries), so they
    add exact zeros. Pairs reading the same kv head share one matmul per block of rows; keys
    past a block's last row are never computed. Padded keys get garbage sums, which the caller
    discards (no row sees them, so they have no score).
    """
    nq = q.shape[2]
    nk = k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = _work_dtype(q.dtype)
    sums = torch.empty(len(b_idx), nk, dtype=work, device=q.device)
    block = _pick_column_block(nq, nk)
    for (b, kv_head), members in _kv_groups(b_idx, h_idx, group).items():
        pairs = [p for p, _ in members]
        q_heads = q[b, [h for _, h in members]].to(work)          # [G, Nq, D]
        kt = k[b, kv_head].to(work).t()
        nl = neg_lse[pairs]
        acc = torch.zeros(len(pairs), nk, dtype=work, device=q.device)
        rows = max(COLUMN_MIN_ROWS, COLUMN_BLOCK_FLOATS // (nk * len(pairs)))
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            kend = nk - nq + r1
            acc[:, :kend] += _run_block(block, q_heads[:, r0:r1], kt[:, :kend], nl[:, r0:r1],
                                        nk - nq + r0, scale)
        sums[pairs] = acc
    return sums.float()


# --------------------------------------------------------------------------------------------
# pruned column pass: bound every key cheaply, sum exactly only the keys that could be sinks
# --------------------------------------------------------------------------------------------

# Floats of one block of the bound pass (rows x heads x keys): 4 Mi entries, at least 32 rows.
BOUND_BLOCK_FLOATS = 1 << 20
BOUND_MIN_ROWS = 32
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


def column_bounds(q, k, neg_lse, b_idx, h_idx, scale):
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
    work = _work_dtype(q.dtype)
    bounds = torch.empty(len(b_idx), nk, dtype=torch.float32, device=q.device)
    for (b, kv_head), members in _kv_groups(b_idx, h_idx, group).items():
        pairs = [p for p, _ in members]
        heads = len(pairs)
        q_heads = q[b, [h for _, h in members]].to(work)                   # [G, Nq, D]
        k_head = k[b, kv_head].to(work)                                    # [Nk, D]
        nl = neg_lse[pairs].clamp(min=_DEAD_ROW).float()                   # [G, Nq]
        low = _bound_dtype(q.device)
        slack = _logit_slack(q_heads, k_head, nl, scale, low)              # [Nk]
        if low != torch.float32 and float(slack.max()) > MAX_LOW_SLACK:    # huge logits
            low = torch.float32
            slack = _logit_slack(q_heads, k_head, nl, scale, low)
        out_rounding = 2 * torch.finfo(low).eps      # |x - fl(x)| <= 2 u |fl(x)|, u = eps / 2
        nl_high = nl.to(low)
        nl_low = (nl - nl_high.float()).to(low)
        # rows: [Nq, G, D + 2] = (scale q, -lse high, -lse low); keys: [Nk, D + 2] = (k, 1, 1)
        q_aug = torch.cat([(q_heads * scale).to(low), nl_high[..., None], nl_low[..., None]],
                          -1).transpose(0, 1).contiguous()
        k_aug = torch.cat([k_head.to(low), torch.ones(nk, 2, dtype=low, device=q.device)], -1)
        acc = torch.zeros(heads, nk, dtype=torch.float32, device=q.device)
        rows = max(BOUND_MIN_ROWS, BOUND_BLOCK_FLOATS // (nk * heads))
        buffer = torch.empty(min(rows, nq) * heads * nk, dtype=low, device=q.device)
        key_pos = torch.arange(nk, device=q.device)
        key_pos_f = key_pos.float()
        row_pos = key_pos[nk - nq:]
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            first_pos, last_pos = nk - nq + r0, nk - nq + r1 - 1
            lo, hi = key_span(first_pos, last_pos)
            s = torch.mm(q_aug[r0:r1].view((r1 - r0) * heads, dim + 2), k_aug[lo:hi].t(),
                         out=buffer[:(r1 - r0) * heads * (hi - lo)].view(-1, hi - lo))
            s = s.view(r1 - r0, heads, hi - lo)
            edge = max(first_pos, lo)     # keys from here on are hidden from some rows
            hidden = _hidden(row_pos[r0:r1], key_pos[edge:hi])
            s[:, :, edge - lo:].masked_fill_(hidden[:, None, :], float("-inf"))
            # every key of the span is seen by some row, so the max is finite (no inf - inf)
            top = s.amax(0).float()                                        # [G, keys]
            top = top.abs().mul_(out_rounding).add_(top).add_(slack[lo:hi]).exp_()
            acc[:, lo:hi].addcmul_(top, _rows_seeing(key_pos_f[lo:hi], first_pos, last_pos))
        bounds[pairs] = acc * (1.0 + (2 * nq + 64) * 4 * _ROUNDING)       # rounding of sums
    return bounds


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


def candidate_sums(q, k, neg_lse, b_idx, h_idx, candidates, scale):
    """``[P, Nk]`` float32: the exact ``sum_i P_ij`` of the keys in ``candidates [P, Nk]``, 0 for
    the others. Each block of rows reads only the candidates it sees."""
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = _work_dtype(q.dtype)
    sums = torch.zeros(len(b_idx), nk, dtype=work, device=q.device)
    positions = torch.arange(nk - nq, nk, device=q.device)
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        idx = candidates[p].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        ks = k[b, h // group][idx].to(work)
        qp = q[b, h].to(work)
        acc = torch.zeros(idx.numel(), dtype=work, device=q.device)
        rows = _block_rows(idx.numel())
        for r0 in range(max(0, int(idx[0]) - (nk - nq)), nq, rows):
            r1 = min(nq, r0 + rows)
            seen = int(torch.searchsorted(idx, positions[r1 - 1], right=True))
            acc[:seen] += _probs_on_keys(qp[r0:r1], ks[:seen], neg_lse[p, r0:r1], idx[:seen],
                                         positions[r0:r1], scale).sum(0)
        sums[p, idx] = acc
    return sums.float()


def pruned_column_sums(q, k, neg_lse, b_idx, h_idx, counts, first, tau, scale):
    """``(sums, candidates)``: column sums exact for the keys that could be sinks (the
    candidates), 0 for the keys that provably cannot.

    A key is skipped when its :func:`column_bounds` stays at most ``tau * count``: its exact
    score is then at most tau, so it is no sink whichever path computes it. Keys just above or
    just below tau are never skipped (the bound is at least their exact sum), nor is any key
    whose decision is close; the first valid key (never a sink) and keys no row sees are.
    """
    bounds = column_bounds(q, k, neg_lse, b_idx, h_idx, scale)
    keys = torch.arange(k.shape[2], device=q.device)
    candidates = (bounds > tau * counts) & (counts > 0) & (keys[None, :] != first[:, None])
    return candidate_sums(q, k, neg_lse, b_idx, h_idx, candidates, scale), candidates


# --------------------------------------------------------------------------------------------
# sink correction
# --------------------------------------------------------------------------------------------

def _probs_on_keys(q_rows, keys, neg_lse_rows, key_pos, row_pos, scale):
    """``P_ij = exp(scale q_i.k_j - lse_i)`` of a few rows on a few keys, 0 where hidden."""
    s = torch.addmm(neg_lse_rows[:, None], q_rows, keys.t(), alpha=scale)
    s.masked_fill_(_hidden(row_pos, key_pos), float("-inf"))
    return s.exp_()


def _nonsink_rows(qp, kp, vp, lse_rows, positions, skip_keys, scale):
    """For a few rows, exactly: the non-sink average ``sum_{j not in S} P_ij v_j / (1 - m_i)``
    and the non-sink mass ``1 - m_i``, by blocks of rows.

    The average is a softmax over the non-sink keys, so it keeps full precision even when
    ``1 - m_i`` is subnormal. ``skip_keys [Nk]`` marks the sinks and the padded keys.
    """
    nk = kp.shape[0]
    averages, rests = [], []
    rows = _block_rows(nk)
    for r0 in range(0, qp.shape[0], rows):
        r1 = min(qp.shape[0], r0 + rows)
        s = torch.mm(qp[r0:r1], kp.t()).mul_(scale)
        hidden = _hidden(positions[r0:r1], torch.arange(nk, device=qp.device)) | skip_keys
        s.masked_fill_(hidden, float("-inf"))
        lse_rest = torch.logsumexp(s, dim=1, keepdim=True)
        finite = torch.isfinite(lse_rest)
        share = torch.exp(s - torch.where(finite, lse_rest, 0.0))
        averages.append(share @ vp)
        rests.append(torch.where(finite, torch.exp(lse_rest - lse_rows[r0:r1, None]), 0.0))
    return torch.cat(averages), torch.cat(rests)


def sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated, beta, scale,
                    key_padding_mask):
    """Rewrite ``out`` in place for calibrated pairs; return ``sink_mass [P, Nq]`` for all pairs.

    For each row: ``m_i`` and ``w_i`` from the sink keys only, then the identity. Rows whose
    non-sink mass is below ``stable_rest`` lose too many digits in ``u - w``; their non-sink part
    is recomputed directly.
    """
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = _work_dtype(q.dtype)
    threshold = stable_rest(q.dtype)
    mass = torch.zeros(len(b_idx), nq, dtype=torch.float32, device=q.device)
    positions = torch.arange(nk - nq, nk, device=q.device)
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        idx = sinks[p].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        kp, vp = k[b, h // group], v[b, h // group]
        ks, vs = kp[idx].to(work), vp[idx].to(work)
        qp = q[b, h].to(work)
        first_row = max(0, int(idx[0]) - (nk - nq))   # earlier rows see no sink
        rows = _block_rows(idx.numel())
        for r0 in range(first_row, nq, rows):
            r1 = min(nq, r0 + rows)
            ps = _probs_on_keys(qp[r0:r1], ks, neg_lse[p, r0:r1], idx, positions[r0:r1], scale)
            m = ps.sum(1, keepdim=True)
            mass[p, r0:r1] = m.squeeze(1).float()
            if not calibrated[p]:
                continue
            w = ps @ vs
            u = out[b, h, r0:r1].to(work)
            new = calibrate_rows(u, w, m, beta)
            shaky = ((1.0 - m) < threshold).squeeze(1) & (m.squeeze(1) > 0)
            if bool(shaky.any()):
                sel = shaky.nonzero().squeeze(1)
                skip = sinks[p].clone()
                if key_padding_mask is not None:
                    skip |= ~key_padding_mask[b]
                average, rest = _nonsink_rows(qp[r0:r1][sel], kp.to(work), vp.to(work),
                                              -neg_lse[p, r0:r1][sel], positions[r0:r1][sel],
                                              skip, scale)
                fixed = beta * w[sel] + average * (1.0 - beta * m[sel])
                new[sel] = torch.where(rest > 0, fixed, u[sel])
            out[b, h, r0:r1] = new.to(out.dtype)
    return mass


# --------------------------------------------------------------------------------------------
# decode: one row per head, all heads at once
# --------------------------------------------------------------------------------------------

def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _decode(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats):
    """One query row per head: ``P`` is as small as the output, so it is calibrated directly.

    Kept to few tensor ops: at decode sizes their dispatch cost, not arithmetic, is the bill.
    """
    bsz, hq, _, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = _work_dtype(q.dtype)
    # [B, Hkv, group, Nk]: the query heads of a group read their kv head once, unrepeated.
    logits = torch.matmul(_as(q, work).reshape(bsz, hkv, group, dim) * scale,
                          _as(k, work).transpose(-1, -2))
    alive = None
    if key_padding_mask is not None:
        alive = key_padding_mask[:, -1]                       # is the query itself real?
        hidden = ~key_padding_mask | ~alive[:, None]
        logits.masked_fill_(hidden[:, None, None, :], float("-inf"))
        logits.masked_fill_(~alive[:, None, None, None], 0.0)   # a dead row: finite, zeroed below
    logits = logits.view(bsz, hq, nk)
    probs = torch.softmax(logits, dim=-1)

    stats = None
    if heads is not None or return_stats:
        sinks = _decode_sinks(probs, tau, key_padding_mask, alive)
        if return_stats:
            mass = torch.where(sinks, probs, 0.0).sum(-1, keepdim=True)   # m, [B, Hq, 1]
            scores = probs if alive is None else probs * alive[:, None, None]
            stats = {"scores": scores.float(), "sinks": sinks, "sink_mass": mass.float(),
                     "calibrated": _calibrated(heads, bsz, hq, q.device)}
        if heads is not None:
            sinks = sinks & heads[:, :, None]
            if bool(sinks.any()):     # else no calibrated row has a sink: every row unchanged
                probs = _calibrate_decode_rows(probs, logits, sinks, beta, q.dtype)
    out = torch.matmul(probs.view(bsz, hkv, group, nk), _as(v, work)).reshape(bsz, hq, 1, dim)
    if alive is not None:
        out = out * alive[:, None, None, None]
    return out.to(q.dtype), stats


def _decode_sinks(probs, tau, key_padding_mask, alive):
    """Sinks of single rows ``[B, Hq, Nk]``: ``P > tau``, the first valid key excepted (padded
    keys have ``P = 0``; a padded query has no sink)."""
    sinks = probs > tau
    if key_padding_mask is None:
        sinks[:, :, 0] = False
    else:
        bsz, hq = probs.shape[:2]
        first = first_valid_index(key_padding_mask, bsz, probs.device)
        sinks.scatter_(2, first[:, None, None].expand(bsz, hq, 1), False)
        sinks &= alive[:, None, None]
    return sinks


def _calibrate_decode_rows(probs, logits, sinks, beta, dtype):
    """``P'`` of single rows: beta P on the sinks, ``(1 - beta m) / (1 - m) P`` off them.

    ``sinks`` holds the sinks of calibrated rows only; rows without one keep ``P * 1``, exactly.
    """
    mass = torch.where(sinks, probs, 0.0).sum(-1, keepdim=True)       # m, [B, Hq, 1]
    rest = 1.0 - mass
    change = (mass > 0) & (rest > 0)
    off_sink = torch.where(change, (1.0 - beta * mass) / rest, 1.0)     # in probs' dtype
    new = probs * torch.where(sinks & change, beta, off_sink)
    shaky = change & (rest < stable_rest(dtype))
    if bool(shaky.any()):
        # 1 - m too small to divide by: the non-sink part is a softmax over the non-sink keys,
        # exact even when 1 - m is subnormal (or rounds to 0).
        share = torch.softmax(logits.masked_fill(sinks, float("-inf")), dim=-1)
        exact_rest = torch.where(sinks, 0.0, probs).sum(-1, keepdim=True)
        fixed = torch.where(sinks, beta * probs, share * (1.0 - beta * mass))
        new = torch.where(shaky, torch.where(exact_rest > 0, fixed, probs), new)
    return new


def _calibrated(heads, bsz, hq, device):
    if heads is None:
        return torch.zeros(bsz, hq, dtype=torch.bool, device=device)
    return heads.clone()


def _stats(scores, sinks, mass, heads, q_shape, nk: int) -> dict:
    """The statistics dict of a prefill call from the per-pair tensors (every (b, h) pair)."""
    bsz, hq, nq, _ = q_shape
    return {"scores": scores.reshape(bsz, hq, nk), "sinks": sinks.reshape(bsz, hq, nk),
            "sink_mass": mass.reshape(bsz, hq, nq),
            "calibrated": _calibrated(heads, bsz, hq, scores.device)}


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------

def pair_neg_lse(lse, b_idx, h_idx, key_padding_mask, dtype):
    """``-lse [P, Nq]`` of the (b, h) pairs in the work dtype, ``-inf`` on padded query rows (they
    count for nothing in any column sum)."""
    neg_lse = -lse[b_idx, h_idx].to(_work_dtype(dtype))
    if key_padding_mask is not None:
        dead = ~key_padding_mask[:, key_padding_mask.shape[1] - lse.shape[2]:]
        neg_lse.masked_fill_(dead[b_idx], float("-inf"))
    return neg_lse


def act_attention_torch(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                        window=None):
    """Backend entry point (arguments normalised by :func:`act_kernels.op.act_attention`)."""
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    if window is not None:
        return windowed_attention(q, k, v, heads, beta, tau, scale, key_padding_mask,
                                  return_stats, window)
    if nq == 1:
        return _decode(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats)

    out, lse = plain_attention(q, k, v, scale, key_padding_mask)
    wanted = torch.ones(bsz, hq, dtype=torch.bool, device=q.device) if return_stats else heads
    if wanted is None:
        return out, None

    b_idx, h_idx = wanted.nonzero(as_tuple=True)
    neg_lse = pair_neg_lse(lse, b_idx, h_idx, key_padding_mask, q.dtype)
    counts = seen_counts(nq, nk, key_padding_mask, bsz, q.device)[b_idx]
    first = first_valid_index(key_padding_mask, bsz, q.device)[b_idx]
    sums, candidates = pruned_column_sums(q, k, neg_lse, b_idx, h_idx, counts, first, tau, scale)
    if return_stats:
        # Report every key's score: the pruned keys' from the full column pass (all provably
        # <= tau), the candidates' from the very sums that decide them, so that the sinks are
        # the same with and without return_stats even where a score ties with tau.
        sums = torch.where(candidates, sums, column_sums(q, k, neg_lse, b_idx, h_idx, scale))
    scores, sinks = select_sinks(sums[:, None], counts, tau, first)
    scores, sinks = scores[:, 0], sinks[:, 0]

    calibrated = (heads[b_idx, h_idx] if heads is not None
                  else torch.zeros(len(b_idx), dtype=torch.bool, device=q.device))
    out = out.contiguous() if not out.is_contiguous() else out
    mass = sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated.tolist(),
                           beta, scale, key_padding_mask)
    if not return_stats:
        return out, None
    return out, _stats(scores, sinks, mass, heads, q.shape, nk)


act_attention_torch.SUPPORTS_WINDOW = True


# --------------------------------------------------------------------------------------------
# sliding windows: every pass over the band of keys a block of rows sees, O(Nq W)
# --------------------------------------------------------------------------------------------
# A block of rows at positions p0..p1 sees keys [p0 - W + 1, p1] only: every pass works on that
# span, so a windowed call never touches the N x N map and costs O(Nq (W + rows)). The rows of
# a block are the last rows of their span, so the span is an ordinary bottom-right call with the
# window as an extra band: the plain pass is the fused kernel on it. The column sums land in a
# full-length [pairs, Nk] array, so the first valid key of the *sequence* is excluded even when
# no row of the call sees it. Calibrated rows are recomputed from P directly (P' v), which needs
# no identity and no cancellation guard.

def _window_blocks(nq: int, nk: int, window: int):
    """``(r0, r1, lo, hi)``: blocks of query rows and the key span ``[lo, hi)`` they see. Blocks
    of about ``W / 2`` rows (64..256): spans of ~1.5 W keys, few enough tensor ops per call."""
    rows = min(256, max(64, window // 2))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        yield r0, r1, max(0, nk - nq + r0 - window + 1), nk - nq + r1


def windowed_attention(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats, window):
    """ACT with a sliding window (see the section comment): plain pass, column sums, sinks, and
    the calibrated rows rewritten, each block of rows over its own span of keys, every (b, h)
    pair of a block in one batched matmul."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    group = hq // k.shape[1]
    work = _work_dtype(q.dtype)
    kpm = key_padding_mask
    out = torch.empty(bsz, hq, nq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device)
    blocks = list(_window_blocks(nq, nk, window))
    for r0, r1, lo, hi in blocks:
        o, l = plain_attention(q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], scale,
                               None if kpm is None else kpm[:, lo:hi], window)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, l
    wanted = torch.ones(bsz, hq, dtype=torch.bool, device=q.device) if return_stats else heads
    if wanted is None:
        return out, None

    b_idx, h_idx = wanted.nonzero(as_tuple=True)
    kv_idx = h_idx // group
    neg_lse = pair_neg_lse(lse, b_idx, h_idx, kpm, q.dtype)

    def block_probs(r0, r1, lo, hi):
        """``P [pairs, rows, span]`` of one block, 0 where a row does not see a key."""
        row_pos = torch.arange(nk - nq + r0, nk - nq + r1, device=q.device)[:, None]
        key_pos = torch.arange(lo, hi, device=q.device)[None, :]
        hidden = ((key_pos > row_pos) | (key_pos <= row_pos - window))[None]
        if kpm is not None:
            hidden = hidden | ~kpm[b_idx, None, lo:hi]
        s = torch.matmul(q[b_idx, h_idx, r0:r1].to(work),
                         k[b_idx, kv_idx, lo:hi].to(work).transpose(-1, -2))
        s = s * scale + neg_lse[:, r0:r1, None]
        return torch.exp(s.masked_fill_(hidden, float("-inf")))

    sums = torch.zeros(len(b_idx), nk, dtype=work, device=q.device)
    for r0, r1, lo, hi in blocks:
        sums[:, lo:hi] += block_probs(r0, r1, lo, hi).sum(1)
    counts = seen_counts(nq, nk, kpm, bsz, q.device, window)[b_idx]
    first = first_valid_index(kpm, bsz, q.device)[b_idx]
    scores, sinks = select_sinks(sums.float()[:, None], counts, tau, first)
    scores, sinks = scores[:, 0], sinks[:, 0]

    # The correction reads the sink keys only (the identity o = beta w + (1 - beta m) / (1 - m)
    # (u - w)); rows whose 1 - m is too small to divide by are recomputed from the whole span.
    rewrite = (heads[b_idx, h_idx] if heads is not None
               else torch.zeros(len(b_idx), dtype=torch.bool, device=q.device))[:, None, None]
    mass = torch.zeros(len(b_idx), nq, dtype=torch.float32, device=q.device)
    shaky_at = stable_rest(q.dtype)
    for r0, r1, lo, hi in blocks:
        keys = lo + sinks[:, lo:hi].any(0).nonzero().flatten()         # sink keys of any pair
        if keys.numel() == 0:
            continue
        row_pos = torch.arange(nk - nq + r0, nk - nq + r1, device=q.device)[:, None]
        seen = (keys[None, :] <= row_pos) & (keys[None, :] > row_pos - window)
        s = torch.matmul(q[b_idx, h_idx, r0:r1].to(work),
                         k[b_idx, kv_idx][:, keys].to(work).transpose(-1, -2))
        p_sink = torch.exp(s * scale + neg_lse[:, r0:r1, None])
        p_sink = torch.where(seen[None] & sinks[:, None, keys], p_sink, 0.0)   # [P, R, S]
        m = p_sink.sum(-1, keepdim=True)
        mass[:, r0:r1] = m[..., 0]
        rest = 1.0 - m
        # rows with 1 - m at or below the guard (even <= 0: m carries the LSE's rounding) are
        # decided and computed from their directly summed non-sink mass below
        change = (m > 0) & rewrite
        if not bool(change.any()):
            continue
        w = torch.matmul(p_sink, v[b_idx, kv_idx][:, keys].to(work))         # [P, R, D]
        u = out[b_idx, h_idx, r0:r1].to(work)
        shaky = change & (rest < shaky_at)
        gain = (1.0 - beta * m) / torch.where(shaky, torch.ones_like(rest), rest)
        new = beta * w + gain * (u - w)
        if bool(shaky.any()):
            probs = block_probs(r0, r1, lo, hi)
            sink = sinks[:, None, lo:hi]
            direct = torch.where(sink, 0.0, probs)                 # non-sink part, exactly
            left = direct.sum(-1, keepdim=True)
            fixed = beta * w + torch.matmul(
                direct * ((1.0 - beta * m) / torch.where(left > 0, left, torch.ones_like(left))),
                v[b_idx, kv_idx, lo:hi].to(work))
            new = torch.where(shaky & (left > 0), fixed, torch.where(shaky, u, new))
        out[b_idx, h_idx, r0:r1] = torch.where(change, new.to(q.dtype),
                                               out[b_idx, h_idx, r0:r1])
    if not return_stats:
        return out, None
    return out, _stats(scores, sinks, mass, heads, q.shape, nk)
