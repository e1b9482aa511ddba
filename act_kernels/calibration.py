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

The torch paths call :func:`calibrate_rows` (the decode step its form on rows of weights,
:func:`calibrate_weights`) and :func:`recalibrate_rows`; the Triton kernels
keep their own jit copy of the identity and are launched with :func:`stable_rest` of their
float32 ``u``.
"""
from __future__ import annotations

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


def calibrate_weights(probs: torch.Tensor, sinks: torch.Tensor, mass: torch.Tensor,
                      beta: float):
    """``(rows, redo)``: rows of attention weights ``P [..., Nk]`` calibrated by the identity,
    :func:`calibrate_rows` with ``plain = P`` in ``P``'s dtype, ``w`` its ``sinks`` entries and
    ``u - w`` the others, in fewer tensor ops (the torch decode step's bill is their dispatch).

    Every entry of ``w`` or of ``u - w`` is 0, so ``beta w + gain (u - w)`` is ``P`` times one
    factor per entry, ``beta`` on the sinks and ``gain`` off them: the same floats. ``mass`` =
    ``m`` ``[..., 1]``, the sum of the sink entries. Rows with ``m = 0`` keep ``P`` (their
    gain is 1); rows marked ``redo`` must be replaced by :func:`recalibrate_rows`.
    """
    rest = 1.0 - mass
    has_sink, _, gain = _gain(mass, rest, beta)
    rows = probs * torch.where(sinks, beta, gain)
    return rows, has_sink & (rest < stable_rest(probs.dtype))


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
