"""Blocks of query rows and the keys they see: the geometry every pass of the torch backend
shares (block sizes, key spans, visibility, the kv groups of the pairs, the work dtype).

Row ``i`` of a call sits at position ``nk - nq + i`` and sees the keys ``j <= i``, within a
window ``W`` only those with ``j > i - W``. :func:`key_span` is the one place that decides which
keys a block of rows reads; :func:`hidden` and :func:`rows_seeing` give the visibility inside it.
"""
from __future__ import annotations

import bisect

import torch

# Upper bound on the floats of one block of q k^T (rows x keys) held by the plain pass, the
# candidate sums and the sink correction: 2**18 floats = 1 MiB, small enough to stay in a CPU
# core's L2 cache.
BLOCK_FLOATS = 1 << 18
MIN_BLOCK_ROWS = 16


def block_rows(width: int) -> int:
    """Rows of one block over ``width`` keys: ``BLOCK_FLOATS`` entries, at least
    ``MIN_BLOCK_ROWS``."""
    return max(MIN_BLOCK_ROWS, BLOCK_FLOATS // max(width, 1))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the passes compute in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a copy when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def kv_groups(b_idx, h_idx, group: int) -> dict:
    """``{(b, kv_head): [(pair, h), ...]}``: the pairs that read the same kv head."""
    shared = {}
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        shared.setdefault((b, h // group), []).append((p, h))
    return shared


def key_span(first_pos: int, last_pos: int, window=None) -> tuple:
    """Keys ``[lo, hi)`` that some row at positions ``first_pos..last_pos`` sees: up to
    ``last_pos``, from 0 or, within a window, from ``first_pos - W + 1``."""
    lo = 0 if window is None else max(0, first_pos - window + 1)
    return lo, last_pos + 1


def hidden(row_pos: torch.Tensor, key_pos: torch.Tensor, window=None) -> torch.Tensor:
    """``[rows, keys]`` bool: True where the row at ``row_pos`` does not see the key at ``key_pos``."""
    behind = row_pos[:, None] - key_pos[None, :]
    return behind < 0 if window is None else (behind < 0) | (behind >= window)


def rows_seeing(key_pos: torch.Tensor, first_pos: int, last_pos: int, window=None):
    """How many rows at positions ``first_pos..last_pos`` see each key of ``key_pos`` (keys of
    the rows' :func:`key_span`):
    those from ``max(first_pos, j)`` to ``min(last_pos, j + W - 1)``."""
    top = key_pos.clamp(min=first_pos)
    end = last_pos if window is None else (key_pos + (window - 1)).clamp_(max=last_pos)
    return (end + 1 - top).clamp_(min=0)


def blocks_seeing(keys: list, nq: int, nk: int, rows: int, window=None):
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


def probs_on_keys(q_rows, keys, neg_lse_rows, key_pos, row_pos, scale, window=None):
    """``P_ij = exp(scale q_i.k_j - lse_i)`` of a few rows on a few keys, 0 where hidden."""
    s = torch.addmm(neg_lse_rows[:, None], q_rows, keys.t(), alpha=scale)
    s.masked_fill_(hidden(row_pos, key_pos, window), float("-inf"))
    return s.exp_()
