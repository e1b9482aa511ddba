"""A decode step (``Nq == 1``, no window), in one of two ways chosen by the number of keys
alone (never by the heads, so that an uncalibrated row is bit for bit the ``heads=None`` step):

* **fused** (``Nk < DIRECT_MIN_KEYS``): one SDPA call for every head, k and v never repeated.
  On the CPU it is ``enable_gqa``: each query head is its own work item, which spreads a step
  over the threads better than the ``g = Hq / Hkv`` heads of a group as the rows of one item
  (SmolLM2's decode, empty profile: 0.971x -> 0.991x sdpa at 2 threads); elsewhere it is the
  latter (q viewed as ``[B, Hkv, g, D]``), which the GPU's fused kernels also take with a mask.
  A step costs SDPA's own fused kernel. A call with
  calibrated heads first needs their rows of ``P`` for the sink test (``P > tau``, the first
  valid key excepted): one batched product for the logits of every head, one softmax, one
  comparison with per-row limits (``tau`` on the calibrated rows, ``+inf`` elsewhere). Where a
  calibrated row has a sink, the calibration is a shift of its sink logits
  (:func:`~act_kernels.calibration.sink_logit_shift`), given to the same SDPA call as an additive
  mask that is 0 on every other row: the kernel adds 0 exactly, so uncalibrated rows and
  calibrated rows without a sink are the plain step. A calibrated call reads K twice.
  On the CPU, in float32/64, without a mask, padding, statistics or gradients, and while the
  calibrated rows are few (``cpu_rows.rows_to_take``), the plain step runs instead for every
  row and the calibrated ones are then rewritten by one compiled loop (:mod:`.cpu_rows`, numba):
  at decode sizes the ops above cost their dispatch, the loop one call.
* **direct** (``Nk >= DIRECT_MIN_KEYS``): the logits, their softmax and one product with v,
  for every head. A calibrated call reads K once (its logits serve the sink test and the
  output): about 0.6x the fused calibrated step at 8k keys; a call without calibrated heads
  costs 1.00x-1.10x the fused one there (measured: ``benchmarks/RESULTS.md``, issue 22). The
  shift is added to the logits before the softmax; a row without one adds 0 exactly.

One host read per step decides whether any row changes, and when one does, a second whether a
row's non-sink mass is so small that it must be taken from the logits. Half-precision inputs
are computed in float32 (q, k and v converted), the output cast back. Kept to few tensor ops: at
decode sizes their dispatch cost, not arithmetic, is the bill.
"""
from __future__ import annotations

import functools

import torch

from ..calibration import sink_logit_shift
from ..sinks import first_valid_index
from ..tensor_cache import TensorCache
from . import cpu_rows
from .blocks import as_dtype, work_dtype
from .stats import calibrated_heads


# From this many keys on, a decode step takes the direct way (see the module docstring).
DIRECT_MIN_KEYS = 4096


