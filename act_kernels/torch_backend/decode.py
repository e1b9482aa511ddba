"""A decode step (``Nq == 1``, no window): one short vectorised pass over all heads at once.

Its single row of ``P`` per head is as small as the output, so the row is calibrated directly
(:func:`calibrate_probs`) and then multiplied by ``v``, and only when a calibrated row has a
sink. Kept to few tensor ops: at decode sizes their dispatch cost, not arithmetic, is the bill.
"""
from __future__ import annotations

import torch

from ..calibration import calibrate_weights, recalibrate_rows
from ..sinks import first_valid_index
from ..tensor_cache import TensorCache
from .blocks import as_dtype, work_dtype
from .stats import calibrated_heads


def decode_step(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats):
    """``(out, stats)`` of one query row per head, ``P`` calibrated directly."""
    bsz, hq, _, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = work_dtype(q.dtype)
    # [B, Hkv, group, Nk]: the query heads of a group read their kv head once, unrepeated.
    logits = torch.matmul(as_dtype(q, work).reshape(bsz, hkv, group, dim) * scale,
                          as_dtype(k, work).transpose(-1, -2))
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
        sinks = decode_sinks(probs, tau, key_padding_mask, alive)
        mass = torch.where(sinks, probs, 0.0).sum(-1, keepdim=True)   # m, [B, Hq, 1]
        scores = probs if alive is None else probs * alive[:, None, None]
        stats = {"scores": scores.float(), "sinks": sinks, "sink_mass": mass.float(),
                 "calibrated": calibrated_heads(heads, bsz, hq, q.device)}
    if heads is not None:
        if sinks is not None:
            sinks = sinks & heads.unsqueeze(-1)
            if bool(sinks.any()):     # else no calibrated row has a sink: every row unchanged
                probs = calibrate_probs(probs, logits, sinks, beta)
        else:
            probs = calibrate_heads(probs, logits, heads, beta, tau, key_padding_mask, alive)
    out = torch.matmul(probs.view(bsz, hkv, group, nk), as_dtype(v, work))
    out = out.reshape(bsz, hq, 1, dim)
    if alive is not None:
        out = out * alive[:, None, None, None]
    return out.to(q.dtype), stats


def calibrate_heads(probs, logits, heads, beta, tau, key_padding_mask, alive):
    """``probs [B, Hq, Nk]`` with the rows of the calibrated ``heads`` calibrated in place.

    Only those rows are read (a layer calibrates a few of its heads; at decode sizes the time of
    an elementwise op grows with its rows): their indices are read from ``heads`` once per mask
    (:class:`~act_kernels.tensor_cache.TensorCache`), their sinks found, and when one has a sink
    they are calibrated and written back. One host read per step decides whether any changes.
    """
    bsz, hq, nk = probs.shape
    rows, batch = _ROWS.get(heads, lambda h: _calibrated_rows(h, hq), hq)
    flat = probs.view(bsz * hq, nk)
    picked = flat.index_select(0, rows)                                 # [R, Nk]
    sinks = decode_sinks(picked, tau, key_padding_mask, alive, batch)
    if bool(sinks.any()):         # else no calibrated row has a sink: every row unchanged
        new = calibrate_probs(picked, logits.reshape(bsz * hq, nk).index_select(0, rows),
                              sinks, beta)
        flat.index_copy_(0, rows, new)
    return probs


# per heads mask [B, Hq] (and Hq): the flat indices of its calibrated rows and their batch rows
_ROWS = TensorCache()


def _calibrated_rows(heads, hq: int):
    rows = heads.reshape(-1).nonzero()[:, 0]
    return rows, torch.div(rows, hq, rounding_mode="floor")


def decode_sinks(probs, tau, key_padding_mask, alive, batch=None):
    """Sinks of single rows, ``[B, Hq, Nk]`` or, with ``batch`` (each row's batch row),
    ``[R, Nk]``: ``P > tau``, the first valid key excepted (padded keys have ``P = 0``; a padded
    query has no sink)."""
    sinks = probs > tau
    if key_padding_mask is None:
        sinks.select(-1, 0).fill_(False)
        return sinks
    first = first_valid_index(key_padding_mask, key_padding_mask.shape[0], probs.device)
    if batch is None:
        bsz, hq = probs.shape[:2]
        sinks.scatter_(2, first[:, None, None].expand(bsz, hq, 1), False)
        sinks &= alive[:, None, None]
    else:
        sinks.scatter_(1, first[batch][:, None], False)
        sinks &= alive[batch][:, None]
    return sinks


def calibrate_probs(probs, logits, sinks, beta):
    """``P'`` of whole rows of ``P [..., Nk]`` (``logits``: the masked logits they come from):
    beta P on the sinks, ``(1 - beta m) / (1 - m) P`` off them.

    The rule of :mod:`act_kernels.calibration` on rows of weights instead of outputs: the plain
    row ``u`` is ``P`` itself (in float32, so float32's threshold), its sink part ``w`` the sink
    entries and ``u - w`` the others, both exact. Rows below the threshold take their non-sink
    part from a softmax over their non-sink logits, exact even when ``1 - m`` is subnormal or
    rounds to 0. ``sinks`` holds the sinks of calibrated rows only; rows without one keep ``P``.
    """
    w = torch.where(sinks, probs, 0.0)
    mass = w.sum(-1, keepdim=True)                                      # m, [B, Hq, 1]
    new, redo = calibrate_weights(probs, sinks, mass, beta)
    if bool(redo.any()):
        share = torch.softmax(logits.masked_fill(sinks, float("-inf")), dim=-1)
        fixed = recalibrate_rows(probs, w, mass, share, (probs - w).sum(-1, keepdim=True), beta)
        new = torch.where(redo, fixed, new)
    return new
