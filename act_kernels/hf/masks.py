"""The masks Transformers passes, checked and turned into the op's arguments.

The op takes bottom-right causal attention plus key (left) padding, optionally within a sliding
window, optionally restricted to packed sequences (``segment_ids``) and with bidirectional
blocks (``block_ids``, image tokens), and any other boolean visibility as a dense ``attn_mask``
(an exact path, slower). :func:`mask_plan` turns a mask into a :class:`MaskPlan`: the
structured arguments where the mask is such a structure, keys cut to those the queries can see
(a static cache's unfilled slots), or the dense path for every other boolean (or 0 / -inf)
mask (the attention function warns once per model that it is the slower path). Refused with
:class:`ACTMaskError`: additive float masks that are a bias (values other than 0 and -inf),
masks per head, all-False masks, wrong shapes.

With a window, a cached key (one before the call's queries) that no row sees may be padding or
lie before every row's window; the mask cannot tell them apart. Such keys before the earliest
real row's window are taken as real (Transformers' sliding caches keep no such keys, so this
only matters for hand-built masks); every other key that no row sees is padding.

No host read in the steady state. Checking a mask's values reads them on the host (a device
synchronisation, and a CUDA graph cannot hold one), and Transformers builds a new mask tensor for
every forward. So the masks are built by :func:`act_sdpa_mask` (the mask builder registered for
``act_torch`` / ``act_triton``: Transformers' ``sdpa_mask`` plus a record of what it was built
from, kept beside the mask): when its query and key offsets are host ints (dynamic caches) the
mask is ``structure AND padding[b, key]`` by construction. Transformers' own causal, sliding,
packed-sequence and image-block functions are recognised from their construction
(:mod:`.mask_functions`: no evaluation, the segment and block ids kept as the tensors they are;
one host read per mask build only where Gemma 3's sliding layers window an image block and the
window bites, to check that no block is longer than the window);
any other function is evaluated on the host (CPU tensors, no device value) when small
(``MAX_STRUCTURE``) and compared, as strictly as the full check, with the causal pattern. A layer
takes a recorded structure when its own window agrees with it and reads nothing from the device.
Masks built any other way, edited in place, built with tensor offsets (static caches) or not
recognised get the full check, which reads the mask; what fails it goes to the dense path.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from ..tensor_cache import TensorCache, data_version
from .mask_functions import read_structure


class ACTMaskError(ValueError):
    """The attention mask is one ACT cannot run exactly (an additive bias, a mask per head...)."""


def refuse(reason: str):
    raise ACTMaskError(
        "act attention: unsupported attention mask: " + reason + ". ACT takes boolean masks "
        "(or additive masks of 0 and -inf only), one for all heads: causal attention with "
        "padding, sliding windows, packed sequences and image blocks on the fast path, any other "
        "pattern on the slower dense path. Use attn_implementation='sdpa' or 'eager' for this "
        "model/input.")


class DensePathWarning(UserWarning):
    """A mask went to the op's exact dense (``attn_mask``) path, slower than the structured
    ones."""


def warn_dense(what: str) -> None:
    """Warn that a mask takes the dense path, naming what it does (the attention function warns
    once per model: ``ACTModelState.dense_warned``)."""
    warnings.warn(
        f"act attention: this attention mask is not causal attention with padding, a sliding "
        f"window, packed sequences or image blocks ({what}); it goes to the op as a dense "
        "attn_mask, the exact but slower path (time O(Nq x Nk) per head). Shown once per "
        "model.", DensePathWarning, stacklevel=3)


class MaskPlan(NamedTuple):
    """What the op receives for a mask: ``key_padding`` (bool ``[B, keys_used]`` or None), how
    many leading keys the queries can see, ``segment_ids`` / ``block_ids`` (long
    ``[B, keys_used]`` or None), and ``dense``: None on the structured paths, else what the mask
    does (it then goes to the op as ``attn_mask``, with ``keys_used`` every key)."""

    key_padding: Optional[torch.Tensor]
    keys_used: int
    segment_ids: Optional[torch.Tensor] = None
    block_ids: Optional[torch.Tensor] = None
    dense: Optional[str] = None


class BuiltMask(NamedTuple):
    """What :func:`act_sdpa_mask` built a mask from, all on the host but the tensors: the
    windows its causal part agrees with (every ``W`` with ``window_lo <= W <= window_hi``;
    ``window_hi`` None: no upper bound, plain causal included; ``window_lo`` None: no structure
    known, the full check decides), the key padding (bool ``[B, Lk]`` on the mask's device, or
    None), the first query and key positions, the shape ``(B, Lq, Lk)``, and the packed-sequence
    and image-block ids of the call's keys (long ``[B, Lk]``, or None)."""

    window_lo: Optional[int]
    window_hi: Optional[int]
    padding: Optional[torch.Tensor]
    q_offset: int
    kv_offset: int
    shape: Tuple[int, int, int]
    segments: Optional[torch.Tensor] = None
    blocks: Optional[torch.Tensor] = None

    def agrees_with(self, window: Optional[int]) -> bool:
        if self.window_lo is None:
            return False
        if window is None:
            return self.window_hi is None
        return self.window_lo <= window and (self.window_hi is None or window <= self.window_hi)


