"""The portable torch backend of ACT: exact, and never more than a block of rows of P in memory.

One module per pass, in the order the data flows (``csrc_notes/act_passes.md``)::

    q, k, v --plain.py-------> out, lse          (fused SDPA kernel; every head)
            --bounds.py------> bound of sum_i P_ij (calibrated heads; q k^T in bfloat16, block
                               maxima), then sum_i P_ij exactly, only for the keys whose bound
                               reaches tau * count
            --sinks----------> S                 (tiny: per key; ``act_kernels.sinks``)
            --correction.py--> out               (calibrated heads, sink keys only, by the
                               identity of ``act_kernels.calibration``)

``return_stats`` adds the full exact column pass (``columns.py``) to report every key's score.
A short prefill (``Nq x Nk <= dense.DENSE_MAX_ENTRIES``, the head search's prompts) skips the
bound and the identity: ``dense.py`` forms each wanted pair's whole ``P`` (a few KiB) and takes
the column sums, the sinks, the sink mass and both halves of the calibrated output from it by
batched products, for all pairs at once.
With a sliding window (``window=W``) every pass works block by block on the span of keys the
block's rows see (``blocks.key_span``), so the call costs ``O(Nq W)``; a windowed decode takes
this path. A decode step (``Nq == 1``, no window) is ``decode.py``: one fused SDPA call for all
heads, the calibrated rows' sinks found first from their row of P and their calibration given to
that call as a shift of their sink logits (from ``decode.DIRECT_MIN_KEYS`` keys on: the logits,
their softmax and one product with v, for every head; on the CPU, with few calibrated rows and
no mask, the plain SDPA call and then ``cpu_rows.py``, one compiled loop over the calibrated
rows). A decode step under a general mask is the same step with the row's visible keys as its
real keys.
Bidirectional blocks (``block_ids``) and a general mask (``attn_mask``) take ``masked.py``: two
exact passes by blocks of rows over the keys they see (a decode step with blocks and no window
is plain causal and stays in ``decode.py``).
This module is the entry point, :func:`act_attention_torch`.
"""
from __future__ import annotations

import torch

from ..sinks import first_valid_index, seen_counts, select_sinks
from . import dense
from .blocks import work_dtype
from .bounds import pruned_column_sums
from .columns import column_sums
from .correction import sink_correction
from .decode import decode_step
from .masked import masked_attention
from .plain import plain_attention
from .stats import prefill_stats


def pair_neg_lse(lse, b_idx, h_idx, key_padding_mask, dtype):
    """``-lse [P, Nq]`` of the (b, h) pairs in the work dtype, ``-inf`` on padded query rows (they
    count for nothing in any column sum)."""
    neg_lse = -lse[b_idx, h_idx].to(work_dtype(dtype))
    if key_padding_mask is not None:
        dead = ~key_padding_mask[:, key_padding_mask.shape[1] - lse.shape[2]:]
        neg_lse.masked_fill_(dead[b_idx], float("-inf"))
    return neg_lse


def act_attention_torch(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                        window=None, block_ids=None, attn_mask=None):
    """Backend entry point (arguments normalised by :func:`act_kernels.op.act_attention`).

    With a ``window`` every pass works on the span of keys a block of rows sees (its
    :func:`~.blocks.key_span`), so a windowed call costs ``O(Nq W)``; the column sums still land in
    full-length ``[pairs, Nk]`` arrays, so that the first valid key of the *sequence* is
    excluded even when no row of the call sees it. A windowed decode step takes this path too.
    """
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    if nq == 1 and window is None:     # a decode step (with blocks: plain causal), any mask
        return decode_step(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                           attn_mask)
    if attn_mask is not None or (block_ids is not None and (nq > 1 or window is not None)):
        return masked_attention(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                                window, block_ids, attn_mask)
    out, lse = plain_attention(q, k, v, scale, key_padding_mask, window)
    wanted = torch.ones(bsz, hq, dtype=torch.bool, device=q.device) if return_stats else heads
    if wanted is None:
        return out, None

    b_idx, h_idx = wanted.nonzero(as_tuple=True)
    calibrated = (heads[b_idx, h_idx] if heads is not None
                  else torch.zeros(len(b_idx), dtype=torch.bool, device=q.device))
    out = out.contiguous() if not out.is_contiguous() else out
    if dense.takes_dense_path(nq, nk):
        scores, sinks, mass = dense.dense_pairs(out, q, k, v, b_idx, h_idx, calibrated, beta,
                                                tau, scale, key_padding_mask, window)
        if not return_stats:
            return out, None
        return out, prefill_stats(scores, sinks, mass, heads, q.shape, nk)

    neg_lse = pair_neg_lse(lse, b_idx, h_idx, key_padding_mask, q.dtype)
    counts = seen_counts(nq, nk, key_padding_mask, bsz, q.device, window)[b_idx]
    first = first_valid_index(key_padding_mask, bsz, q.device)[b_idx]
    sums, candidates = pruned_column_sums(q, k, neg_lse, b_idx, h_idx, counts, first, tau, scale,
                                          window)
    if return_stats:
        # Report every key's score: the pruned keys' from the full column pass (all provably
        # <= tau), the candidates' from the very sums that decide them, so that the sinks are
        # the same with and without return_stats even where a score ties with tau.
        sums = torch.where(candidates, sums, column_sums(q, k, neg_lse, b_idx, h_idx, scale,
                                                         window))
    scores, sinks = select_sinks(sums[:, None], counts, tau, first)
    scores, sinks = scores[:, 0], sinks[:, 0]

    mass = sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated.tolist(),
                           beta, scale, key_padding_mask, window)
    if not return_stats:
        return out, None
    return out, prefill_stats(scores, sinks, mass, heads, q.shape, nk)


act_attention_torch.SUPPORTS_WINDOW = True
act_attention_torch.SUPPORTS_BLOCKS = True
act_attention_torch.SUPPORTS_ATTN_MASK = True