def decode_step(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                attn_mask=None):
    """``(out, stats)`` of one query row per head, the calibrated rows with a sink calibrated.

    With ``attn_mask`` (bool ``[B or 1, 1, Nk]``: the keys the row sees, ANDed with the key
    padding) the row's visible keys play the part of the real keys: the first one is never a
    sink, and a row that sees none is 0 (``docs/spec.md`` section 3a for one row). Inside a
    compiled graph the step reads nothing on the host: every calibrated row takes the shift
    (0 where it has no sink), chosen by selects."""
    direct = k.shape[2] >= DIRECT_MIN_KEYS
    if attn_mask is None and key_padding_mask is None and not (return_stats or direct):
        # a generating model's usual step, first and in few lines (it runs for every layer)
        if heads is None:
            return attend(q, k, v, scale, None, None, None), None
        if not torch.compiler.is_compiling():
            rows = cpu_rows.rows_to_take(q, k, v, heads)
            if rows is not None:       # the plain step, then its calibrated rows in one loop
                out = attend(q, k, v, scale, None, None, None)
                cpu_rows.calibrate(q, k, v, out, rows, beta, tau, scale)
                return out, None
    host_reads = not torch.compiler.is_compiling()
    if attn_mask is not None:
        visible = attn_mask[:, 0].expand(q.shape[0], k.shape[2])
        if key_padding_mask is not None:
            visible = visible & key_padding_mask & key_padding_mask[:, -1:]
        key_padding_mask, alive = visible, visible.any(-1)
    else:
        alive = None if key_padding_mask is None else key_padding_mask[:, -1]   # the query is real
    if heads is None and not return_stats and not direct:
        return attend(q, k, v, scale, key_padding_mask, alive, None), None
    logits = all_logits(q, k, scale, key_padding_mask, alive)               # [B, Hq, Nk]
    probs = torch.softmax(logits, dim=-1)
    shift = stats = None
    if return_stats:                 # every head's sinks, then the calibrated rows' only
        sinks = decode_sinks(probs, tau, key_padding_mask, alive)
        stats = _step_stats(probs, sinks, heads, alive)
        if heads is not None:
            sinks = sinks & heads.unsqueeze(-1)
    elif heads is not None:          # the calibrated rows' sinks, in one comparison
        sinks = decode_sinks(probs, row_limits(heads, tau, probs.dtype), key_padding_mask, alive)
    if heads is not None and (not host_reads or bool(sinks.any())):   # else: the plain step
        shift = sink_logit_shift(logits, probs, sinks, beta, host_reads)
    if direct:
        if shift is not None:
            probs = torch.softmax(logits + shift, dim=-1)
        return weigh(probs, v, q.dtype, alive), stats
    return attend(q, k, v, scale, key_padding_mask, alive, shift), stats