# the attribute of a mask built by act_sdpa_mask that holds (its version then, BuiltMask)
_RECORD = "_act_built_from"

# largest structure (Lq x Lk per batch row) evaluated on the host for a mask function that is not
# one of Transformers' own (those need no evaluation); larger masks get the full check
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
    if type(kv_offset) is not int:
        return mask
    padding = prepare_padding_mask(a["attention_mask"], kv_len, kv_offset)
    if padding is not None:      # indexed by key position: the call's keys from kv_offset
        padding = padding[:, kv_offset:kv_offset + kv_len].to(torch.bool)
    built = None
    if type(q_offset) is int:
        built = _record(a["mask_function"], padding, batch, q_len, kv_len, q_offset, kv_offset)
    if built is None:            # no structure known: its padding for the dense path
        built = BuiltMask(None, None, padding, q_offset, kv_offset, (batch, q_len, kv_len))
    setattr(mask, _RECORD, (data_version(mask), built))
    return mask


@functools.lru_cache(maxsize=4)
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _record(mask_function, padding, batch: int, q_len: int, kv_len: int, q_offset: int,
            kv_offset: int) -> Optional[BuiltMask]:
    """The record of a mask built with host offsets, or None when no structure is known."""
    max_lag = q_offset + q_len - 1 - kv_offset        # last query to first key
    facts = (padding, q_offset, kv_offset, (batch, q_len, kv_len))
    try:       # Transformers' own functions: read from their construction, not evaluated
        structure = read_structure(mask_function)
    except LookupError:
        evaluated = _structure(mask_function, batch, q_len, kv_len, q_offset, kv_offset)
        windows = None if evaluated is None else _causal_windows(evaluated, q_offset, kv_offset)
        return None if windows is None else BuiltMask(*windows, *facts)
    segments = _key_ids(structure.segments, batch, kv_len, kv_offset)
    blocks = _key_ids(structure.blocks, batch, kv_len, kv_offset)
    if (segments is None) != (structure.segments is None) or \
            (blocks is None) != (structure.blocks is None):
        return None
    if structure.blocks_windowed and structure.window <= max_lag \
            and _longest_block(blocks) > structure.window:
        # the window also hides block keys more than W before a row: not the op's blocks
        return None
    return BuiltMask(*_band_windows(structure.window, max_lag), *facts, segments, blocks)


def _key_ids(ids: Optional[torch.Tensor], batch: int, kv_len: int, kv_offset: int):
    """Ids by absolute position -> long ``[B, Lk]`` of the call's keys (None if the shape does
    not fit)."""
    if ids is None or ids.shape[0] not in (1, batch) or ids.shape[1] < kv_offset + kv_len:
        return None
    return ids[:, kv_offset:kv_offset + kv_len].to(torch.long).expand(batch, kv_len).contiguous()


def _longest_block(blocks: torch.Tensor) -> int:
    """The most keys one block id holds in a batch row (one host read)."""
    counts = torch.zeros(blocks.shape[0], blocks.shape[1] + 1, dtype=torch.long,
                         device=blocks.device)
    counts.scatter_add_(1, (blocks + 1).clamp(min=0), torch.ones_like(blocks))
    return int(counts[:, 1:].max()) if blocks.shape[1] else 0


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


