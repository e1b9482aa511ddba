"""Sink selection, shared by the torch and Triton backends.

These act on small tensors (per key), never on an N x N map:

* ``seen_counts``: how many query rows of the call see each key (the divisor of the score);
* ``select_sinks``: keys whose score exceeds tau, minus the excluded keys: the first valid key
  (``first_valid_index``), or under a general mask the first key each row sees
  (``first_seen_keys``; ``docs/spec.md`` section 3a).

The calibration of the rows that see a sink is :mod:`act_kernels.calibration`.
"""
from __future__ import annotations

from typing import Optional

import torch


def first_valid_index(key_padding_mask: Optional[torch.Tensor], bsz: int, device) -> torch.Tensor:
    """``[B]`` long: position of the first real key of each sequence (0 without padding)."""
    if key_padding_mask is None:
        return torch.zeros(bsz, dtype=torch.long, device=device)
    return key_padding_mask.to(torch.long).argmax(dim=-1)


def first_seen_keys(first: torch.Tensor, sees_any: torch.Tensor, nk: int) -> torch.Tensor:
    """``[B, Nk]`` bool, the keys excluded from the sinks under a general mask: for every row
    that sees a key (``sees_any [B, R]``), the first key it sees (``first [B, R]`` long)."""
    hit = torch.zeros(first.shape[0], nk, dtype=torch.int32, device=first.device)
    hit.scatter_add_(1, first, sees_any.to(torch.int32))
    return hit > 0


def seen_counts(nq: int, nk: int, key_padding_mask: Optional[torch.Tensor], bsz: int,
                device, window: Optional[int] = None) -> torch.Tensor:
    """``[B, Nk]`` float32: number of query rows of this call that see each key.

    Row ``i`` sits at position ``p = nk - nq + i`` and sees keys ``j <= p`` (with a window W:
    ``p - W < j <= p``); padded rows see nothing and padded keys are seen by nobody. So key ``j``
    is seen by the real rows at positions ``j .. j + W - 1``: ``R(j) - R(j + W)`` with ``R(x)``
    the number of real query rows at positions ``>= x``. Without padding or window this is
    ``min(nq, nk - j)``.
    """
    pos = torch.arange(nk, device=device)
    if key_padding_mask is None:
        real = None
        real_rows = torch.ones(1, nq, device=device)
    else:
        real = key_padding_mask.to(torch.float32)
        real_rows = real[:, nk - nq:]                                          # [B, Nq]
    # R at row index r = 0..nq: real rows with index >= r (reverse cumulative sum), R(nq) = 0
    rows_from = torch.flip(torch.cumsum(torch.flip(real_rows, [1]), 1), [1])
    rows_from = torch.cat([rows_from, torch.zeros_like(rows_from[:, :1])], dim=1)

    def count_from(x: torch.Tensor) -> torch.Tensor:      # R(x) for positions x
        return rows_from[:, torch.clamp(x - (nk - nq), 0, nq)]

    counts = count_from(pos)
    if window is not None:
        counts = counts - count_from(pos + window)
    counts = counts.expand(bsz, nk)
    return counts if real is None else counts * real


def select_sinks(column_sums: torch.Tensor, counts: torch.Tensor, tau: float,
                 first_valid: torch.Tensor):
    """Scores and sink mask from per-key attention sums.

    Args:
        column_sums: ``[B, H, Nk]`` float32, ``sum_i P_ij`` over the rows that see ``j``.
        counts: ``[B, Nk]`` from :func:`seen_counts` (or counted from a mask).
        first_valid: ``[B]`` from :func:`first_valid_index`, or a ``[B, Nk]`` bool mask of the
            excluded keys (:func:`first_seen_keys`).
    Returns:
        ``scores [B, H, Nk]`` (0 where no row sees the key) and ``sinks [B, H, Nk]`` bool.
    """
    counts = counts[:, None, :]
    scores = torch.where(counts > 0, column_sums / counts.clamp(min=1), torch.zeros_like(column_sums))
    nk = scores.shape[-1]
    if first_valid.dtype == torch.bool:
        not_first = ~first_valid
    else:
        not_first = torch.arange(nk, device=scores.device)[None, :] != first_valid[:, None]
    sinks = (scores > tau) & not_first[:, None, :]
    return scores, sinks

