"""An independent float64 brute force of ACT, written straight from the contract, ``docs/spec.md``.

Every backend is checked against this module, so it imports nothing from ``act_kernels`` and
shares no code with the eager reference. It works one (batch row, head) at a time on a dense
``[Nq, Nk]`` float64 map, which is slow but obvious; keep the inputs short (a few hundred
positions at most).

Conventions (the op's, after normalisation):

* ``q [B, Hq, Nq, D]``, ``k``/``v`` ``[B, Hkv, Nk, D]``, query head ``h`` reads kv head
  ``h // (Hq // Hkv)``; query row ``i`` sits at position ``Nk - Nq + i``.
* ``heads``: ``None`` or a bool mask ``[B, Hq]`` (a ``[Hq]`` mask is broadcast over the batch).
* ``key_padding_mask``: ``None`` or a bool ``[B, Nk]``, True for real tokens.
* General masks (``docs/spec.md``, "General masks"): ``segment_ids`` (integer ``[B, Nk]``,
  packed sequences: a row sees only keys of its own segment), ``block_ids`` (integer ``[B, Nk]``,
  negative = no block: a row in a block also sees every real key of its block, later ones too),
  or ``attn_mask`` (bool ``[B, Nq, Nk]``, the visibility itself, ANDed with the key padding).
  The key never made a sink: the first real key of each segment (of the sequence without
  segments); with ``attn_mask``, the first key each row sees.

Statistics (scores, sinks, sink mass) are computed for every head, calibrated or not; the
output is calibrated only for the heads in the mask. The work is done on the CPU; results are
returned on q's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class BruteForce:
    """Everything the brute force computed, on q's device; all float tensors are float64."""

    out: torch.Tensor          # [B, Hq, Nq, D] calibrated output (heads in the mask only)
    plain: torch.Tensor        # [B, Hq, Nq, D] plain causal attention, every head
    scores: torch.Tensor       # [B, Hq, Nk] mean attention received, 0 for keys no row sees
    sinks: torch.Tensor        # [B, Hq, Nk] bool
    sink_mass: torch.Tensor    # [B, Hq, Nq] m_i
    rest: torch.Tensor         # [B, Hq, Nq] non-sink mass, summed directly (not 1 - m_i)
    changed: torch.Tensor      # [B, Hq, Nq] bool: rows that calibration rewrote
    row_valid: torch.Tensor    # [B, Nq] bool: query rows that see at least one key
    key_seen: torch.Tensor     # [B, Nk] bool: keys seen by at least one row


def visible(nq: int, nk: int, real: torch.Tensor, window: Optional[int] = None,
            segment=None, block=None) -> torch.Tensor:
    """``[Nq, Nk]`` bool for one sequence: row ``i`` (position ``nk - nq + i``) sees key ``j``
    when ``j <= position`` (and ``j > position - window`` with a window) or both lie in the same
    block (``block[j] == block[position] >= 0``), the two lie in the same segment, the key is
    real and the query itself is real."""
    sees = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        pos = nk - nq + i
        if not real[pos]:
            continue
        for j in range(nk):
            near = j <= pos and (window is None or j > pos - window)
            if block is not None and block[pos] >= 0 and block[j] == block[pos]:
                near = True
            if segment is not None and segment[j] != segment[pos]:
                near = False
            sees[i, j] = near and bool(real[j])
    return sees


def never_sinks(real: torch.Tensor, segment=None, sees=None) -> torch.Tensor:
    """``[Nk]`` bool: the keys excluded from the sinks. Without ``sees``: the first real key
    of each segment (of the whole sequence without segments). With a general mask (``sees``
    given): the first key each row sees."""
    nk = real.shape[0]
    keep = torch.zeros(nk, dtype=torch.bool)
    if sees is not None:
        for i in range(sees.shape[0]):
            seen = sees[i].nonzero().squeeze(1)
            if seen.numel():
                keep[int(seen[0])] = True
        return keep
    started = set()
    for j in range(nk):
        seg = None if segment is None else int(segment[j])
        if real[j] and seg not in started:
            started.add(seg)
            keep[j] = True
    return keep