def _from_built(built: BuiltMask, batch: int, q_len: int, kv_len: int,
                window: Optional[int]) -> Optional[MaskPlan]:
    """The plan of a built mask from its record (host ints and slicing: nothing is read from
    the device), or None when the record does not show a structure the layer's window agrees
    with, at bottom-right (then the full check decides)."""
    keys_used = built.q_offset + q_len - built.kv_offset     # one past the last query
    if not built.agrees_with(window) or built.shape != (batch, q_len, kv_len) \
            or not q_len <= keys_used <= kv_len:
        return None
    cut = [None if t is None else t[:, :keys_used]
           for t in (built.padding, built.segments, built.blocks)]
    if cut[0] is not None:
        cut[0] = cut[0].contiguous()
    return MaskPlan(cut[0], keys_used, cut[1], cut[2])


def keys_dropped(mask: Optional[torch.Tensor]) -> Optional[bool]:
    """Did the cache drop keys before the call's first key (a sliding cache past its window)?
    From the record of a built mask (``kv_offset > 0``); None when not known on the host."""
    built = None if mask is None else built_from(mask)
    return None if built is None or built.window_lo is None else built.kv_offset > 0


def mask_plan(attention_mask: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int,
              cache: Optional[TensorCache] = None, window: Optional[int] = None) -> MaskPlan:
    """The :class:`MaskPlan` of the mask Transformers passes to a layer of window ``window``
    (``W``: row ``p`` sees ``p - W < j <= p``; None: full attention).

    ``attention_mask`` is ``None`` (no padding; with ``q_len > 1`` and ``kv_len > q_len`` that is
    the prefill of an empty static cache, top-left aligned, as in Transformers' sdpa path) or a
    boolean (True = attend) / additive float (0 or -inf/min) ``[B or 1, 1, q_len, kv_len]`` mask.
    On the structured paths the queries are the last ``q_len`` of ``keys_used`` positions
    (bottom-right causal): a static cache's unfilled slots are cut off k/v before the op is
    called. Rows of padded queries may see nothing or (Transformers' convention) the real keys
    before them: their outputs are never read, and ACT counts them for nothing.
    :func:`dense_mask` gives the ``attn_mask`` of a dense plan. Raises :class:`ACTMaskError` for
    the masks no path takes.
    """
    return _plan_of(attention_mask, batch, q_len, kv_len, cache, window)


def _plan_of(attention_mask, batch: int, q_len: int, kv_len: int, cache, window) -> MaskPlan:
    if attention_mask is None:
        if q_len == 1 or q_len == kv_len:
            return MaskPlan(None, kv_len)
        return MaskPlan(None, q_len)
    if not isinstance(attention_mask, torch.Tensor):
        refuse(f"got a {type(attention_mask).__name__} (only tensors or None are supported)")
    if cache is None:
        return _plan(attention_mask, batch, q_len, kv_len, window)
    # every layer of a forward (of one window) gets the same mask: checked once per forward
    return cache.get(attention_mask, lambda mask: _plan(mask, batch, q_len, kv_len, window),
                     (batch, q_len, kv_len, window))


def dense_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The op's ``attn_mask`` of a mask on the dense path: bool ``[B or 1, Nq, Nk]``."""
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, 0]
    return attention_mask[:, 0] == 0


def mask_to_key_padding(attention_mask: Optional[torch.Tensor], batch: int, q_len: int,
                        kv_len: int, cache: Optional[TensorCache] = None,
                        window: Optional[int] = None) -> Tuple[Optional[torch.Tensor], int]:
    """``(key_padding_mask or None, keys_used)`` of a mask that is causal attention (within
    ``window``) with key padding, as :func:`mask_plan` reads it; :class:`ACTMaskError` for any
    other mask (packed sequences, image blocks and the dense path included)."""
    plan = _plan_of(attention_mask, batch, q_len, kv_len, cache, window)
    if plan.dense is not None:
        refuse(plan.dense)
    if plan.segment_ids is not None or plan.block_ids is not None:
        refuse("packed sequences or bidirectional image blocks (use mask_plan)")
    return plan.key_padding, plan.keys_used


