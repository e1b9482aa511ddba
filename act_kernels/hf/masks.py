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

No host read in the steady state. Checking a mask's values reads them on the host (a device
synchronisation, and a CUDA graph cannot hold one), and Transformers builds a new mask tensor for
every forward. So the masks are built by :func:`act_sdpa_mask` (the mask builder registered for
``act_torch`` / ``act_triton``: Transformers' ``sdpa_mask`` plus a record of what it was built
from, kept beside the mask): when its query and key offsets are host ints (dynamic caches) the
mask is ``structure AND padding[b, key]`` by construction, with the structure a function of
positions only. When the mask is built, the windows that structure agrees with are recorded:
for Transformers' causal and sliding-window functions (recognised by their code) from the
offsets alone, for any other function by evaluating it on the host (CPU tensors, no device
value) and comparing every entry, as strictly as the full check. A layer takes the mask when its
own window is one of them, with the padding rows as the key-padding mask, and reads nothing from
the device. Masks built any other way, edited in place, built with tensor offsets (static caches)
or too large to evaluate cheaply (``MAX_STRUCTURE``) get the full check.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional, Tuple

import torch

from ..tensor_cache import TensorCache, data_version


class ACTMaskError(ValueError):
    """The attention mask is not bottom-right causal + key padding; ACT cannot run it exactly."""


def refuse(reason: str):
    raise ACTMaskError(
        "act attention: unsupported attention mask: " + reason + ". ACT supports causal "
        "attention with key (left) padding, within the layer's sliding window if it has one: no "
        "chunked, bidirectional or custom 4D masks. Use attn_implementation='sdpa' or 'eager' "
        "for this model/input.")


class BuiltMask(NamedTuple):
    """What :func:`act_sdpa_mask` built a mask from, all on the host but ``padding``: the
    windows its structure agrees with (every ``W`` with ``window_lo <= W <= window_hi``;
    ``window_hi`` None: no upper bound, plain causal included), the key padding (bool
    ``[B, Lk]`` on the mask's device, or None), the first query and key positions and the
    shape ``(B, Lq, Lk)``."""

    window_lo: int
    window_hi: Optional[int]
    padding: Optional[torch.Tensor]
    q_offset: int
    kv_offset: int
    shape: Tuple[int, int, int]

    def agrees_with(self, window: Optional[int]) -> bool:
        if window is None:
            return self.window_hi is None
        return self.window_lo <= window and (self.window_hi is None or window <= self.window_hi)


# the attribute of a mask built by act_sdpa_mask that holds (its version then, BuiltMask)
_RECORD = "_act_built_from"

# largest structure (Lq x Lk per batch row) evaluated on the host for a mask function that is not
# Transformers' causal or sliding one (those need no evaluation); larger masks get the full check
MAX_STRUCTURE = 1 << 20


