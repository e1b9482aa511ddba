"""A decode step (``Nq == 1``, no window): one fused SDPA call for every head, the calibrated
rows' sinks found first.

The ``g = Hq / Hkv`` query heads of a kv group are the ``g`` query rows of one SDPA call over
their kv head (q viewed as ``[B, Hkv, g, D]``; k and v never repeated): a decode step costs
SDPA's own fused kernel. A calibrated row needs its row of ``P`` for the sink test (``P > tau``,
the first valid key excepted): the logits of every head (one batched product), a softmax over
the calibrated rows only. Where a calibrated row has a sink, the calibration is a shift of its
sink logits (:func:`~act_kernels.calibration.sink_logit_shift`), given to the same SDPA call as
an additive mask that is 0 on every other row: the kernel adds 0 exactly, so uncalibrated rows
and calibrated rows without a sink are bit for bit the plain step. One host read per step
decides whether any row changes.

Half-precision inputs are computed in float32 (q, k and v converted), the output cast back.
Kept to few tensor ops: at decode sizes their dispatch cost, not arithmetic, is the bill.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..calibration import sink_logit_shift
from ..sinks import first_valid_index
from ..tensor_cache import TensorCache
from .blocks import as_dtype, work_dtype
from .stats import calibrated_heads


def decode_step(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats):
    """``(out, stats)`` of one query row per head, the calibrated rows with a sink calibrated."""
    alive = None if key_padding_mask is None else key_padding_mask[:, -1]   # the query is real
    shift = stats = None
    if return_stats:
        stats, shift = _step_stats(q, k, heads, beta, tau, scale, key_padding_mask, alive)
    elif heads is not None:
        rows = _ROWS.get(heads, calibrated_rows)
        logits = all_logits(q, k, scale).index_select(0, rows.flat).mul_(scale)   # [R, Nk]
        mask_logits(logits, key_padding_mask, alive, rows.batch)
        probs = torch.softmax(logits, dim=-1)
        sinks = decode_sinks(probs, tau, key_padding_mask, alive, rows.batch)
        if bool(sinks.any()):     # else no calibrated row has a sink: every row unchanged
            shift = spread(sink_logit_shift(logits, probs, sinks, beta), rows, q.shape[:2])
    return attend(q, k, v, scale, key_padding_mask, alive, shift), stats


def attend(q, k, v, scale, key_padding_mask, alive, shift):
    """``[B, Hq, 1, D]`` in q's dtype: every head's attention, one SDPA call with the query heads
    of each kv group as its rows, ``shift [B, Hq, Nk]`` (or None) added to the logits; a padded
    query's row is 0."""
    bsz, hq, _, dim = q.shape
    hkv = k.shape[1]
    work = work_dtype(q.dtype)
    mask = None if shift is None else shift.view(bsz, hkv, hq // hkv, -1)
    if key_padding_mask is not None:
        visible = (key_padding_mask & alive[:, None])[:, None, None, :]
        mask = visible if mask is None else mask.masked_fill_(~visible, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        as_dtype(q, work).reshape(bsz, hkv, hq // hkv, dim), as_dtype(k, work),
        as_dtype(v, work), attn_mask=mask, scale=scale)
    out = out.reshape(bsz, hq, 1, dim)
    if alive is not None:        # a row that sees no key: 0 on every device
        out = out.masked_fill(~alive[:, None, None, None], 0.0)
    return as_dtype(out, q.dtype)


def all_logits(q, k, scale):
    """``[B * Hq, Nk]``: ``q k^T`` of every head in the work dtype, *unscaled*, one batched
    product (the query heads of a group against their kv head, k unrepeated). Callers scale
    the rows they keep (fewer elements than q's when few rows are kept)."""
    bsz, hq, _, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    work = work_dtype(q.dtype)
    return torch.matmul(as_dtype(q, work).view(bsz, hkv, hq // hkv, dim),
                        as_dtype(k, work).transpose(-1, -2)).view(bsz * hq, nk)


def mask_logits(logits, key_padding_mask, alive, batch) -> None:
    """In place, rows ``[R, Nk]`` of the batch rows ``batch``: padded keys to ``-inf``, a padded
    query's row to 0 (finite: it gets no sink, and its output is 0)."""
    if key_padding_mask is None:
        return
    hidden = ~key_padding_mask | ~alive[:, None]
    logits.masked_fill_(hidden[batch], float("-inf"))
    logits.masked_fill_(~alive[batch][:, None], 0.0)


class CalibratedRows(NamedTuple):
    """The calibrated rows of a heads mask ``[B, Hq]``: their flat indices ``b * Hq + h``
    (ascending) and their batch rows."""

    flat: torch.Tensor
    batch: torch.Tensor


# per heads mask [B, Hq]: its CalibratedRows, read from the mask once
_ROWS = TensorCache()


def calibrated_rows(heads) -> CalibratedRows:
    flat = heads.reshape(-1).nonzero()[:, 0]
    return CalibratedRows(flat, torch.div(flat, heads.shape[1], rounding_mode="floor"))


def spread(row_shift, rows: CalibratedRows, shape) -> torch.Tensor:
    """``[B, Hq, Nk]``: the calibrated rows' shifts ``[R, Nk]`` in their places, 0 elsewhere."""
    bsz, hq = shape
    full = row_shift.new_zeros(bsz * hq, row_shift.shape[-1])
    return full.index_copy_(0, rows.flat, row_shift).view(bsz, hq, -1)


def decode_sinks(probs, tau, key_padding_mask, alive, batch=None):
    """Sinks of single rows ``[R, Nk]`` (``batch``: each row's batch row, needed with padding):
    ``P > tau``, the first valid key excepted (padded keys have ``P = 0``; a padded query has no
    sink)."""
    sinks = probs > tau
    if key_padding_mask is None:
        sinks.select(-1, 0).fill_(False)
        return sinks
    first = first_valid_index(key_padding_mask, key_padding_mask.shape[0], probs.device)
    sinks.scatter_(1, first[batch][:, None], False)
    sinks &= alive[batch][:, None]
    return sinks


def _step_stats(q, k, heads, beta, tau, scale, key_padding_mask, alive):
    """``(stats, shift)``: the statistics from the rows of ``P`` of every head, and the shift of
    the calibrated rows (or None) from the same rows, so the same sinks as without statistics."""
    bsz, hq, _, _ = q.shape
    nk = k.shape[2]
    logits = all_logits(q, k, scale).mul_(scale)                         # [B * Hq, Nk]
    batch = None
    if key_padding_mask is not None:
        batch = torch.arange(bsz, device=q.device).repeat_interleave(hq)
        mask_logits(logits, key_padding_mask, alive, batch)
    probs = torch.softmax(logits, dim=-1)
    sinks = decode_sinks(probs, tau, key_padding_mask, alive, batch)
    shift = None
    if heads is not None:
        rows = _ROWS.get(heads, calibrated_rows)
        picked = sinks.index_select(0, rows.flat)
        if bool(picked.any()):
            shift = spread(sink_logit_shift(logits.index_select(0, rows.flat),
                                            probs.index_select(0, rows.flat), picked, beta),
                           rows, (bsz, hq))
    mass = torch.where(sinks, probs, 0.0).sum(-1, keepdim=True)         # m, [B * Hq, 1]
    scores = probs if batch is None else probs * alive[batch][:, None]
    stats = {"scores": scores.float().view(bsz, hq, nk), "sinks": sinks.view(bsz, hq, nk),
             "sink_mass": mass.float().view(bsz, hq, 1),
             "calibrated": calibrated_heads(heads, bsz, hq, q.device)}
    return stats, shift
