"""The exact blocked path for bidirectional blocks (``block_ids``) and a general mask
(``attn_mask``): ``docs/spec.md`` section 3a.

Two passes over blocks of query rows, each block over the span of keys its rows see (never an
``N x N`` float map; the extra memory is ``O(N * block)``):

1. every head: the plain output and the row log-sum-exp (on the CPU by the fused SDPA kernel with
   the block's visibility as its mask, else from the block's logits); the column sums of ``P``
   (float32, float64 for float64) of the pairs that want them (calibrated, or every pair with
   ``return_stats``); the number of rows that see each key and, under a general mask, the first
   key each row sees (excluded from the sinks);
2. the sinks chosen (``act_kernels.sinks``), the pairs that need it recompute ``P`` on the
   block: the sink mass ``m`` of every row and, for the calibrated pairs, both halves of the
   output, ``w = P (s v)`` and ``n = P ((1 - s) v)``, calibrated by the one rule of
   ``act_kernels.calibration`` (no identity: sums of positive terms, ``SUMMED``'s threshold);
   rows below it take their non-sink part from a softmax over their non-sink logits.

Uncalibrated pairs keep pass 1's output, bit for bit the output of this path with
``heads=None``. With blocks, row ``i`` sees the interval ``[lo_i, hi_i]`` of keys
(:func:`act_kernels.kernels.spans.row_intervals`), so a block of rows reads only ``[min lo, max hi]``.
"""
from __future__ import annotations

import torch

from ..calibration import SUMMED, calibrate_rows, recalibrate_rows
from ..sinks import first_seen_keys, first_valid_index, select_sinks
from ..kernels.spans import row_intervals
from .blocks import work_dtype
from .stats import prefill_stats

# Floats of one block of logits (heads x rows x keys): 4 MiB in float32, at least MIN_ROWS rows.
MASKED_BLOCK_FLOATS = 1 << 20
MIN_ROWS = 16


def _spans(lo_b, hi_b, nq: int, rows: int):
    """``(r0, r1, lo, hi)``: blocks of ``rows`` rows and the key span ``[lo, hi)`` they see."""
    lo_l, hi_l = lo_b.tolist(), hi_b.tolist()
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        yield r0, r1, min(lo_l[r0:r1]), max(hi_l[r0:r1]) + 1


class _Visibility:
    """Which keys of a span the rows of a block see: from the rows' intervals, or from the
    given mask; padded keys and padded rows see nothing."""

    def __init__(self, nq, nk, key_padding_mask, block_ids, window, attn_mask, device):
        self.nq, self.nk = nq, nk
        self.kpm, self.mask = key_padding_mask, attn_mask
        self.lo = self.hi = None
        if attn_mask is None:
            if block_ids is None:           # no block: causal, within the window if any
                block_ids = torch.full((1, nk), -1, dtype=torch.long, device=device)
            self.lo, self.hi = row_intervals(block_ids, nq, window)

    def spans(self, b: int, rows: int):
        if self.mask is None:
            bb = min(b, self.lo.shape[0] - 1)
            yield from _spans(self.lo[bb], self.hi[bb], self.nq, rows)
            return
        for r0 in range(0, self.nq, rows):
            r1 = min(self.nq, r0 + rows)
            cols = self.mask[b, r0:r1].any(0)
            if self.kpm is not None:
                cols = cols & self.kpm[b]
            seen = cols.nonzero()
            if seen.numel():
                yield r0, r1, int(seen[0]), int(seen[-1]) + 1

    def sees(self, b: int, r0: int, r1: int, lo: int, hi: int) -> torch.Tensor:
        """``[r1 - r0, hi - lo]`` bool."""
        if self.mask is not None:
            sees = self.mask[b, r0:r1, lo:hi].clone()
        else:
            bb = min(b, self.lo.shape[0] - 1)
            keys = torch.arange(lo, hi, device=self.lo.device)[None, :]
            sees = (keys >= self.lo[bb, r0:r1, None]) & (keys <= self.hi[bb, r0:r1, None])
        if self.kpm is not None:
            real = self.kpm[b]
            sees &= real[lo:hi][None, :] & real[self.nk - self.nq + r0:self.nk - self.nq + r1,
                                                None]
        return sees