def act_sdpa_mask(*args, **kwargs):
    """Transformers' ``sdpa_mask``, plus a record of what the mask was built from (see the
    module docstring). Registered as the mask builder of ``act_torch`` and ``act_triton``."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is None or torch.compiler.is_compiling():     # compiled: the opaque op checks it
        return mask
    call = _signature(sdpa_mask).bind(*args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    batch, q_len, kv_len = a["batch_size"], a["q_length"], a["kv_length"]
    q_offset, kv_offset = a["q_offset"], a["kv_offset"]
    if not (type(q_offset) is int and type(kv_offset) is int):
        return mask
    max_lag = q_offset + q_len - 1 - kv_offset        # last query to first key
    try:       # Transformers' own causal and sliding functions: the windows without evaluating
        windows = _band_windows(_transformers_window(a["mask_function"]), max_lag)
    except LookupError:
        structure = _structure(a["mask_function"], batch, q_len, kv_len, q_offset, kv_offset)
        windows = None if structure is None else _causal_windows(structure, q_offset, kv_offset)
    if windows is not None:
        padding = prepare_padding_mask(a["attention_mask"], kv_len, kv_offset)
        if padding is not None:      # indexed by key position: the call's keys from kv_offset
            padding = padding[:, kv_offset:kv_offset + kv_len].to(torch.bool)
        built = BuiltMask(*windows, padding, q_offset, kv_offset, (batch, q_len, kv_len))
        setattr(mask, _RECORD, (data_version(mask), built))
    return mask


@functools.lru_cache(maxsize=4)
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _transformers_window(mask_function) -> Optional[int]:
    """None for Transformers' ``causal_mask_function``, ``W`` for its
    ``sliding_window_causal_mask_function(W)`` (recognised by their code objects, so exactly
    these functions); LookupError for any other function."""
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    if mask_function is causal_mask_function:
        return None
    parts = _closure(mask_function, and_masks(causal_mask_function)).get("mask_functions")
    if parts is not None and len(parts) == 2 and parts[1] is causal_mask_function:
        window = _closure(parts[0], sliding_window_overlay(1)).get("sliding_window")
        if type(window) is int and window >= 1:
            return window
    raise LookupError("not one of Transformers' causal mask functions")


def _closure(function, like) -> dict:
    """The closure variables of ``function`` if it runs the code of ``like``, else {}."""
    code = getattr(function, "__code__", None)
    if code is None or code is not like.__code__ or function.__closure__ is None:
        return {}
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__)))


def _band_windows(window: Optional[int], max_lag: int):
    """The ``(lo, hi)`` of the causal pattern within ``window`` on a grid whose largest lag is
    ``max_lag`` (lags form a contiguous range): a window past it does not bite."""
    if window is None or window > max_lag:
        return max(max_lag + 1, 1), None
    return window, window


def _structure(mask_function, batch: int, q_len: int, kv_len: int, q_offset: int,
               kv_offset: int) -> Optional[torch.Tensor]:
    """The mask function on the call's positions, evaluated on CPU tensors: bool
    ``[B or 1, Lq, Lk]``, or None where it is not a function of positions alone (it raises or
    answers with a tensor that is not a CPU bool tensor: it reads something else, or the grid
    is larger than ``MAX_STRUCTURE``)."""
    if q_len * kv_len > MAX_STRUCTURE:
        return None
    b = torch.arange(batch)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long)[None, :, None, None]
    q = (torch.arange(q_len) + q_offset)[None, None, :, None]
    k = (torch.arange(kv_len) + kv_offset)[None, None, None, :]
    try:
        got = mask_function(b, h, q, k)
    except Exception:       # noqa: BLE001 - any failure: not evaluable here, full check instead
        return None
    if not isinstance(got, torch.Tensor) or got.device.type != "cpu" or got.dtype != torch.bool:
        return None
    return got.expand(-1, 1, q_len, kv_len)[:, 0]


def _causal_windows(structure: torch.Tensor, q_offset: int, kv_offset: int):
    """``(lo, hi)``: the windows ``W`` for which ``structure`` (CPU, ``[B', Lq, Lk]``) is the
    causal pattern ``0 <= query pos - key pos < W`` (every ``lo <= W <= hi``; ``hi`` None: any
    larger ``W`` and no window at all), or None when it is no such pattern."""
    q_len, kv_len = structure.shape[1:]
    lag = (torch.arange(q_len)[:, None] + q_offset) - (torch.arange(kv_len)[None, :] + kv_offset)
    causal = lag >= 0
    lo = max(int(torch.where(structure, lag, -1).max()) + 1, 1)   # the longest lag seen, + 1
    if not torch.equal(structure, (causal & (lag < lo)).expand_as(structure)):
        return None
    unseen = lag[causal & (lag >= lo)]                    # lags a window of lo leaves out
    return lo, (int(unseen.min()) if unseen.numel() else None)


def built_from(mask: torch.Tensor) -> Optional[BuiltMask]:
    """The record of a mask :func:`act_sdpa_mask` built and nobody edited since, else None."""
    record = getattr(mask, _RECORD, None)
    if record is None or record[0] != data_version(mask):
        return None
    return record[1]


def _from_built(built: BuiltMask, batch: int, q_len: int, kv_len: int, window: Optional[int]):
    """``(kpm, keys_used)`` of a built mask from its record (host ints and slicing: nothing is
    read from the device), or None when the record does not show the causal pattern of the
    layer's window at bottom-right (then the full check decides)."""
    keys_used = built.q_offset + q_len - built.kv_offset     # one past the last query
    if built.shape != (batch, q_len, kv_len) or not q_len <= keys_used <= kv_len \
            or not built.agrees_with(window):
        return None
    if built.padding is None:
        return None, keys_used
    return built.padding[:, :keys_used].contiguous(), keys_used


def keys_dropped(mask: Optional[torch.Tensor]) -> Optional[bool]:
    """Did the cache drop keys before the call's first key (a sliding cache past its window)?
    From the record of a built mask (``kv_offset > 0``); None when not known on the host."""
    built = None if mask is None else built_from(mask)
    return None if built is None else built.kv_offset > 0


def mask_to_key_padding(attention_mask: Optional[torch.Tensor], batch: int, q_len: int,
                        kv_len: int, cache: Optional[TensorCache] = None,
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
    if cache is not None:    # every layer of a forward (of one window) gets the same mask
        return cache.get(attention_mask, lambda mask: _key_padding(mask, batch, q_len, kv_len,
                                                                   window),
                         (batch, q_len, kv_len, window))
    return _key_padding(attention_mask, batch, q_len, kv_len, window)


def _key_padding(mask: torch.Tensor, batch: int, q_len: int, kv_len: int,
                 window: Optional[int]):
    built = built_from(mask)
    result = None if built is None else _from_built(built, batch, q_len, kv_len, window)
    return _check_mask(mask, batch, q_len, kv_len, window) if result is None else result


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
