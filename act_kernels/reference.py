"""The eager reference: ACT written the way ``docs/spec.md`` states it, one step per block.

It materialises the full ``[B, Hq, Nq, Nk]`` probability map, so it is only meant for short
inputs, for tests, and for ``output_attentions=True``. Every fast backend is checked against it.
This module imports nothing from the rest of the package on purpose; for the same reason it
has no defaults for ``beta`` and ``tau`` (their one home is ``act_kernels.params``).

Inputs are already validated and normalised by the caller (``act_kernels.op``):
``heads`` is ``None`` or a bool tensor ``[B, Hq]``; ``key_padding_mask`` is ``None`` or a bool
tensor ``[B, Nk]`` (True = real token); the general masks of ``docs/spec.md`` section 3a,
``segment_ids`` / ``block_ids`` (integer ``[B, Nk]``) or ``attn_mask`` (bool ``[B, Nq, Nk]``),
are ``None`` or checked.
"""
from __future__ import annotations

import torch


def visibility(nq: int, nk: int, key_padding_mask, batch: int, device,
               window=None, segment_ids=None, block_ids=None, attn_mask=None) -> torch.Tensor:
    """Bool ``[B, Nq, Nk]``: does query row ``i`` see key ``j``?

    Row ``i`` sits at absolute position ``p = nk - nq + i`` (bottom-right causal) and sees keys
    ``j <= p``; with a ``window`` W only ``p - W < j <= p``; with ``block_ids`` also the keys of
    its own block (``block[j] == block[p] >= 0``); with ``segment_ids`` only keys of its own
    segment. ``attn_mask`` replaces all of that. With a key-padding mask, padded keys are seen
    by no row and padded query rows see nothing.
    """
    rows = torch.arange(nk - nq, nk, device=device)[:, None]
    cols = torch.arange(nk, device=device)[None, :]
    if attn_mask is not None:
        sees = attn_mask.to(device=device, dtype=torch.bool).expand(batch, nq, nk)
    else:
        sees = cols <= rows
        if window is not None:
            sees = sees & (cols > rows - window)
        sees = sees.unsqueeze(0).expand(batch, nq, nk)
        if block_ids is not None:
            block = block_ids.to(device=device, dtype=torch.long)
            own = block[:, nk - nq:, None]                                 # [B, Nq, 1]
            sees = sees | ((own >= 0) & (block[:, None, :] == own))
        if segment_ids is not None:
            segment = segment_ids.to(device=device, dtype=torch.long)
            sees = sees & (segment[:, None, :] == segment[:, nk - nq:, None])
    if key_padding_mask is not None:
        real = key_padding_mask.to(device=device, dtype=torch.bool)
        sees = sees & real[:, None, :] & real[:, nk - nq:, None]
    return sees


def excluded_keys(sees, key_padding_mask, segment_ids, general: bool) -> torch.Tensor:
    """Bool ``[B, Nk]``: the keys that are never sinks. With a general ``attn_mask``
    (``general``): the first key each row sees. Else the first real key of each segment (of the
    whole sequence without segments), seen by a row of the call or not."""
    bsz, nq, nk = sees.shape
    if general:
        first = sees.to(torch.int8).argmax(dim=-1)                      # [B, Nq]
        hit = torch.zeros(bsz, nk, dtype=torch.int8, device=sees.device)
        hit.scatter_add_(1, first, sees.any(dim=-1).to(torch.int8))
        return hit > 0
    real = (torch.ones(bsz, nk, dtype=torch.bool, device=sees.device) if key_padding_mask is None
            else key_padding_mask.to(device=sees.device, dtype=torch.bool))
    pos = torch.arange(nk, device=sees.device).expand(bsz, nk)
    # the last real key before each position (-1: none)
    last = torch.where(real, pos, -1).cummax(dim=1).values
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
    if segment_ids is None:
        return real & (before < 0)
    segment = segment_ids.to(device=sees.device, dtype=torch.long)
    same = segment.gather(1, before.clamp(min=0)) == segment
    return real & ((before < 0) | ~same)


