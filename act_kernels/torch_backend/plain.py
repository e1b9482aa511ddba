"""Pass 1, the plain pass: ``out`` and the row log-sum-exp of every head.

On the CPU one fused SDPA call (``_scaled_dot_product_flash_attention_for_cpu``) gives both; on
other devices, and for float64, :func:`_plain_blocked` computes them by blocks of rows. Within a
window the pass goes block by block over the span of keys each block sees (``O(Nq W)``).
"""
from __future__ import annotations

import torch

from .blocks import block_rows, key_span, work_dtype


def visibility_bias(nq: int, nk: int, key_padding_mask, dtype, device,
                    window=None) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, Nq, Nk]``: 0 where row i sees key j, -inf elsewhere."""
    rows = torch.arange(nk - nq, nk, device=device)[:, None]
    cols = torch.arange(nk, device=device)[None, :]
    sees = cols <= rows
    if window is not None:
        sees = sees & (cols > rows - window)
    sees = sees[None]
    if key_padding_mask is not None:
        sees = sees & key_padding_mask[:, None, :] & key_padding_mask[:, nk - nq:, None]
    bias = torch.zeros(sees.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~sees, float("-inf"))[:, None]


def _plain_blocked(q, k, v, scale, key_padding_mask, window=None):
    """Exact plain attention with its log-sum-exp by blocks of rows, on any device."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = work_dtype(q.dtype)
    out = torch.empty(bsz, hq, nq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=work, device=q.device)
    qg = q.reshape(bsz, hkv, group, nq, dim)
    rows = block_rows(nk)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1
        bias = visibility_bias(r1 - r0, kend, None if key_padding_mask is None
                               else key_padding_mask[:, :kend], work, q.device, window)
        s = torch.matmul(qg[:, :, :, r0:r1].to(work), k[:, :, None, :kend].transpose(-1, -2).to(work))
        s = s * scale + bias[:, :, None]
        block_lse = torch.logsumexp(s, dim=-1)
        alive = torch.isfinite(block_lse)
        p = torch.exp(s - torch.where(alive, block_lse, torch.zeros_like(block_lse))[..., None])
        o = torch.matmul(p, v[:, :, None, :kend].to(work))
        out[:, :, r0:r1] = o.reshape(bsz, hq, r1 - r0, dim).to(q.dtype)
        lse[:, :, r0:r1] = torch.where(alive, block_lse, torch.zeros_like(block_lse)).reshape(
            bsz, hq, r1 - r0)
    return out, lse


def plain_attention(q, k, v, scale, key_padding_mask, window=None):
    """``(out [B, Hq, Nq, D], lse [B, Hq, Nq] float32)``, bottom-right causal (within
    ``window`` when given), GQA unrepeated.

    Rows that see no key (padded queries) give 0 output and 0 lse.
    """
    if window is not None and window < k.shape[2]:
        return _windowed_plain(q, k, v, scale, key_padding_mask, window)
    return _plain_in_one(q, k, v, scale, key_padding_mask, window)


def _plain_in_one(q, k, v, scale, key_padding_mask, window=None):
    """:func:`plain_attention` of every row over every key (the band, if any, as a mask)."""
    nq, nk = q.shape[2], k.shape[2]
    if q.device.type == "cpu" and q.dtype != torch.float64:
        causal = key_padding_mask is None and nq == nk and window is None
        bias = None if causal else visibility_bias(nq, nk, key_padding_mask, q.dtype, q.device,
                                                   window)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _plain_blocked(q, k, v, scale, key_padding_mask, window)


# Rows of one block of the windowed plain pass (see window_blocks).
WINDOW_BLOCK_ROWS = 256


def window_blocks(nq: int, nk: int, window: int):
    """``(r0, r1, lo, hi)``: blocks of query rows and the key span ``[lo, hi)`` they see.

    A block of ``R`` rows computes ``R (R + W - 1)`` entries for about ``R W`` visible ones, but
    the fused CPU kernel runs short queries in small, slower tiles: ``R = 256`` (at most ``W``,
    at least 64) measured best at W = 512 (``csrc_notes/act_passes.md``)."""
    rows = max(64, min(WINDOW_BLOCK_ROWS, window))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        yield (r0, r1) + key_span(nk - nq + r0, nk - nq + r1 - 1, window)


def _windowed_plain(q, k, v, scale, key_padding_mask, window):
    """:func:`plain_attention` within a window, block by block: a block's rows are the last rows
    of its span of keys, so the span is a bottom-right call with the band as its mask. Without
    padding the fused kernel takes one band built for a full block, sliced for the others."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    out = torch.empty(bsz, hq, nq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=work_dtype(q.dtype), device=q.device)
    shared_band = key_padding_mask is None and q.device.type == "cpu" and q.dtype != torch.float64
    band = None
    for r0, r1, lo, hi in window_blocks(nq, nk, window):
        if not shared_band:
            o, l = _plain_in_one(q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], scale,
                                 None if key_padding_mask is None
                                 else key_padding_mask[:, lo:hi], window)
            out[:, :, r0:r1], lse[:, :, r0:r1] = o, l
            continue
        if band is None:     # rows of a full block see columns [i, i + W - 1] of its span
            rows = r1 - r0
            band = visibility_bias(rows, rows + window - 1, None, q.dtype, q.device, window)
        cut = lo - (nk - nq + r0 - window + 1)        # columns cut off at position 0
        bias = band[..., :r1 - r0, cut:window - 1 + r1 - r0]
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, r0:r1], k[:, :, lo:hi], v[:, :, lo:hi], 0.0, False, attn_mask=bias,
            scale=scale)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, l
    return out, lse

