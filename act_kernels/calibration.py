"""The calibration of one row (``docs/spec.md``, step 4 and section 7), and its one table of
thresholds.

A calibrated row with sink mass ``m``, sink part ``w = sum_{j in S} P_ij v_j`` and non-sink mass
``r`` becomes ``o = beta w + (1 - beta m) a``, where ``a = sum_{j not in S} P_ij v_j / r`` is the
average of its non-sink part. A path has ``a`` in one of three ways:

* the identity, from the plain output ``u``: ``a = (u - w) / (1 - m)``; the rounding error of
  ``u`` is multiplied by up to ``(1 - beta m) / (1 - m)``;
* summed directly, ``a = n / r`` with ``n`` and ``r`` sums of positive terms (the torch dense
  path): no cancellation, but where ``r`` is tiny the entries of ``P`` it sums are subnormal;
* recomputed: a softmax over the row's non-sink logits, exact however small ``r`` is (each path
  computes it its own way: from blocks of keys, from the row's logits, in a kernel).

The first two are used unless the row's non-sink mass is below the threshold of
:data:`STABLE_REST`, keyed by what ``a`` is derived from; then ``a`` is recomputed. Rows with
``m = 0``, or whose non-sink mass is 0 in the working precision, keep the plain output.

The torch prefill paths call :func:`calibrate_rows` and :func:`recalibrate_rows`; the Triton
kernels keep their own jit copy of the identity and are launched with :func:`stable_rest` of
their float32 ``u``. The torch decode step, which has each row's logits, recomputes every row:
:func:`sink_logit_shift` gives the rule as a shift of the sink logits (no identity, no
threshold).
"""
from __future__ import annotations

import math
from typing import Union

import torch

SUMMED = "summed"
"""Key of :data:`STABLE_REST` for a non-sink part summed directly from float32 ``P``."""

STABLE_REST = {
    # the identity from a plain output u rounded to this dtype (error 2**-53 .. 2**-24):
    # Triton's float32 copy u32, the torch decode step's float32 probabilities, float32/64 inputs
    torch.float64: 0.2,
    torch.float32: 0.2,
    # ... or to half precision (error 2**-11 .. 2**-8: a wider margin), the torch prefill output
    torch.float16: 0.5,
    torch.bfloat16: 0.5,
    # no identity: n and r summed from P, exact unless P's non-sink entries are subnormal
    SUMMED: 1e-20,
}
"""Non-sink mass below which a calibrated row's non-sink part is recomputed, by source."""


def stable_rest(source: Union[torch.dtype, str]) -> float:
    """The threshold of :data:`STABLE_REST` for ``a`` derived from ``source``: the dtype of the
    plain output ``u`` the identity starts from, or :data:`SUMMED`."""
    return STABLE_REST[source]


def calibrate_rows(plain: torch.Tensor, w: torch.Tensor, nonsink: torch.Tensor,
                   mass: torch.Tensor, rest: torch.Tensor, beta: float, source):
    """``(rows, redo)``: every row as ``beta w + (1 - beta m) / r * n``, and the rows whose
    non-sink part must be recomputed (then given to :func:`recalibrate_rows`).

    ``plain`` = the plain rows ``[..., D]``, ``w`` their sink part, ``nonsink`` = ``n`` their
    non-sink part (``u - w`` for the identity), ``mass`` = ``m`` and ``rest`` = ``r``
    (``1 - m`` for the identity) ``[..., 1]``; ``source`` keys :data:`STABLE_REST`. Rows with
    ``m = 0`` or ``r <= 0`` are ``plain``; ``redo`` marks the rows with ``m > 0`` and ``r`` below
    the threshold (``r <= 0`` included: ``1 - m`` may round to 0 while the true rest does not).
    """
    has_sink, change, gain = _gain(mass, rest, beta)
    rows = torch.where(change, beta * w + gain * nonsink, plain)
    return rows, has_sink & (rest < stable_rest(source))


