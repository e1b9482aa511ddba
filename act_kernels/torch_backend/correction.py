"""The sink correction of a pruned prefill: ``m_i`` and ``w_i`` from the sink keys only, then the
calibration of :mod:`act_kernels.calibration` by the identity from the plain output ``u``.

Rows whose non-sink mass is below the threshold for ``u``'s dtype recompute their non-sink part
directly (:func:`_nonsink_rows`: a softmax over the non-sink keys, by blocks of rows, each over
its key span).
"""
from __future__ import annotations

import bisect

import torch

from ..calibration import calibrate_rows, recalibrate_rows
from .blocks import block_rows, blocks_seeing, hidden, key_span, probs_on_keys, work_dtype


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
    rows = block_rows(kp.shape[0] if window is None else min(kp.shape[0], 2 * window))
    r0 = 0
    while r0 < len(pos):
        r1 = min(len(pos), r0 + rows)
        if window is not None:
            r1 = min(r1, bisect.bisect_left(pos, pos[r0] + window, r0))
        lo, hi = key_span(pos[r0], pos[r1 - 1], window)
        s = torch.mm(qp[r0:r1], kp[lo:hi].to(qp.dtype).t()).mul_(scale)
        unseen = hidden(positions[r0:r1], torch.arange(lo, hi, device=qp.device), window)
        s.masked_fill_(unseen | skip_keys[lo:hi], float("-inf"))
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

    For each row: ``m_i`` and ``w_i`` from the sink keys only, then the identity from ``u``, the
    plain output in q's dtype (:func:`~act_kernels.calibration.calibrate_rows`). Rows whose
    non-sink mass is below the threshold for that dtype lose too many digits in ``u - w``; their
    non-sink part is recomputed directly (:func:`_nonsink_rows`).
    """
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = work_dtype(q.dtype)
    mass = torch.zeros(len(b_idx), nq, dtype=torch.float32, device=q.device)
    positions = torch.arange(nk - nq, nk, device=q.device)
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        idx = sinks[p].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        kp, vp = k[b, h // group], v[b, h // group]
        ks, vs = kp[idx].to(work), vp[idx].to(work)
        qp = q[b, h].to(work)
        for r0, r1, a, z in blocks_seeing(idx.tolist(), nq, nk, block_rows(idx.numel()),
                                          window):
            ps = probs_on_keys(qp[r0:r1], ks[a:z], neg_lse[p, r0:r1], idx[a:z],
                               positions[r0:r1], scale, window)
            m = ps.sum(1, keepdim=True)
            mass[p, r0:r1] = m.squeeze(1).float()
            if not calibrated[p]:
                continue
            w = ps @ vs[a:z]
            u = out[b, h, r0:r1].to(work)
            new, redo = calibrate_rows(u, w, u - w, m, 1.0 - m, beta, q.dtype)
            if bool(redo.any()):
                sel = redo.squeeze(1).nonzero().squeeze(1)
                skip = sinks[p].clone()
                if key_padding_mask is not None:
                    skip |= ~key_padding_mask[b]
                average, rest = _nonsink_rows(qp[r0:r1][sel], kp, vp, -neg_lse[p, r0:r1][sel],
                                              positions[r0:r1][sel], skip, scale, window)
                new[sel] = recalibrate_rows(u[sel], w[sel], m[sel], average, rest, beta)
            out[b, h, r0:r1] = new.to(out.dtype)
    return mass