def _softmax_rows(logits: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """Row softmax over the visible entries only; a row that sees nothing is all zeros."""
    masked = logits.masked_fill(~sees, float("-inf"))
    top = masked.max(dim=1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows that see nothing
    e = torch.exp(masked - top)                                        # 0 where hidden
    total = e.sum(dim=1, keepdim=True)                                 # >= 1 if a key is seen
    return e / torch.where(total > 0, total, torch.ones_like(total))


def bruteforce_details(q, k, v, heads=None, beta: float = 0.4, tau: float = 0.1,
                       scale: Optional[float] = None, key_padding_mask=None, *,
                       window: Optional[int] = None,
                       force_sinks: Optional[torch.Tensor] = None, segment_ids=None,
                       block_ids=None, attn_mask=None) -> BruteForce:
    """ACT in float64, one (batch row, head) at a time.

    ``force_sinks`` (bool ``[B, Hq, Nk]``) replaces the detected sink set; tests use it when a
    backend legitimately decided a key whose score ties with ``tau`` the other way.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    assert hq % hkv == 0 and nq <= nk and v.shape == k.shape
    group = hq // hkv
    if scale is None:
        scale = dim ** -0.5
    q64, k64, v64 = (t.detach().to("cpu", torch.float64) for t in (q, k, v))

    if heads is None:
        calibrate = torch.zeros(bsz, hq, dtype=torch.bool)
    else:
        calibrate = torch.as_tensor(heads).to("cpu", torch.bool)
        if calibrate.dim() == 1:
            calibrate = calibrate[None, :].expand(bsz, hq)
        assert calibrate.shape == (bsz, hq)
    if key_padding_mask is None:
        real_all = torch.ones(bsz, nk, dtype=torch.bool)
    else:
        real_all = key_padding_mask.to("cpu", torch.bool)

    out = torch.zeros(bsz, hq, nq, dim, dtype=torch.float64)
    plain = torch.zeros_like(out)
    scores = torch.zeros(bsz, hq, nk, dtype=torch.float64)
    sinks = torch.zeros(bsz, hq, nk, dtype=torch.bool)
    sink_mass = torch.zeros(bsz, hq, nq, dtype=torch.float64)
    rest = torch.zeros_like(sink_mass)
    changed = torch.zeros(bsz, hq, nq, dtype=torch.bool)
    row_valid = torch.zeros(bsz, nq, dtype=torch.bool)
    key_seen = torch.zeros(bsz, nk, dtype=torch.bool)

    for b in range(bsz):
        real = real_all[b]
        segment = None if segment_ids is None else segment_ids[b].to("cpu", torch.long)
        block = None if block_ids is None else block_ids[b].to("cpu", torch.long)
        if attn_mask is not None:
            given = attn_mask.to("cpu", torch.bool)
            given = given.reshape(given.shape[0], nq, nk)[b if given.shape[0] > 1 else 0]
            sees = given & real[None, :] & real[nk - nq:, None]
            excluded = never_sinks(real, sees=sees)
        else:
            sees = visible(nq, nk, real, window, segment, block)
            excluded = never_sinks(real, segment)
        row_valid[b] = sees.any(dim=1)
        seen_by = sees.sum(dim=0)                     # how many rows see each key
        key_seen[b] = seen_by > 0

        for h in range(hq):
            kv = h // group
            # 1. P = softmax(scale q k^T + mask) over the keys each row sees.
            logits = scale * (q64[b, h] @ k64[b, kv].T)
            probs = _softmax_rows(logits, sees)
            plain[b, h] = probs @ v64[b, kv]

            # 2. score_j = sum_{i sees j} P_ij / #{i : i sees j}; keys nobody sees score 0.
            received = torch.where(sees, probs, torch.zeros_like(probs)).sum(dim=0)
            score = torch.where(seen_by > 0, received / seen_by.clamp(min=1),
                                torch.zeros_like(received))
            scores[b, h] = score

            # 3. S = {j : score_j > tau} minus the first valid key.
            if force_sinks is not None:
                sink = force_sinks[b, h].to("cpu", torch.bool).clone()
            else:
                sink = (score > tau) & ~excluded
            sinks[b, h] = sink

            # 4. m_i and the rewritten rows.
            m = probs[:, sink].sum(dim=1)
            r = probs[:, ~sink].sum(dim=1)
            sink_mass[b, h] = m
            rest[b, h] = r
            new = probs.clone()
            if calibrate[b, h]:
                rows = (m > 0) & (r > 0)
                gain = (1 - beta * m[rows]) / r[rows]
                new[rows] = torch.where(sink, beta * probs[rows], probs[rows] * gain[:, None])
                changed[b, h] = rows
            # 5. o_i = sum_j P'_ij v_j
            out[b, h] = new @ v64[b, kv]

    fields = (out, plain, scores, sinks, sink_mass, rest, changed, row_valid, key_seen)
    return BruteForce(*(t.to(q.device) for t in fields))


def act_bruteforce(q, k, v, heads=None, beta: float = 0.4, tau: float = 0.1,
                   scale: Optional[float] = None, key_padding_mask=None, *,
                   window: Optional[int] = None, force_sinks: Optional[torch.Tensor] = None,
                   segment_ids=None, block_ids=None, attn_mask=None):
    """``(out [B, Hq, Nq, D], scores [B, Hq, Nk], sinks [B, Hq, Nk] bool, sink_mass [B, Hq, Nq])``.

    ``out``, ``scores`` and ``sink_mass`` are float64, all four on q's device (computed on the
    CPU). Scores, sinks and sink mass are given for every head; ``out`` is calibrated only for
    the heads in ``heads``.
    """
    bf = bruteforce_details(q, k, v, heads, beta, tau, scale, key_padding_mask,
                            window=window, force_sinks=force_sinks, segment_ids=segment_ids,
                            block_ids=block_ids, attn_mask=attn_mask)
    return bf.out, bf.scores, bf.sinks, bf.sink_mass