def weigh(probs, v, dtype, alive):
    """``[B, Hq, 1, D]`` in ``dtype``: the rows of weights ``probs [B, Hq, Nk]`` times their kv
    head's v (one batched product, v unrepeated); a padded query's row is 0."""
    bsz, hq, nk = probs.shape
    hkv, dim = v.shape[1], v.shape[3]
    out = torch.matmul(probs.view(bsz, hkv, hq // hkv, nk), as_dtype(v, probs.dtype))
    out = out.view(bsz, hq, 1, dim)
    if alive is not None:
        out = out.masked_fill(~alive[:, None, None, None], 0.0)
    return as_dtype(out, dtype)


def row_limits(heads, tau: float, dtype) -> torch.Tensor:
    """``[B, Hq, 1]``: ``tau`` on the calibrated rows, ``+inf`` on the others (no ``P`` exceeds
    it), so that one comparison finds the calibrated rows' sinks; made once per heads mask."""
    def limits(h):
        return torch.where(h, tau, float("inf")).to(dtype)[..., None]

    if torch.compiler.is_compiling():
        return limits(heads)
    return _LIMITS.get(heads, limits, (float(tau), dtype))


_LIMITS = TensorCache()


_OWN_WORK = (torch.float32, torch.float64)     # dtypes that are their own work dtype


def attend(q, k, v, scale, key_padding_mask, alive, shift):
    """``[B, Hq, 1, D]`` in q's dtype: every head's attention, one SDPA call with k and v
    unrepeated (on the CPU ``enable_gqa``; elsewhere the query heads of each kv group as the rows
    of one item, which the GPU's fused kernels take with a mask), ``shift [B, Hq, Nk]`` (or None)
    added to the logits; a padded query's row is 0."""
    if (shift is None and key_padding_mask is None and q.is_cpu and q.dtype in _OWN_WORK
            and q.dtype is k.dtype is v.dtype):        # the same call below, in fewer lines
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                enable_gqa=True)
    dtype, work, gqa = q.dtype, work_dtype(q.dtype), q.is_cpu
    query = as_dtype(q, work)
    mask = None if shift is None else shift.unsqueeze(2)                     # [B, Hq, 1, Nk]
    if not gqa:
        bsz, hq, _, dim = q.shape
        rows = hq // k.shape[1]
        query = query.reshape(bsz, hq // rows, rows, dim)
        mask = None if mask is None else mask.view(bsz, hq // rows, rows, mask.shape[-1])
    if key_padding_mask is not None:
        visible = (key_padding_mask & alive[:, None])[:, None, None, :]
        mask = visible if mask is None else mask.masked_fill_(~visible, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        query, as_dtype(k, work), as_dtype(v, work), attn_mask=mask, scale=scale,
        enable_gqa=gqa)
    if not gqa:
        out = out.reshape(bsz, hq, 1, dim)
    if alive is not None:        # a row that sees no key: 0 on every device
        out = out.masked_fill(~alive[:, None, None, None], 0.0)
    return as_dtype(out, dtype)


def all_logits(q, k, scale, key_padding_mask, alive):
    """``[B, Hq, Nk]``: ``scale q k^T`` of every head in the work dtype, one batched product (the
    query heads of a group against their kv head, k unrepeated); padded keys ``-inf``, a padded
    query's row 0 (finite: it gets no sink, and its output is 0)."""
    bsz, hq, _, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    work = work_dtype(q.dtype)
    # one baddbmm on 3-D views ([B Hkv, g, D] x [B Hkv, D, Nk]; a cache's slice along Nk stays a
    # view), the scale as its alpha: a 4-D matmul and a separate scaling cost a decode step
    # more in dispatch than in arithmetic
    ignored = (torch.zeros(1, 1, 1, dtype=work, device=q.device)
               if torch.compiler.is_compiling() else _no_input(work, q.device))
    logits = torch.baddbmm(ignored,
                           as_dtype(q, work).reshape(bsz * hkv, hq // hkv, dim),
                           as_dtype(k, work).reshape(bsz * hkv, nk, dim).transpose(1, 2),
                           beta=0.0, alpha=scale).view(bsz, hq, nk)
    if key_padding_mask is not None:
        hidden = ~key_padding_mask | ~alive[:, None]
        logits.masked_fill_(hidden[:, None, :], float("-inf"))
        logits.masked_fill_(~alive[:, None, None], 0.0)
    return logits


@functools.lru_cache(maxsize=None)
def _no_input(dtype, device) -> torch.Tensor:
    """The ignored ``input`` of a ``baddbmm`` with ``beta=0`` (a ``[1, 1, 1]`` zero), made once
    per dtype and device (eagerly: a compiled graph makes its own)."""
    return torch.zeros(1, 1, 1, dtype=dtype, device=device)


def decode_sinks(probs, tau, key_padding_mask, alive):
    """Sinks of single rows ``[B, Hq, Nk]``: ``P > tau`` (``tau`` a float or per-row limits
    ``[B, Hq, 1]``), the first valid key excepted (padded keys have ``P = 0``; a padded query has
    no sink)."""
    sinks = probs > tau
    if key_padding_mask is None:
        sinks.select(-1, 0).fill_(False)
        return sinks
    bsz, hq = probs.shape[:2]
    first = first_valid_index(key_padding_mask, bsz, probs.device)
    sinks.scatter_(2, first[:, None, None].expand(bsz, hq, 1), False)
    sinks &= alive[:, None, None]
    return sinks


def _step_stats(probs, sinks, heads, alive) -> dict:
    """The statistics of a decode step from the rows of ``P`` of every head."""
    bsz, hq = probs.shape[:2]
    mass = torch.where(sinks, probs, 0.0).sum(-1, keepdim=True)         # m, [B, Hq, 1]
    scores = probs if alive is None else probs * alive[:, None, None]
    return {"scores": scores.float(), "sinks": sinks, "sink_mass": mass.float(),
            "calibrated": calibrated_heads(heads, bsz, hq, probs.device)}
