"""The portable torch backend of ACT: exact, and never more than a block of rows of P in memory.

Data path for a prefill (``Nq > 1``)::

    q, k, v --plain pass--> out, lse          (fused SDPA kernel; every head)
            --bound pass--> bound of sum_i P_ij (calibrated heads; q k^T in bfloat16, block maxima)
            --exact sums--> sum_i P_ij        (only keys whose bound reaches tau * count)
            --sink selection--> S             (tiny: per key)
            --sink correction--> out          (calibrated heads, sink keys only, by the identity)

``return_stats`` adds the full exact column pass (``column_sums``) to report every key's score.
A short prefill (``Nq x Nk <= DENSE_MAX_ENTRIES``, the head search's prompts) skips the bound and
the identity: ``dense_pairs`` forms each wanted pair's whole ``P`` (a few KiB) and takes the column
sums, the sinks, the sink mass and both halves of the calibrated output from it by batched
products, for all pairs at once.
With a sliding window (``window=W``) every pass works block by block on the span of keys the
block's rows see (``key_span``), so the call costs ``O(Nq W)``; a windowed decode takes this path.
A decode step (``Nq == 1``, no window) is one short vectorised pass over all heads at once: its
single row of P is as small as the output, so it is calibrated directly, without the identity,
and only when a calibrated row has a sink. See ``csrc_notes/act_passes.md``.
"""
from __future__ import annotations

import bisect
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
    if window is not None and window < k.shape[2]:
        return _windowed_plain(q, k, v, scale, key_padding_mask, window)
    return _plain_in_one(q, k, v, scale, key_padding_mask, window)


def _plain_in_one(q, k, v, scale, key_padding_mask, window=None):
    """:func:`plain_attention` of every row over every key (the band, if any, as a mask)."""
    nq, nk = q.shape[2], k.shape[2]
    if q.device.type == "cpu" and q.dtype != torch.float64:
        causal = key_padding_mask is None and nq == nk and window is None
        bias = None if causal else visibility_bias(nq, nk, key_padding_mask, q.dtype, q.device,
                                                   window)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _plain_blocked(q, k, v, scale, key_padding_mask, window)


# Rows of one block of the windowed plain pass (see window_blocks).
WINDOW_BLOCK_ROWS = 256


def window_blocks(nq: int, nk: int, window: int):
    """``(r0, r1, lo, hi)``: blocks of query rows and the key span ``[lo, hi)`` they see.

    A block of ``R`` rows computes ``R (R + W - 1)`` entries for about ``R W`` visible ones, but
    the fused CPU kernel runs short queries in small, slower tiles: ``R = 256`` (at most ``W``,
    at least 64) measured best at W = 512 (``csrc_notes/act_passes.md``)."""
    rows = max(64, min(WINDOW_BLOCK_ROWS, window))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        yield (r0, r1) + key_span(nk - nq + r0, nk - nq + r1 - 1, window)