def calibrate_probs(probs: torch.Tensor, sinks: torch.Tensor, beta: float):
    """Step 4 of the spec on attention rows: ``(P', m)``.

    ``probs [..., Nk]`` are rows of ``P``; ``sinks`` (broadcastable bool) marks the sink keys.
    Returns the calibrated rows and ``m [..., 1]``, each row's attention on the sinks. Rows with
    ``m == 0`` or no non-sink mass left stay as they are.
    """
    sink_probs = probs * sinks
    mass = sink_probs.sum(dim=-1, keepdim=True)               # m_i
    rest = (probs - sink_probs).sum(dim=-1, keepdim=True)     # 1 - m_i, summed directly
    change = (mass > 0) & (rest > 0)
    share = probs / torch.where(change, rest, torch.ones_like(rest))  # P_ij / (1 - m_i)
    moved = torch.where(sinks, beta * probs, share * (1.0 - beta * mass))
    return torch.where(change, moved, probs), mass


def act_attention_reference(q, k, v, *, beta, tau, heads=None, scale=None,
                            key_padding_mask=None, window=None, segment_ids=None,
                            block_ids=None, attn_mask=None):
    """Return ``(out, probs, stats)``.

    ``out`` is ``[B, Hq, Nq, D]`` in q's dtype, ``probs`` the calibrated map ``P'`` in float32
    (float64 for float64 inputs) and ``stats`` a dict with ``scores`` / ``sinks`` ``[B, Hq, Nk]``
    and ``sink_mass`` ``[B, Hq, Nq]`` for every head (what calibration would use), plus
    ``calibrated`` ``[B, Hq]``.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = dim ** -0.5 if scale is None else scale

    # Grouped-query attention: query head h reads kv head h // group.
    kf = k.to(work).repeat_interleave(group, dim=1)
    vf = v.to(work).repeat_interleave(group, dim=1)
    sees = visibility(nq, nk, key_padding_mask, bsz, q.device, window, segment_ids, block_ids,
                      attn_mask)[:, None]                                        # [B,1,Nq,Nk]

    # 1. P = softmax(scale * q k^T + mask), rows that see nothing are all zero.
    logits = scale * torch.einsum("bhid,bhjd->bhij", q.to(work), kf)
    logits = logits.masked_fill(~sees, float("-inf"))
    row_has_key = sees.any(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~row_has_key, 0.0), dim=-1)
    probs = probs.masked_fill(~sees, 0.0)

    # 2. Sink score of key j: mean attention from the rows that see it (0 if nobody does).
    seen_by = sees.sum(dim=-2).to(work)  # [B, 1, Nk]
    scores = probs.sum(dim=-2) / seen_by.clamp(min=1)
    scores = scores.masked_fill(seen_by == 0, 0.0)

    # 3. Sinks: score > tau, except the first valid key of each segment (of the sequence), which
    #    is kept as it is (also when no row sees it, as with a window); under a general mask
    #    the first key each row sees.
    excluded = excluded_keys(sees[:, 0], key_padding_mask, segment_ids, attn_mask is not None)
    sinks = (scores > tau) & ~excluded[:, None, :]

    # 4. Each row keeps beta of its sink mass m_i and gives (1 - beta) m_i to its other keys.
    new_probs, mass = calibrate_probs(probs, sinks[:, :, None, :], beta)

    calibrated = torch.zeros(bsz, hq, dtype=torch.bool, device=q.device)
    if heads is not None:       # a copy: the stats never alias the caller's (or a cached) mask
        calibrated.copy_(heads.to(device=q.device, dtype=torch.bool).expand(bsz, hq))
    new_probs = torch.where(calibrated[:, :, None, None], new_probs, probs)

    # 5. o_i = sum_j P'_ij v_j
    out = torch.einsum("bhij,bhjd->bhid", new_probs, vf).to(q.dtype)
    stats = {
        "scores": scores.float(),
        "sinks": sinks,
        "sink_mass": mass.squeeze(-1).float(),
        "calibrated": calibrated,
    }
    return out, new_probs, stats
