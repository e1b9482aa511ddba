"""The masks Transformers passes, checked and turned into the op's arguments.

The op can express bottom-right causal attention plus key (left) padding, optionally within a
sliding window, optionally followed by a static cache's unfilled slots.
:func:`mask_to_key_padding` checks that a mask is exactly that (for the layer's window) and
returns the key-padding mask and how many keys are used; every other mask (chunked or
bidirectional attention, a window other than the layer's, a custom 4D mask) raises
:class:`ACTMaskError` rather than being computed wrongly.

With a window, a cached key (one before the call's queries) that no row sees may be padding or
lie before every row's window; the mask cannot tell them apart. Such keys before the earliest
real row's window are taken as real (Transformers' sliding caches keep no such keys, so this
only matters for hand-built masks); every other key that no row sees is padding.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch


class ACTMaskError(ValueError):
    """The attention mask is not bottom-right causal + key padding; ACT cannot run it exactly."""


def refuse(reason: str):
    raise ACTMaskError(
        "act attention: unsupported attention mask: " + reason + ". ACT supports causal "
        "attention with key (left) padding, within the layer's sliding window if it has one: no "
        "chunked, bidirectional or custom 4D masks. Use attn_implementation='sdpa' or 'eager' "
        "for this model/input.")


class MaskCheckCache:
    """One-entry memo of the last checked mask, by identity and version: every layer of a
    forward receives the same mask tensor, so it is checked once per forward. One per model
    (held by its :class:`~act_kernels.hf.state.ACTModelState`)."""

    def __init__(self):
        self._entry = None

    def get(self, mask: torch.Tensor, shape):
        entry = self._entry
        if entry is None:
            return None
        ref, version, cached_shape, result = entry
        if ref() is mask and version == mask._version and cached_shape == shape:
            return result
        return None

    def put(self, mask: torch.Tensor, shape, result) -> None:
        try:
            self._entry = (weakref.ref(mask), mask._version, shape, result)
        except TypeError:
            self._entry = None


def mask_to_key_padding(attention_mask: Optional[torch.Tensor], batch: int, q_len: int,
                        kv_len: int, cache: Optional[MaskCheckCache] = None,
                        window: Optional[int] = None) -> Tuple[Optional[torch.Tensor], int]:
    """Turn the mask Transformers passes into ``(key_padding_mask or None, keys_used)``.

    ``keys_used <= kv_len`` is how many leading keys the queries can see: a static cache has
    unfilled slots at the end, which are cut off k/v before the op is called. The queries are
    then the last ``q_len`` of ``keys_used`` positions (bottom-right causal).

    ``attention_mask`` is ``None`` (no padding; with ``q_len > 1`` and ``kv_len > q_len`` that is
    the prefill of an empty static cache, top-left aligned, as in Transformers' sdpa path) or a
    boolean (True = attend) / additive float (0 or -inf/min) ``[B or 1, 1, q_len, kv_len]`` mask.
    ``window``: the layer's sliding window ``W`` (row ``p`` sees ``p - W < j <= p``), ``None``
    for full attention. Raises :class:`ACTMaskError` for any other mask. Rows of padded
    queries may see nothing or (Transformers' convention) the real keys before them: their
    outputs are never read, and ACT counts them for nothing.
    """
    if attention_mask is None:
        if q_len == 1 or q_len == kv_len:
            return None, kv_len
        return None, q_len
    if not isinstance(attention_mask, torch.Tensor):
        refuse(f"got a {type(attention_mask).__name__} (only tensors or None are supported)")
    shape = (batch, q_len, kv_len, window)
    if cache is not None:
        hit = cache.get(attention_mask, shape)
        if hit is not None:
            return hit
    result = _check_mask(attention_mask, batch, q_len, kv_len, window)
    if cache is not None:
        cache.put(attention_mask, shape, result)
    return result


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B or 1, Lq, Lk]``: True where the mask lets a query see a key."""
    if mask.dtype == torch.bool:
        return mask[:, 0]
    if mask.is_floating_point():
        allowed = mask[:, 0] == 0
        blocked = mask[:, 0] <= torch.finfo(mask.dtype).min / 2
        if not bool((allowed | blocked).all()):
            refuse("the float mask holds values other than 0 and -inf (an additive bias)")
        return allowed
    refuse(f"mask dtype {mask.dtype} (expected bool or float)")


def _check_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int,
                window: Optional[int] = None):
    if mask.dim() != 4:
        refuse(f"expected a 4D mask [B, 1, Lq, Lk], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] != q_len \
            or mask.shape[3] != kv_len:
        refuse(f"expected shape [{batch}, 1, {q_len}, {kv_len}], got {tuple(mask.shape)}")
    allowed = _allowed(mask).expand(batch, q_len, kv_len)
    device = allowed.device

    seen = allowed.any(dim=1)                                   # [B, Lk]: key seen by some row
    row_any = allowed.any(dim=-1)                               # [B, Lq]
    if not bool(row_any.any()):
        refuse("no query may attend to any key")
    # Query row i sits at position base + i and sees no key after it: base >= last_seen_i - i,
    # with equality for every real row (it sees itself). Keys past base + Lq are a static
    # cache's unfilled slots.
    last_seen = (kv_len - 1) - allowed.flip(-1).to(torch.uint8).argmax(dim=-1)   # [B, Lq]
    offsets = last_seen - torch.arange(q_len, device=device)
    base = max(int(torch.where(row_any, offsets, -1).amax()), 0)
    keys_used = base + q_len
    if keys_used > kv_len:
        refuse(f"query row {q_len - 1} sees no key at its own position")
    cols = torch.arange(kv_len, device=device)
    if keys_used < kv_len and bool(allowed[:, :, keys_used:].any()):
        refuse("a query sees a key after its own position")
    rows = torch.arange(keys_used - q_len, keys_used, device=device)
    causal = cols[None, :keys_used] <= rows[:, None]            # [Lq, Nk] bottom-right
    kpm = seen[:, :keys_used]                                   # [B, Nk] True = real token
    if window is not None:
        causal = causal & (cols[None, :keys_used] > rows[:, None] - window)
        # cached keys (before the queries) that lie before the earliest real row's window are
        # unseen because of the window, and taken as real (see the module's docstring); a key
        # at a query position is real exactly when its own row sees something
        first_row = torch.where(row_any, torch.arange(q_len, device=device), q_len).amin(-1)
        edge = torch.clamp(first_row - window + 1, max=0) + keys_used - q_len   # [B]
        kpm = kpm | (cols[None, :keys_used] < edge[:, None])
    expected = causal[None] & kpm[:, None, :]                   # [B, Lq, Nk]
    got = allowed[:, :, :keys_used]
    rows_equal = (got == expected).all(dim=-1)                  # [B, Lq]
    query_real = kpm[:, keys_used - q_len:]
    rows_ok = torch.where(query_real, rows_equal, rows_equal | ~got.any(dim=-1))
    if not bool(rows_ok.all()):
        b, i = [int(x) for x in (~rows_ok).nonzero()[0]]
        what = "causal attention" if window is None else f"sliding-window ({window}) attention"
        refuse(f"query row {i} of batch row {b} is not {what} over the real keys (a window "
               "other than the layer's, chunked/bidirectional attention or a custom mask?)")
    if bool(kpm.all()):
        return None, keys_used
    return kpm.contiguous(), keys_used
