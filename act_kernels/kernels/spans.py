"""Bidirectional blocks as block-level metadata: each query row's key interval (host side, torch).

With ``block_ids`` (``docs/spec.md``, "General masks"; segments are split off by the op before a
backend is called) a query row at position ``p`` sees the real keys of ONE contiguous interval

    lo_p = max(first real key, 0 or, with a window W, min(p - W + 1, start of p's block))
    hi_p = max(p, end of p's block)          (p itself when p is in no block)

(the causal window ``[p - W + 1, p]`` and the block both contain ``p``, so their union is an
interval). ``lo_p`` and ``hi_p`` never decrease with ``p``: a block pushes ``hi`` to its end
for its own rows only, and the first row after it sits past that end; inside a block
``min(p - W + 1, start)`` grows with ``p``. So the rows that see key ``j`` are one contiguous
range of rows too, ``[first_j, end_j)``, and a key tile's rows are the union of its keys'
ranges. The kernels load these int32 vectors and take tile-level min / max to bound each
program's loop: key tiles outside every row's interval (forward, correction's direct pass,
decode) and query tiles outside every key's row range (column pass) are skipped, not masked.

Everything here is a handful of ``[B, Nk]`` torch ops on q's device, no host read (the op has
checked that each block is one contiguous run of positions).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Spans(NamedTuple):
    """Per-call interval metadata, int32, contiguous, on the device.

    ``row_lo``, ``row_hi`` ``[B, Nq]``: the first and last key (inclusive) query row ``i`` may
    see (``row_lo > row_hi``: none); key padding inside is still masked by the kernels.
    ``col_first``, ``col_end`` ``[B, Nk]``: the query rows ``[first, end)`` whose interval holds
    key ``j`` (none when ``first >= end``); neither decreases with ``j``, so the rows of a key
    tile lie in ``[first of its first key, end of its last key)``.
    """

    row_lo: torch.Tensor
    row_hi: torch.Tensor
    col_first: torch.Tensor
    col_end: torch.Tensor


def _run_bounds(ids: torch.Tensor):
    """``(start, end)`` long ``[B, Nk]``: first and last position of the run of equal ids that
    holds each position."""
    bsz, nk = ids.shape
    pos = torch.arange(nk, device=ids.device).expand(bsz, nk)
    change = ids[:, 1:] != ids[:, :-1]
    edge = torch.ones(bsz, 1, dtype=torch.bool, device=ids.device)
    opens = torch.cat([edge, change], dim=1)          # a run starts here
    closes = torch.cat([change, edge], dim=1)         # a run ends here
    start = torch.where(opens, pos, 0).cummax(dim=1).values
    end = torch.where(closes, pos, nk).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def row_intervals(block_ids: torch.Tensor, nq: int, window: Optional[int],
                  first_valid: Optional[torch.Tensor] = None):
    """``(lo, hi)`` long ``[B, Nq]``: the first and last key (inclusive) each query row may see
    (the interval of the module docstring; ``first_valid`` ``[B]``, the first real key, or None
    for 0). The one home of this rule: the Triton kernels' spans and the torch backend's
    masked path both read it."""
    bsz, nk = block_ids.shape
    ids = block_ids.to(torch.long)
    pos = torch.arange(nk, device=ids.device).expand(bsz, nk)
    start, end = _run_bounds(ids)
    in_block = ids >= 0
    start = torch.where(in_block, start, pos)
    end = torch.where(in_block, end, pos)
    floor = (torch.zeros(bsz, 1, dtype=torch.long, device=ids.device) if first_valid is None
             else first_valid.to(torch.long)[:, None])
    if window is None:
        lo = floor.expand(bsz, nk)
    else:
        lo = torch.maximum(torch.minimum(pos - window + 1, start), floor)
    return lo[:, nk - nq:].contiguous(), end[:, nk - nq:].contiguous()


def block_spans(block_ids: torch.Tensor, nq: int, window: Optional[int],
                first_valid: torch.Tensor) -> Spans:
    """The ``Spans`` of a call: ``block_ids`` integer ``[B, Nk]`` (negative = in no block, each
    block one contiguous run), ``window`` None or ``W >= 1``, ``first_valid`` ``[B]`` (the first
    real key: keys before it are padding, so the intervals start there)."""
    bsz, nk = block_ids.shape
    row_lo, row_hi = row_intervals(block_ids, nq, window, first_valid)
    # rows that see key j: hi_i >= j (from the first such row on, hi grows) and lo_i <= j (up
    # to the last such row, lo grows)
    keys = torch.arange(nk, device=block_ids.device).expand(bsz, nk).contiguous()
    first = torch.searchsorted(row_hi, keys, side="left")
    stop = torch.searchsorted(row_lo, keys, side="right")
    return Spans(row_lo.to(torch.int32), row_hi.to(torch.int32),
                 first.to(torch.int32).contiguous(), stop.to(torch.int32).contiguous())


def span_counts(spans: Spans, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, Nk]`` float32: the number of real query rows that see each real key (the divisor
    of the score): each real row adds 1 over its interval (a difference array: +1 at ``lo``,
    -1 past ``hi``, summed along the keys), padded keys count 0."""
    bsz, nq = spans.row_lo.shape
    nk = spans.col_first.shape[1]
    lo, hi = spans.row_lo.long(), spans.row_hi.long()
    weight = (lo <= hi).to(torch.float32)
    if key_padding_mask is not None:
        weight = weight * key_padding_mask[:, nk - nq:].to(torch.float32)
    delta = torch.zeros(bsz, nk + 1, device=lo.device, dtype=torch.float32)
    delta.scatter_add_(1, lo.clamp(max=nk), weight)
    delta.scatter_add_(1, (hi + 1).clamp(min=0, max=nk), -weight)
    counts = delta.cumsum(dim=1)[:, :nk]
    if key_padding_mask is not None:
        counts = counts * key_padding_mask.to(torch.float32)
    return counts