def _windowed_plain(q, k, v, scale, key_padding_mask, window):
    """:func:`plain_attention` within a window, block by block: a block's rows are the last rows
    of its span of keys, so the span is a bottom-right call with the band as its mask. Without
    padding the fused kernel takes one band built for a full block, sliced for the others."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    out = torch.empty(bsz, hq, nq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=_work_dtype(q.dtype), device=q.device)
    shared_band = key_padding_mask is None and q.device.type == "cpu" and q.dtype != torch.float64
    band = None
    for r0, r1, lo, hi in window_blocks(nq, nk, window):
        if not shared_band:
            o, l = _plain_in_one(q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], scale,
                                 None if key_padding_mask is None
                                 else key_padding_mask[:, lo:hi], window)
            out[:, :, r0:r1], lse[:, :, r0:r1] = o, l
            continue
        if band is None:     # rows of a full block see columns [i, i + W - 1] of its span
            rows = r1 - r0
            band = visibility_bias(rows, rows + window - 1, None, q.dtype, q.device, window)
        cut = lo - (nk - nq + r0 - window + 1)        # columns cut off at position 0
        bias = band[..., :r1 - r0, cut:window - 1 + r1 - r0]
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], 0.0, False, attn_mask=bias,
            scale=scale)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, l
    return out, lse


# --------------------------------------------------------------------------------------------
# column pass
# --------------------------------------------------------------------------------------------

def _column_block(q_rows, k_t, neg_lse_rows, first_pos: int, scale: float, window: int):
    """``sum_i P_ij`` over one block of rows of ``G`` heads sharing a kv head: ``[G, span]``.

    ``q_rows [G, R, D]``, ``k_t [D, span]``, ``neg_lse_rows [G, R]``; ``P_ij = exp(scale q_i.k_j -
    lse_i)``; row ``i`` sits at column ``first_pos + i`` of the span and sees the ``window``
    columns up to it. One matmul for the ``G`` heads; plain tensor code so that
    ``torch.compile`` fuses mask, exp and the column sum into one sweep after it.
    """
    heads, rows, dim = q_rows.shape
    s = torch.addmm(neg_lse_rows.reshape(-1, 1), q_rows.reshape(heads * rows, dim), k_t,
                    alpha=scale).view(heads, rows, -1)
    pos = first_pos + torch.arange(rows, device=q_rows.device)
    behind = pos[:, None] - torch.arange(k_t.shape[1], device=q_rows.device)[None, :]
    s = torch.where((behind >= 0) & (behind < window), s, float("-inf"))
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


def key_span(first_pos: int, last_pos: int, window=None) -> tuple:
    """Keys ``[lo, hi)`` that some row at positions ``first_pos..last_pos`` sees: up to
    ``last_pos``, from 0 or, within a window, from ``first_pos - W + 1``.

    The one place that decides a block of rows' key range; :func:`_hidden` and
    :func:`_rows_seeing` give the visibility inside it.
    """
    lo = 0 if window is None else max(0, first_pos - window + 1)
    return lo, last_pos + 1


def _hidden(row_pos: torch.Tensor, key_pos: torch.Tensor, window=None) -> torch.Tensor:
    """``[rows, keys]`` bool: True where the row at ``row_pos`` does not see the key at ``key_pos``."""
    behind = row_pos[:, None] - key_pos[None, :]
    return behind < 0 if window is None else (behind < 0) | (behind >= window)


def _rows_seeing(key_pos: torch.Tensor, first_pos: int, last_pos: int, window=None):
    """How many rows at positions ``first_pos..last_pos`` see each key of ``key_pos`` (keys of
    the rows' :func:`key_span`):
    those from ``max(first_pos, j)`` to ``min(last_pos, j + W - 1)``."""
    top = key_pos.clamp(min=first_pos)
    end = last_pos if window is None else (key_pos + (window - 1)).clamp_(max=last_pos)
    return (end + 1 - top).clamp_(min=0)


def column_sums(q, k, neg_lse, b_idx, h_idx, scale, window=None):
    """``[P, Nk]`` float32: ``sum_i P_ij`` over the rows that see ``j``, for each (b, h) pair.

    The exact column pass over every key (``return_stats`` uses it: it reports every score).
    ``neg_lse`` is ``-lse`` with ``-inf`` on rows that must not count (padded queries), so they
    add exact zeros. Pairs reading the same kv head share one matmul per block of rows; keys
    outside a block's :func:`key_span` are never computed. Padded keys get garbage sums, which
    the caller discards (no row sees them, so they have no score).
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
        width = nk if window is None else min(nk, 2 * window)        # about a span's keys
        rows = max(COLUMN_MIN_ROWS, COLUMN_BLOCK_FLOATS // (width * len(pairs)))
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            lo, hi = key_span(nk - nq + r0, nk - nq + r1 - 1, window)
            acc[:, lo:hi] += _run_block(block, q_heads[:, r0:r1], kt[:, lo:hi], nl[:, r0:r1],
                                        nk - nq + r0 - lo, scale, window or nk + 1)
        sums[pairs] = acc
    return sums.float()


# --------------------------------------------------------------------------------------------
# pruned column pass: bound every key cheaply, sum exactly only the keys that could be sinks
# --------------------------------------------------------------------------------------------

# Floats of one block of the bound pass (rows x heads x keys): 1 Mi (4 MiB), at least 32 rows.
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
    work = _work_dtype(q.dtype)
    bounds = torch.empty(len(b_idx), nk, dtype=torch.float32, device=q.device)
    for (b, kv_head), members in _kv_groups(b_idx, h_idx, group).items():
        pairs = [p for p, _ in members]
        heads = len(pairs)
        q_heads = _heads_of(q[b], [h for _, h in members]).to(work)        # [G, Nq, D]
        k_head = k[b, kv_head].to(work)                                    # [Nk, D]
        nl = neg_lse[pairs].clamp(min=_DEAD_ROW).float()                   # [G, Nq]
        low = _bound_dtype(q.device)
        slack = _logit_slack(q_heads, k_head, nl, scale, low)              # [Nk]
        if low != torch.float32 and float(slack.max()) > MAX_LOW_SLACK:    # huge logits
            low = torch.float32
            slack = _logit_slack(q_heads, k_head, nl, scale, low)
        out_rounding = 2 * torch.finfo(low).eps      # |x - fl(x)| <= 2 u |fl(x)|, u = eps / 2
        # rows: [Nq, G, D + 2] = (scale q, -lse high, -lse low); keys: [Nk, D + 2] = (k, 1, 1)
        q_aug = torch.empty(nq, heads, dim + 2, dtype=low, device=q.device)
        torch.mul(q_heads.transpose(0, 1), scale, out=q_aug[..., :dim])
        q_aug[..., dim] = nl.t()
        q_aug[..., dim + 1] = nl.t() - q_aug[..., dim].float()
        k_aug = torch.cat([k_head.to(low), torch.ones(nk, 2, dtype=low, device=q.device)], -1)
        acc = torch.zeros(heads, nk, dtype=torch.float32, device=q.device)
        rows = _bound_rows(nk, heads, window)
        width = nk if window is None else min(nk, rows + window - 1)      # keys of a span
        buffer = torch.empty(min(rows, nq) * heads * width, dtype=low, device=q.device)
        key_pos = torch.arange(nk, device=q.device)
        key_pos_f = key_pos.float()
        # What is the same for every full block of rows, relative to its first row: [rows, 1,
        # rows], -inf where row i does not see the key d > i places after the first row (added:
        # cheaper than a fill), and how many of its rows see the key d places after its first
        # row, for d = full - width .. full - 1
        full = min(rows, nq)
        ahead = torch.full((full, full), float("-inf"), dtype=low,
                           device=q.device).triu_(1)[:, None, :]
        seen_full = _rows_seeing(torch.arange(full - width, full, device=q.device).float(), 0,
                                 full - 1, window)
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            first_pos, last_pos = nk - nq + r0, nk - nq + r1 - 1
            lo, hi = key_span(first_pos, last_pos, window)
            s = torch.mm(q_aug[r0:r1].view((r1 - r0) * heads, dim + 2), k_aug[lo:hi].t(),
                         out=buffer[:(r1 - r0) * heads * (hi - lo)].view(-1, hi - lo))
            s = s.view(r1 - r0, heads, hi - lo)
            # Only keys past a row are masked: the keys a window has left behind stay in the max
            # (a max over more entries is still a bound, and those entries are small).
            edge = max(first_pos, lo)
            s[:, :, edge - lo:].add_(ahead[:r1 - r0, :, edge - first_pos:hi - first_pos])
            # every key of the span is seen by some row, so the max is finite (no inf - inf)
            top = float_max(s).float()                                     # [G, keys]
            top = top.abs().mul_(out_rounding).add_(top).add_(slack[lo:hi]).exp_()
            seen = (seen_full[width - full - (first_pos - lo):] if r1 - r0 == full
                    else _rows_seeing(key_pos_f[lo:hi], first_pos, last_pos, window))
            acc[:, lo:hi].addcmul_(top, seen)
        bounds[pairs] = acc * (1.0 + (2 * nq + 64) * 4 * _ROUNDING)       # rounding of sums
    return bounds


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def float_max(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(0)`` of a float tensor without NaN, read through its bits as integers.

    Non-negative floats order like their bits, negative ones (sign bit set) in reverse, so the
    largest float is the largest integer when that is non-negative, else the smallest one. CPUs
    reduce integers an order of magnitude faster than bfloat16 (two integer reductions of the
    bound pass's block cost a tenth of one ``amax``)."""
    bits = x.view(_BITS[x.dtype])
    high = bits.amax(0)
    return torch.where(high >= 0, high, bits.amin(0)).view(x.dtype)


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


def _blocks_seeing(keys: list, nq: int, nk: int, rows: int, window=None):
    """``(r0, r1, a, z)``: blocks of ``rows`` query rows that see some of the sorted key
    positions ``keys``, with ``keys[a:z]`` those in the block's :func:`key_span`."""
    first_row = max(0, keys[0] - (nk - nq))                    # earlier rows see none of them
    end_row = nq if window is None else min(nq, keys[-1] + window - (nk - nq))
    for r0 in range(first_row, end_row, rows):
        r1 = min(end_row, r0 + rows)
        lo, hi = key_span(nk - nq + r0, nk - nq + r1 - 1, window)
        a, z = bisect.bisect_left(keys, lo), bisect.bisect_left(keys, hi)
        if a < z:
            yield r0, r1, a, z


def candidate_sums(q, k, neg_lse, b_idx, h_idx, candidates, scale, window=None):
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
        for r0, r1, a, z in _blocks_seeing(idx.tolist(), nq, nk, _block_rows(idx.numel()),
                                           window):
            acc[a:z] += _probs_on_keys(qp[r0:r1], ks[a:z], neg_lse[p, r0:r1], idx[a:z],
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


# --------------------------------------------------------------------------------------------
# sink correction
# --------------------------------------------------------------------------------------------

def _probs_on_keys(q_rows, keys, neg_lse_rows, key_pos, row_pos, scale, window=None):
    """``P_ij = exp(scale q_i.k_j - lse_i)`` of a few rows on a few keys, 0 where hidden."""
    s = torch.addmm(neg_lse_rows[:, None], q_rows, keys.t(), alpha=scale)
    s.masked_fill_(_hidden(row_pos, key_pos, window), float("-inf"))
    return s.exp_()


def _nonsink_rows(qp, kp, vp, lse_rows, positions, skip_keys, scale, window=None):
    """For a few rows, exactly: the non-sink average ``sum_{j not in S} P_ij v_j / (1 - m_i)``
    and the non-sink mass ``1 - m_i``, by blocks of rows, each over its :func:`key_span`.

    The average is a softmax over the non-sink keys, so it keeps full precision even when
    ``1 - m_i`` is subnormal. ``kp``, ``vp`` and ``skip_keys`` (the sinks and the padded keys)
    cover every key; ``positions`` (ascending) are the rows'. Within a window a block holds rows
    less than ``W`` apart, so that it reads fewer than ``2 W`` keys.
    """
    averages, rests = [], []
    pos = positions.tolist()
    rows = _block_rows(kp.shape[0] if window is None else min(kp.shape[0], 2 * window))
    r0 = 0
    while r0 < len(pos):
        r1 = min(len(pos), r0 + rows)
        if window is not None:
            r1 = min(r1, bisect.bisect_left(pos, pos[r0] + window, r0))
        lo, hi = key_span(pos[r0], pos[r1 - 1], window)
        s = torch.mm(qp[r0:r1], kp[lo:hi].to(qp.dtype).t()).mul_(scale)
        hidden = _hidden(positions[r0:r1], torch.arange(lo, hi, device=qp.device), window)
        s.masked_fill_(hidden | skip_keys[lo:hi], float("-inf"))
        lse_rest = torch.logsumexp(s, dim=1, keepdim=True)
        finite = torch.isfinite(lse_rest)
        share = torch.exp(s - torch.where(finite, lse_rest, 0.0))
        averages.append(share @ vp[lo:hi].to(qp.dtype))
        rests.append(torch.where(finite, torch.exp(lse_rest - lse_rows[r0:r1, None]), 0.0))
        r0 = r1
    return torch.cat(averages), torch.cat(rests)


def sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated, beta, scale,
                    key_padding_mask, window=None):
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
        for r0, r1, a, z in _blocks_seeing(idx.tolist(), nq, nk, _block_rows(idx.numel()),
                                           window):
            ps = _probs_on_keys(qp[r0:r1], ks[a:z], neg_lse[p, r0:r1], idx[a:z],
                                positions[r0:r1], scale, window)
            m = ps.sum(1, keepdim=True)
            mass[p, r0:r1] = m.squeeze(1).float()
            if not calibrated[p]:
                continue
            w = ps @ vs[a:z]
            u = out[b, h, r0:r1].to(work)
            new = calibrate_rows(u, w, m, beta)
            shaky = ((1.0 - m) < threshold).squeeze(1) & (m.squeeze(1) > 0)
            if bool(shaky.any()):
                sel = shaky.nonzero().squeeze(1)
                skip = sinks[p].clone()
                if key_padding_mask is not None:
                    skip |= ~key_padding_mask[b]
                average, rest = _nonsink_rows(qp[r0:r1][sel], kp, vp, -neg_lse[p, r0:r1][sel],
                                              positions[r0:r1][sel], skip, scale, window)
                fixed = beta * w[sel] + average * (1.0 - beta * m[sel])
                new[sel] = torch.where(rest > 0, fixed, u[sel])
            out[b, h, r0:r1] = new.to(out.dtype)
    return mass


# --------------------------------------------------------------------------------------------
# dense path: short prefills, every wanted pair's P at once
# --------------------------------------------------------------------------------------------

# A prefill whose P has at most this many entries a pair (Nq x Nk) takes the dense path: the
# pruned passes' per-pair Python work costs more than computing P outright (measured in
# benchmarks/bench_dense.py; a choice made on the shape alone, so that the sinks of a call are
# the same with and without return_stats).
DENSE_MAX_ENTRIES = 1 << 16
# Floats of P held at once by the dense path (pairs x Nq x Nk), at least one pair.
DENSE_CHUNK_FLOATS = 1 << 20


def takes_dense_path(nq: int, nk: int) -> bool:
    """Whether a prefill call of ``nq`` rows over ``nk`` keys runs :func:`dense_pairs`."""
    return nq > 1 and nq * nk <= DENSE_MAX_ENTRIES


# Below this non-sink mass a dense row's calibration is recomputed from a softmax over its
# non-sink logits: its non-sink entries of P may be subnormal or zero in float32.
DENSE_TINY_REST = 1e-20


def dense_pairs(out, q, k, v, b_idx, h_idx, calibrated, beta, tau, scale, key_padding_mask,
                window=None):
    """The whole ACT step of a short prefill for the (b, h) pairs ``b_idx, h_idx``, from their
    full ``P [Nq, Nk]`` (chunks of pairs, ``DENSE_CHUNK_FLOATS``).

    Per pair: ``P``, its column sums, the sinks ``S`` and, with ``s_j = [j in S]``, three
    products with ``P`` in place of any per-entry selection: the sink mass ``m = P s``, the
    non-sink mass ``r = P (1 - s)`` and the two halves of the output, ``w = P (s v)`` and
    ``n = P ((1 - s) v)``. A calibrated row becomes ``beta w + (1 - beta m) / r * n``: no
    difference of nearly equal terms, so no identity and no cancellation. Rows whose ``r`` is
    below ``DENSE_TINY_REST`` take their non-sink part from a softmax over their non-sink logits
    (exact even where ``P`` underflows); rows with ``m = 0`` or ``r = 0`` keep ``out`` bit for
    bit. ``out`` (contiguous) is rewritten in place for the ``calibrated`` pairs.

    Returns ``(scores [P, Nk], sinks [P, Nk], mass [P, Nq])`` in float32.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = _work_dtype(q.dtype)
    counts = seen_counts(nq, nk, key_padding_mask, bsz, q.device, window)
    first = first_valid_index(key_padding_mask, bsz, q.device)
    hidden = _hidden(torch.arange(nk - nq, nk, device=q.device),
                     torch.arange(nk, device=q.device), window)[None]           # [1, Nq, Nk]
    # pairs index the flattened (batch, head) axes: one index_select per tensor, no 2-D gather
    qf = _as(q, work).reshape(bsz * hq, nq, dim)
    kf = _as(k, work).reshape(bsz * hkv, nk, dim)
    vf = _as(v, work).reshape(bsz * hkv, nk, dim)
    of = out.view(bsz * hq, nq, dim)
    pairs = b_idx * hq + h_idx
    kv_pairs = b_idx * hkv + torch.div(h_idx, group, rounding_mode="floor")
    scores, sinks, mass = [], [], []
    step = max(1, DENSE_CHUNK_FLOATS // (nq * nk))
    for c0 in range(0, len(b_idx), step):
        bi, pi, kvi = b_idx[c0:c0 + step], pairs[c0:c0 + step], kv_pairs[c0:c0 + step]
        logits = torch.bmm(qf.index_select(0, pi), kf.index_select(0, kvi).transpose(1, 2))
        logits.mul_(scale)
        dead = None
        if key_padding_mask is None:
            logits.masked_fill_(hidden, float("-inf"))
        else:
            keys = key_padding_mask.index_select(0, bi)                          # [c, Nk]
            logits.masked_fill_(hidden | ~keys[:, None, :], float("-inf"))
            dead = ~keys[:, nk - nq:, None]                                      # padded rows
            logits.masked_fill_(dead, 0.0)          # finite, so the softmax stays NaN-free
        probs = torch.softmax(logits, dim=-1)
        if dead is not None:
            probs.masked_fill_(dead, 0.0)           # padded rows count for nothing
        score, sink = select_sinks(probs.sum(1)[:, None], counts.index_select(0, bi), tau,
                                   first.index_select(0, bi))
        score, sink = score[:, 0], sink[:, 0]                                    # [c, Nk]
        on_sink = sink.to(work)
        m = torch.bmm(probs, on_sink[:, :, None])                                # [c, Nq, 1]
        scores.append(score.float())
        sinks.append(sink)
        mass.append(m[..., 0].float())
        todo = (calibrated[c0:c0 + step] & sink.any(-1)).nonzero().squeeze(1)
        if todo.numel() == 0:
            continue
        if todo.numel() == len(bi):                 # every pair of the chunk: no copies
            p, s, mt, sink_t, lg_t, rows = probs, on_sink, m, sink, logits, pi
        else:
            p, s, mt = probs.index_select(0, todo), on_sink.index_select(0, todo), m[todo]
            sink_t, lg_t, rows = sink[todo], logits[todo], pi.index_select(0, todo)
        vt = vf.index_select(0, kvi.index_select(0, todo))                       # [t, Nk, D]
        off = 1.0 - s
        halves = torch.bmm(p, torch.cat([vt * s[:, :, None], vt * off[:, :, None],
                                         off[:, :, None]], dim=2))               # [t, Nq, 2D+1]
        w, rest_part, rest = halves[..., :dim], halves[..., dim:2 * dim], halves[..., 2 * dim:]
        change = (mt > 0) & (rest > 0)                                           # [t, Nq, 1]
        new = beta * w + (1.0 - beta * mt) / torch.where(change, rest, 1.0) * rest_part
        tiny = (change & (rest < DENSE_TINY_REST))[..., 0].nonzero(as_tuple=True)
        if tiny[0].numel():
            # the non-sink part as a softmax over the non-sink logits of those rows
            lg = lg_t[tiny].masked_fill(sink_t[tiny[0]], float("-inf"))
            share = torch.softmax(lg, dim=-1)[:, None, :]                        # [u, 1, Nk]
            average = torch.bmm(share, vt[tiny[0]])[:, 0]                        # [u, D]
            new[tiny] = beta * w[tiny] + (1.0 - beta * mt[tiny]) * average
        of.index_copy_(0, rows, torch.where(change, new.to(out.dtype), of.index_select(0, rows)))
    return torch.cat(scores), torch.cat(sinks), torch.cat(mass)


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

    stats = sinks = None
    if return_stats:
        sinks = _decode_sinks(probs, tau, key_padding_mask, alive)
        mass = torch.where(sinks, probs, 0.0).sum(-1, keepdim=True)   # m, [B, Hq, 1]
        scores = probs if alive is None else probs * alive[:, None, None]
        stats = {"scores": scores.float(), "sinks": sinks, "sink_mass": mass.float(),
                 "calibrated": _calibrated(heads, bsz, hq, q.device)}
    if heads is not None and (sinks is not None
                              or _calibrated_row_may_have_sink(probs, heads, tau, key_padding_mask)):
        if sinks is None:
            sinks = _decode_sinks(probs, tau, key_padding_mask, alive)
        sinks = sinks & heads[:, :, None]
        if bool(sinks.any()):     # else no calibrated row has a sink: every row unchanged
            probs = _calibrate_rows_directly(probs, logits, sinks, beta, q.dtype)
    out = torch.matmul(probs.view(bsz, hkv, group, nk), _as(v, work)).reshape(bsz, hq, 1, dim)
    if alive is not None:
        out = out * alive[:, None, None, None]
    return out.to(q.dtype), stats


def _calibrated_row_may_have_sink(probs, heads, tau, key_padding_mask) -> bool:
    """False when no calibrated row has a key other than its first valid one with ``P > tau``
    (then no row changes): one max per row, cheaper than the sink mask. With padding the first
    valid key differs per row, so the max covers every key (a false alarm only costs the exact
    test)."""
    keys = probs[:, :, 1:] if key_padding_mask is None else probs
    if keys.shape[-1] == 0:
        return False
    return bool(((keys.amax(-1) > tau) & heads).any())


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


def _calibrate_rows_directly(probs, logits, sinks, beta, dtype):
    """``P'`` of whole rows of ``P [..., Nk]`` (``logits``: the masked logits they come from):
    beta P on the sinks, ``(1 - beta m) / (1 - m) P`` off them (the decode step's rows).

    ``sinks`` (broadcastable to ``probs``) holds the sinks of calibrated rows only; rows without
    one keep ``P * 1``, exactly.
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
    """Backend entry point (arguments normalised by :func:`act_kernels.op.act_attention`).

    With a ``window`` every pass works on the span of keys a block of rows sees (its
    :func:`key_span`), so a windowed call costs ``O(Nq W)``; the column sums still land in
    full-length ``[pairs, Nk]`` arrays, so that the first valid key of the *sequence* is
    excluded even when no row of the call sees it. A windowed decode step takes this path too.
    """
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    if nq == 1 and window is None:
        return _decode(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats)

    out, lse = plain_attention(q, k, v, scale, key_padding_mask, window)
    wanted = torch.ones(bsz, hq, dtype=torch.bool, device=q.device) if return_stats else heads
    if wanted is None:
        return out, None

    b_idx, h_idx = wanted.nonzero(as_tuple=True)
    calibrated = (heads[b_idx, h_idx] if heads is not None
                  else torch.zeros(len(b_idx), dtype=torch.bool, device=q.device))
    out = out.contiguous() if not out.is_contiguous() else out
    if takes_dense_path(nq, nk):
        scores, sinks, mass = dense_pairs(out, q, k, v, b_idx, h_idx, calibrated, beta, tau,
                                          scale, key_padding_mask, window)
        return out, (_stats(scores, sinks, mass, heads, q.shape, nk) if return_stats else None)

    neg_lse = pair_neg_lse(lse, b_idx, h_idx, key_padding_mask, q.dtype)
    counts = seen_counts(nq, nk, key_padding_mask, bsz, q.device, window)[b_idx]
    first = first_valid_index(key_padding_mask, bsz, q.device)[b_idx]
    sums, candidates = pruned_column_sums(q, k, neg_lse, b_idx, h_idx, counts, first, tau, scale,
                                          window)
    if return_stats:
        # Report every key's score: the pruned keys' from the full column pass (all provably
        # <= tau), the candidates' from the very sums that decide them, so that the sinks are
        # the same with and without return_stats even where a score ties with tau.
        sums = torch.where(candidates, sums, column_sums(q, k, neg_lse, b_idx, h_idx, scale,
                                                         window))
    scores, sinks = select_sinks(sums[:, None], counts, tau, first)
    scores, sinks = scores[:, 0], sinks[:, 0]

    mass = sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated.tolist(),
                           beta, scale, key_padding_mask, window)
    if not return_stats:
        return out, None
    return out, _stats(scores, sinks, mass, heads, q.shape, nk)


act_attention_torch.SUPPORTS_WINDOW = True

