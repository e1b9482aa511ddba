"""Packed sequences (``segment_ids``, ``docs/spec.md`` section 3a): one call split into
ordinary per-segment calls.

A row sees only keys of its own segment, so segment ``[a, e)`` of a batch row is a bottom-right
causal problem of its own: keys ``[a, e)``, query rows at positions ``max(a, Nk - Nq) .. e - 1``
(the last ones of its keys). :func:`plan` lists those sub-calls, grouped by shape; :func:`split`
runs each group as one batched call of the backend and scatters outputs and statistics back.
A group whose members lie one after another in one batch row is a view of q, k and v (no copy);
others are gathered. Work ``O(sum n_i^2)``, never ``N x N``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Group:
    """Sub-calls of one shape: ``len(batch)`` segments of ``keys`` keys and ``rows`` query rows."""

    keys: int
    rows: int
    batch: tuple           # batch row of each member
    starts: tuple          # position of each member's first key
    nq: int                # the call's Nq, Nk: member m's query rows are its positions
    nk: int                # >= Nk - Nq, i.e. rows starts[m] + keys - rows - (Nk - Nq) ..

    @property
    def consecutive(self) -> bool:
        """Members one after another in one batch row: q, k, v are views, not copies."""
        return (len(set(self.batch)) == 1
                and all(b - a == self.keys for a, b in zip(self.starts, self.starts[1:])))

    def key_index(self, device):
        """``(batch [G, 1], positions [G, keys])`` long index tensors of the members' keys."""
        batch = torch.tensor(self.batch, device=device)[:, None]
        pos = torch.tensor(self.starts, device=device)[:, None] + torch.arange(self.keys,
                                                                              device=device)
        return batch, pos

    def row_index(self, device):
        """``(batch [G, 1], rows [G, rows])``: the members' query rows of the call."""
        batch, pos = self.key_index(device)
        return batch, pos[:, self.keys - self.rows:] - (self.nk - self.nq)


def plan(segment_ids: torch.Tensor, nq: int) -> Optional[tuple]:
    """The sub-calls of a call with these (checked, non-decreasing) ``segment_ids`` and ``nq``
    query rows, as a tuple of :class:`Group`; ``None`` when every batch row is one segment
    (nothing to split)."""
    seg = segment_ids.detach().to("cpu", torch.long)
    bsz, nk = seg.shape
    first_row = nk - nq
    change = (seg[:, 1:] != seg[:, :-1]).nonzero().tolist()
    if not change:                          # one segment a batch row: nothing to split
        return None
    bounds = [[0] for _ in range(bsz)]
    for b, j in change:
        bounds[b].append(j + 1)
    shapes = {}
    for b, bound in enumerate(bounds):
        for a, e in zip(bound, bound[1:] + [nk]):
            if e <= first_row:                 # no query row in this segment
                continue
            rows = e - max(a, first_row)
            shapes.setdefault((e - a, rows), []).append((b, a))
    return tuple(Group(keys, rows, tuple(b for b, _ in members), tuple(a for _, a in members),
                       nq, nk)
                 for (keys, rows), members in shapes.items())


def _keys_of(x: torch.Tensor, group: Group, index) -> torch.Tensor:
    """``[G, H, keys, ...]``: the members' keys of ``x [B, H, Nk, ...]``."""
    if group.consecutive:
        b, a = group.batch[0], group.starts[0]
        part = x[b, :, a:a + len(group.batch) * group.keys]
        return part.unflatten(1, (len(group.batch), group.keys)).transpose(0, 1)
    batch, pos = index
    return x[batch, :, pos].transpose(1, 2)


def _rows_of(x: torch.Tensor, group: Group, index) -> torch.Tensor:
    """``[G, H, rows, ...]``: the members' query rows of ``x [B, H, Nq, ...]``."""
    if group.consecutive and group.rows == group.keys:
        b, r = group.batch[0], group.starts[0] - (group.nk - group.nq)
        part = x[b, :, r:r + len(group.batch) * group.rows]
        return part.unflatten(1, (len(group.batch), group.rows)).transpose(0, 1)
    batch, rows = index
    return x[batch, :, rows].transpose(1, 2)


def _put_rows(dest: torch.Tensor, group: Group, index, value: torch.Tensor) -> None:
    """``dest[b, :, rows of member m] = value[m]`` for ``dest [B, H, Nq, ...]``."""
    if group.consecutive and group.rows == group.keys:
        b, r = group.batch[0], group.starts[0] - (group.nk - group.nq)
        dest[b, :, r:r + len(group.batch) * group.rows] = value.transpose(0, 1).flatten(1, 2)
        return
    batch, rows = index
    dest[batch, :, rows] = value.transpose(1, 2)


def _put_keys(dest: torch.Tensor, group: Group, index, value: torch.Tensor) -> None:
    """``dest[b, :, keys of member m] = value[m]`` for ``dest [B, H, Nk]``."""
    batch, pos = index
    dest[batch, :, pos] = value.transpose(1, 2)


def split(groups: tuple, call: Callable, q, k, v, heads, key_padding_mask, block_ids,
          return_stats: bool):
    """``(out, stats or None)`` of the call, from one batched ``call`` per group.

    ``call(q, k, v, heads, key_padding_mask, block_ids)`` runs the backend on a sub-call and
    returns its ``(out, stats dict or None)``; ``heads``, ``key_padding_mask`` and ``block_ids``
    (``None`` or ``[B, ...]``) are sliced to the members, each ``None`` where it changes nothing
    in the group. Keys in no sub-call (segments without a query row) score 0 and are no sinks.
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    device = q.device
    out = q.new_zeros(bsz, hq, nq, dim)
    stats = None
    if return_stats:
        stats = {"scores": torch.zeros(bsz, hq, nk, device=device),
                 "sinks": torch.zeros(bsz, hq, nk, dtype=torch.bool, device=device),
                 "sink_mass": torch.zeros(bsz, hq, nq, device=device),
                 "calibrated": (torch.zeros(bsz, hq, dtype=torch.bool, device=device)
                                if heads is None else heads.clone())}
    heads_host = None if heads is None else heads.detach().cpu()
    for group in groups:
        key_index = group.key_index(device)
        row_index = group.row_index(device)
        members = torch.tensor(group.batch, device=device)
        sub_heads = None
        if heads_host is not None and bool(heads_host[list(group.batch)].any()):
            sub_heads = heads.index_select(0, members)
        sub_kpm = None
        if key_padding_mask is not None:
            sub_kpm = key_padding_mask[key_index]
            if bool(sub_kpm.all()):
                sub_kpm = None
        sub_blocks = None
        if block_ids is not None:
            sub_blocks = block_ids[key_index]
            if not bool(((sub_blocks[:, 1:] == sub_blocks[:, :-1]) & (sub_blocks[:, 1:] >= 0))
                        .any()):
                sub_blocks = None
            else:
                sub_blocks = sub_blocks.contiguous()
        sub_out, sub_stats = call(_rows_of(q, group, row_index), _keys_of(k, group, key_index),
                                  _keys_of(v, group, key_index), sub_heads, sub_kpm, sub_blocks)
        _put_rows(out, group, row_index, sub_out)
        if stats is not None:
            _put_keys(stats["scores"], group, key_index, sub_stats["scores"])
            _put_keys(stats["sinks"], group, key_index, sub_stats["sinks"])
            _put_rows(stats["sink_mass"], group, row_index, sub_stats["sink_mass"])
    return out, stats
