"""The dense path of a short prefill (``Nq x Nk <= DENSE_MAX_ENTRIES``): every wanted pair's whole
``P`` at once, by chunks of pairs, and the whole ACT step from it by batched products.

No bound, no identity: the non-sink part of a row is summed directly, and recomputed from the
row's non-sink logits only where its mass is below :data:`act_kernels.calibration.SUMMED`'s
threshold (``csrc_notes/act_passes.md``, "Short prefills: the dense path").
"""
from __future__ import annotations

import torch

from ..calibration import SUMMED, calibrate_rows, recalibrate_rows
from ..sinks import first_valid_index, seen_counts, select_sinks
from .blocks import as_dtype, hidden, work_dtype

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


def dense_pairs(out, q, k, v, b_idx, h_idx, calibrated, beta, tau, scale, key_padding_mask,
                window=None):
    """The whole ACT step of a short prefill for the (b, h) pairs ``b_idx, h_idx``, from their
    full ``P [Nq, Nk]`` (chunks of pairs, ``DENSE_CHUNK_FLOATS``).

    Per pair: ``P``, its column sums, the sinks ``S`` and, with ``s_j = [j in S]``, three
    products with ``P`` in place of any per-entry selection: the sink mass ``m = P s``, the
    non-sink mass ``r = P (1 - s)`` and the two halves of the output, ``w = P (s v)`` and
    ``n = P ((1 - s) v)``. A calibrated row becomes ``beta w + (1 - beta m) / r * n``: no
    difference of nearly equal terms, so no identity and no cancellation. Rows whose ``r`` is
    below the threshold of :data:`~act_kernels.calibration.SUMMED` take their non-sink part from
    a softmax over their non-sink logits (exact even where ``P`` underflows); rows with ``m = 0``
    or ``r = 0`` keep ``out`` bit for bit. ``out`` (contiguous) is rewritten in place for the ``calibrated`` pairs.

    Returns ``(scores [P, Nk], sinks [P, Nk], mass [P, Nq])`` in float32.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = work_dtype(q.dtype)
    counts = seen_counts(nq, nk, key_padding_mask, bsz, q.device, window)
    first = first_valid_index(key_padding_mask, bsz, q.device)
    unseen = hidden(torch.arange(nk - nq, nk, device=q.device),
                    torch.arange(nk, device=q.device), window)[None]            # [1, Nq, Nk]
    # pairs index the flattened (batch, head) axes: one index_select per tensor, no 2-D gather
    qf = as_dtype(q, work).reshape(bsz * hq, nq, dim)
    kf = as_dtype(k, work).reshape(bsz * hkv, nk, dim)
    vf = as_dtype(v, work).reshape(bsz * hkv, nk, dim)
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
            logits.masked_fill_(unseen, float("-inf"))
        else:
            keys = key_padding_mask.index_select(0, bi)                          # [c, Nk]
            logits.masked_fill_(unseen | ~keys[:, None, :], float("-inf"))
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
        w, nonsink, rest = halves[..., :dim], halves[..., dim:2 * dim], halves[..., 2 * dim:]
        plain = as_dtype(of.index_select(0, rows), work)        # exact: back to out's dtype below
        new, redo = calibrate_rows(plain, w, nonsink, mt, rest, beta, SUMMED)  # [t, Nq, D]
        redo = redo[..., 0].nonzero(as_tuple=True)
        if redo[0].numel():
            # the non-sink part as a softmax over the non-sink logits of those rows
            lg = lg_t[redo].masked_fill(sink_t[redo[0]], float("-inf"))
            share = torch.softmax(lg, dim=-1)[:, None, :]                        # [u, 1, Nk]
            average = torch.bmm(share, vt[redo[0]])[:, 0]                        # [u, D]
            new[redo] = recalibrate_rows(plain[redo], w[redo], mt[redo], average, rest[redo],
                                         beta)
        of.index_copy_(0, rows, new.to(out.dtype))
    return torch.cat(scores), torch.cat(sinks), torch.cat(mass)