# log of float64's smallest subnormal: a non-sink mass below it is 0 in the float64 reference
NO_REST_LOG = math.log(math.ulp(0.0))


def sink_logit_shift(logits: torch.Tensor, probs: torch.Tensor, sinks: torch.Tensor,
                     beta: float, host_reads: bool = True) -> torch.Tensor:
    """The rule as a shift of the sink logits, for rows of logits ``l [..., Nk]`` (``-inf`` on the
    keys a row does not see) and their softmax ``probs``: the rows calibrate to
    ``softmax(l + s)``, with ``s`` the returned ``[..., Nk]``, ``log(beta r / (1 - beta m))`` on
    the row's ``sinks`` and 0 elsewhere (``r = 1 - m``, the non-sink mass; ``beta = 1`` gives 0).

    The shifted weights are ``beta P`` on the sinks and ``(1 - beta m) / r P`` off them (they sum
    to ``beta m + 1 - beta m = 1``): the rule, with the non-sink part recomputed from the logits.
    ``r`` is summed from ``P``'s non-sink entries (no cancellation) and ``1 - beta m`` is
    ``(1 - beta) + beta r``, a sum of positive terms; where ``r`` is below the table's threshold
    for sums of ``P`` (:data:`SUMMED`: ``P``'s non-sink entries may be subnormal or 0), it is
    taken in log space from the logits instead (the log-sum-exp of the non-sink logits less the
    row's), exact however close ``m`` is to 1; a row whose ``r`` is 0 even in float64 (below
    :data:`NO_REST_LOG`) is left unchanged, as the spec's rows without non-sink mass are.

    One host read decides whether any row needs the log space; with ``host_reads=False`` (a
    compiled graph) every row takes it where its ``r`` is below the threshold, by a select.
    """
    rest = torch.where(sinks, 0.0, probs).sum(-1, keepdim=True)                  # r = 1 - m
    if not host_reads or float(rest.detach().amin()) < stable_rest(SUMMED):
        log_rest = torch.logsumexp(logits.masked_fill(sinks, float("-inf")), -1, keepdim=True) \
            - torch.logsumexp(logits, -1, keepdim=True)
        if not host_reads:
            log_rest = torch.where(rest < stable_rest(SUMMED), log_rest, torch.log(rest))
        log_keep = math.log1p(-beta) if beta < 1 else float("-inf")              # log(1 - beta)
        kept = log_rest + (math.log(beta) if beta > 0 else float("-inf"))          # log(beta r)
        shift = kept - torch.logaddexp(kept, torch.full_like(kept, log_keep))
        # no non-sink mass even in float64 (the spec's rows left unchanged): no shift
        shift.masked_fill_(log_rest < NO_REST_LOG, 0.0)
    else:
        keep = (1.0 - beta) / beta if beta > 0 else float("inf")                 # (1 - beta) / beta
        shift = torch.log(rest / (rest + keep))
    return torch.where(sinks, shift, 0.0)


def _gain(mass: torch.Tensor, rest: torch.Tensor, beta: float):
    """``(has_sink, change, gain)``: rows with ``m > 0``, the rows that change (``r > 0`` too)
    and their non-sink factor ``(1 - beta m) / r`` (1 where ``m = 0``)."""
    has_sink = mass > 0
    change = has_sink & (rest > 0)
    return has_sink, change, (1.0 - beta * mass) / torch.where(change, rest, 1.0)


def recalibrate_rows(plain: torch.Tensor, w: torch.Tensor, mass: torch.Tensor,
                     average: torch.Tensor, rest: torch.Tensor, beta: float) -> torch.Tensor:
    """Rows whose non-sink ``average`` was recomputed: ``beta w + (1 - beta m) a``; rows whose
    recomputed non-sink mass ``rest`` is 0 (it underflows) keep ``plain``."""
    return torch.where(rest > 0, beta * w + (1.0 - beta * mass) * average, plain)