def _plan(mask: torch.Tensor, batch: int, q_len: int, kv_len: int,
          window: Optional[int]) -> MaskPlan:
    built = built_from(mask)
    plan = None if built is None else _from_built(built, batch, q_len, kv_len, window)
    if plan is not None:
        return plan
    try:
        return MaskPlan(*_check_mask(mask, batch, q_len, kv_len, window))
    except _NotStructured as error:
        padding = None if built is None else built.padding
        return MaskPlan(padding, kv_len, dense=str(error))


class _NotStructured(Exception):
    """The mask is a valid visibility but not causal attention with padding (its text: what
    it does instead)."""


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B or 1, Lq, Lk]``: True where the mask lets a query see a key."""
    if mask.dtype == torch.bool:
        return mask[:, 0]
    if mask.is_floating_point():
        allowed = mask[:, 0] == 0
        blocked = mask[:, 0] <= torch.finfo(mask.dtype).min / 2
        other = ~(allowed | blocked)
        if bool(other.any()):
            b, i, j = [int(x) for x in other.nonzero()[0]]
            refuse(f"the float mask adds a bias to the scores (e.g. {float(mask[b, 0, i, j]):g} "
                   f"for query row {i}, key {j} of batch row {b}), not only 0 (attend) and -inf "
                   "(hide); ACT's calibration is defined on plain softmax attention")
        return allowed
    refuse(f"mask dtype {mask.dtype} (expected bool or float)")


def _check_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int,
                window: Optional[int] = None):
    """The full check: ``(kpm or None, keys_used)`` of a mask that is causal attention (within
    ``window``) plus key padding; :class:`_NotStructured` (what it does instead) for another
    valid mask, :class:`ACTMaskError` for one no path takes. Reads the mask on the host."""
    if mask.dim() != 4:
        refuse(f"expected a 4D mask [B, 1, Lq, Lk], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch) or mask.shape[2] != q_len or mask.shape[3] != kv_len:
        refuse(f"expected shape [{batch}, 1, {q_len}, {kv_len}], got {tuple(mask.shape)}")
    if mask.shape[1] != 1:
        refuse(f"a mask per head (shape {tuple(mask.shape)}): ACT takes one mask for all heads")
    allowed = _allowed(mask).expand(batch, q_len, kv_len)
    device = allowed.device

    seen = allowed.any(dim=1)                                   # [B, Lk]: key seen by some row
    row_any = allowed.any(dim=-1)                               # [B, Lq]
    if not bool(row_any.any()):
        refuse("no query may attend to any key (an all-False mask: inverted?)")
    # Query row i sits at position base + i and sees no key after it: base >= last_seen_i - i,
    # with equality for every real row (it sees itself). Keys past base + Lq are a static
    # cache's unfilled slots.
    last_seen = (kv_len - 1) - allowed.flip(-1).to(torch.uint8).argmax(dim=-1)   # [B, Lq]
    offsets = last_seen - torch.arange(q_len, device=device)
    base = max(int(torch.where(row_any, offsets, -1).amax()), 0)
    keys_used = base + q_len
    if keys_used > kv_len:       # some row sees a key after its bottom-right position
        late = torch.where(row_any, offsets, -1) > kv_len - q_len
        b, i = [int(x) for x in late.nonzero()[0]]
        raise _NotStructured(
            f"query row {i} of batch row {b} sees key {int(last_seen[b, i])}, after its own "
            f"position {kv_len - q_len + i}: bidirectional or non-causal attention")
    cols = torch.arange(kv_len, device=device)
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
        j = int((got[b, i] != expected[b, i]).nonzero()[0])
        what = "causal attention" if window is None else f"sliding-window ({window}) attention"
        does = "sees" if bool(got[b, i, j]) else "does not see"
        raise _NotStructured(
            f"query row {i} of batch row {b} is not {what} over the real keys: at position "
            f"{keys_used - q_len + i} it {does} key {j} (a window other than the layer's, "
            "chunked, bidirectional or custom attention)")
    if bool(kpm.all()):
        return None, keys_used
    return kpm.contiguous(), keys_used