def _logits(qb, kb, r0, r1, lo, hi, scale, work, heads=None, kv=None):
    """``[H, rows, span]``: ``scale q_i.k_j`` of the block, for every head (GQA by a reshape of
    the kv groups) or for the heads ``heads`` reading the kv heads ``kv``."""
    if heads is None:
        hkv = kb.shape[0]
        hq, _, dim = qb.shape
        q_rows = qb[:, r0:r1].reshape(hkv, (hq // hkv) * (r1 - r0), dim).to(work)
        s = torch.bmm(q_rows, kb[:, lo:hi].to(work).transpose(1, 2))
        return s.view(hq, r1 - r0, hi - lo).mul_(scale)
    s = torch.bmm(qb[heads, r0:r1].to(work), kb[kv, lo:hi].to(work).transpose(1, 2))
    return s.mul_(scale)


def _rows_of_probs(s, sees, neg_lse):
    """``exp(s - lse)`` on the seen entries, 0 elsewhere (``neg_lse [H, rows]``, ``-inf`` on
    rows that see nothing)."""
    s.masked_fill_(~sees, float("-inf"))
    return s.add_(neg_lse[..., None]).exp_()


def masked_attention(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                     window=None, block_ids=None, attn_mask=None):
    """``(out, stats or None)`` under bidirectional blocks (with or without a window) or a
    general mask, exactly, by blocks of rows (see the module's docstring)."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = work_dtype(q.dtype)
    device = q.device
    vis = _Visibility(nq, nk, key_padding_mask, block_ids, window, attn_mask, device)
    rows = max(MIN_ROWS, MASKED_BLOCK_FLOATS // (hq * nk))
    out = torch.zeros(bsz, hq, nq, dim, dtype=q.dtype, device=device)
    neg_lse = torch.full((bsz, hq, nq), float("-inf"), dtype=work, device=device)
    sums = torch.zeros(bsz, hq, nk, dtype=work, device=device)
    counts = torch.zeros(bsz, nk, dtype=torch.float32, device=device)
    first = torch.zeros(bsz, nq, dtype=torch.long, device=device)
    sees_any = torch.zeros(bsz, nq, dtype=torch.bool, device=device)

    # pass 1: plain output and log-sum-exp of every head (on the CPU the fused kernel, the
    # block's visibility as its mask); column sums of the wanted heads; counts
    wanted = dict(_heads_by_row(torch.ones(bsz, hq, dtype=torch.bool) if return_stats
                                else heads if heads is not None
                                else torch.zeros(bsz, hq, dtype=torch.bool)))
    fused = device.type == "cpu" and q.dtype != torch.float64
    for b in range(bsz):
        qb, kb, vb = q[b], k[b], v[b]
        members = wanted.get(b)
        hs = None if members is None else torch.tensor(members, device=device)
        kv = None if hs is None else torch.div(hs, group, rounding_mode="floor")
        for r0, r1, lo, hi in vis.spans(b, rows):
            sees = vis.sees(b, r0, r1, lo, hi)
            if fused:
                bias = torch.zeros(sees.shape, dtype=q.dtype, device=device)
                bias.masked_fill_(~sees, float("-inf"))
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[b:b + 1, :, r0:r1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], 0.0,
                    False, attn_mask=bias[None, None], scale=scale)
                out[b, :, r0:r1] = o[0]                 # rows that see nothing: 0
                nl = torch.where(sees.any(1), -lse[0].to(work), float("-inf"))
                neg_lse[b, :, r0:r1] = nl
                if hs is not None:
                    s = _logits(qb, kb, r0, r1, lo, hi, scale, work, hs, kv)
                    sums[b, hs, lo:hi] += _rows_of_probs(s, sees, nl[hs]).sum(1)
            else:
                s = _logits(qb, kb, r0, r1, lo, hi, scale, work)
                s.masked_fill_(~sees, float("-inf"))
                lse = torch.logsumexp(s, dim=-1)                                # [Hq, rows]
                nl = torch.where(torch.isfinite(lse), -lse, float("-inf"))
                neg_lse[b, :, r0:r1] = nl
                p = s.add_(nl[..., None]).exp_()                                # 0 where hidden
                o = torch.bmm(p.view(hkv, group * (r1 - r0), hi - lo), vb[:, lo:hi].to(work))
                out[b, :, r0:r1] = o.view(hq, r1 - r0, dim).to(q.dtype)
                sums[b, :, lo:hi] += p.sum(1)
            counts[b, lo:hi] += sees.sum(0)
            if attn_mask is not None:
                sees_any[b, r0:r1] = sees.any(1)
                first[b, r0:r1] = sees.to(torch.int8).argmax(1) + lo

    if not wanted:
        return out, None
    if attn_mask is not None:
        excluded = first_seen_keys(first, sees_any, nk)
    else:
        excluded = first_valid_index(key_padding_mask, bsz, device)
    scores, sinks = select_sinks(sums.float(), counts, tau, excluded)
    mass = torch.zeros(bsz, hq, nq, dtype=torch.float32, device=device)

    # pass 2: sink mass (every head with a sink when stats are asked for), calibration of the
    # calibrated pairs with a sink
    has_sink = sinks.any(-1)                                                    # [B, Hq]
    todo = has_sink & heads if heads is not None else torch.zeros_like(has_sink)
    need = has_sink if return_stats else todo
    for b, members in _heads_by_row(need):
        calibrate = todo[b, members].tolist()
        hs = torch.tensor(members, device=device)
        kv = torch.div(hs, group, rounding_mode="floor")
        sink = sinks[b, hs].to(work)                                            # [n, Nk]
        vb = v[b].to(work)
        for r0, r1, lo, hi in vis.spans(b, max(MIN_ROWS, rows * hq // len(members))):
            sees = vis.sees(b, r0, r1, lo, hi)
            s = _logits(q[b], k[b], r0, r1, lo, hi, scale, work, hs, kv)
            logits = s.clone() if any(calibrate) else None
            p = _rows_of_probs(s, sees, neg_lse[b, hs, r0:r1])                  # [n, rows, K]
            on = sink[:, lo:hi]
            m = torch.bmm(p, on[:, :, None])                                    # [n, rows, 1]
            mass[b, hs, r0:r1] = m[..., 0].float()
            for t, h in enumerate(members):
                if calibrate[t]:
                    _calibrate_block(out, b, h, r0, r1, p[t], logits[t], sees, on[t], m[t],
                                     vb[kv[t], lo:hi], beta)
    if not return_stats:
        return out, None
    return out, prefill_stats(scores, sinks, mass, heads, q.shape, nk)


def _heads_by_row(need):
    """``(b, [heads])`` of the batch rows with some head in ``need [B, Hq]``."""
    rows = {}
    for b, h in need.nonzero().tolist():
        rows.setdefault(b, []).append(h)
    return rows.items()


def _calibrate_block(out, b, h, r0, r1, p, logits, sees, on_sink, m, vs, beta):
    """Rewrite ``out[b, h, r0:r1]`` from the block's ``P [rows, K]``: ``w`` and ``n`` as sums
    of positive terms, the one rule of :mod:`act_kernels.calibration`."""
    off = 1.0 - on_sink
    halves = p @ torch.cat([vs * on_sink[:, None], vs * off[:, None], off[:, None]], dim=1)
    dim = vs.shape[1]
    w, nonsink, rest = halves[:, :dim], halves[:, dim:2 * dim], halves[:, 2 * dim:]
    plain = out[b, h, r0:r1].to(p.dtype)
    new, redo = calibrate_rows(plain, w, nonsink, m, rest, beta, SUMMED)
    redo = redo[:, 0].nonzero()[:, 0]
    if redo.numel():
        # the non-sink part of those rows as a softmax over their visible non-sink logits
        lg = logits[redo].masked_fill(~sees[redo] | (on_sink > 0)[None, :], float("-inf"))
        lse_rest = torch.logsumexp(lg, dim=1, keepdim=True)
        finite = torch.isfinite(lse_rest)
        share = torch.exp(lg - torch.where(finite, lse_rest, 0.0))
        lse_row = torch.logsumexp(logits[redo].masked_fill(~sees[redo], float("-inf")), dim=1,
                                  keepdim=True)
        rest_mass = torch.where(finite, torch.exp(lse_rest - lse_row), 0.0)
        new[redo] = recalibrate_rows(plain[redo], w[redo], m[redo], share @ vs, rest_mass, beta)
    out[b, h, r0:r1] = new.to(out.dtype)
