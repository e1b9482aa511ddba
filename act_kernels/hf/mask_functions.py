"""Transformers' own mask functions, read from how they were built.

Transformers describes every mask by a function of ``(batch, head, query position, key
position)``, composed from a few factories in ``transformers.masking_utils``. A function made by
one of those factories runs that factory's inner code object with the factory's arguments in its
closure, so the composition can be read back without evaluating anything:

* ``causal_mask_function``: causal attention;
* ``and_masks(sliding_window_overlay(W), causal_mask_function)``
  (``sliding_window_causal_mask_function(W)``): causal within a window of ``W``;
* ``or_masks(<causal>, blockwise_overlay(block_sequence_ids))``: bidirectional blocks inside a
  causal mask (Gemma 3's image tokens, ``create_causal_mask(block_sequence_ids=...)``); the
  blocks are read by absolute position;
* ``and_masks(<causal with blocks>, sliding_window_overlay(W))``: Gemma 3's sliding layers with
  images, where the window limits the block keys as well (``create_masks_for_vision_model``);
* ``and_masks(packed_sequence_mask_function(ids), remap_positions_for_packed_sequence(<causal>,
  position_ids))`` (``packed_sequence_compatibility_function``): packed sequences, built when
  the position ids restart inside a row and there is neither a cache nor a 2-D mask. ``ids``
  come from ``find_packed_sequence_indices``: non-decreasing along the row, a new sequence where
  the position does not grow by one, so within a sequence the remapped positions differ as the
  indices do and the causal rule (and a window) reads the same.

:func:`read_structure` answers with a :class:`Structure` or raises LookupError for any other
function (a user's function, chunked attention, a bidirectional layer, the blocks of a packed
sliding layer, which Transformers reads at the remapped positions). Only Python attributes are
read: no tensor value, so no device synchronisation.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch


class Structure(NamedTuple):
    """What a recognised mask function computes: causal attention (within ``window`` if not
    None), restricted to the packed sequences of ``segments`` if not None (ids by position,
    ``[B', L]``), plus the bidirectional blocks of ``blocks`` if not None (``[B', L]``, by
    absolute position, negative = no block). ``blocks_windowed``: the window also limits the
    block keys (a row sees a key of its block only within the window)."""

    window: Optional[int] = None
    segments: Optional[torch.Tensor] = None
    blocks: Optional[torch.Tensor] = None
    blocks_windowed: bool = False


@functools.lru_cache(maxsize=1)
def _codes() -> dict:
    """The inner code objects of Transformers' mask factories, by name."""
    from transformers import masking_utils as mu

    probe = torch.zeros(1, 1, dtype=torch.long)
    return {
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "or": mu.or_masks(mu.causal_mask_function).__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
        "blocks": mu.blockwise_overlay(probe).__code__,
        "packed": mu.packed_sequence_mask_function(probe).__code__,
        "remap": mu.remap_positions_for_packed_sequence(mu.causal_mask_function,
                                                        probe).__code__,
    }


def _closure(function, kind: str) -> Optional[dict]:
    """The closure variables of ``function`` if it runs the code of factory ``kind``, else None."""
    code = getattr(function, "__code__", None)
    if code is None or code is not _codes()[kind] or function.__closure__ is None:
        return None
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__)))


def _window_of(function) -> Optional[int]:
    """``W`` of a ``sliding_window_overlay(W)``, else None."""
    cells = _closure(function, "sliding")
    window = None if cells is None else cells.get("sliding_window")
    return window if type(window) is int and window >= 1 else None


def _ids(cells: Optional[dict], name: str) -> Optional[torch.Tensor]:
    ids = None if cells is None else cells.get(name)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() \
            and ids.dtype != torch.bool:
        return ids
    return None


def read_structure(mask_function) -> Structure:
    """The :class:`Structure` of one of Transformers' mask functions (see the module's
    docstring); LookupError for any other function."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is causal_mask_function:
        return Structure()
    parts = _closure(mask_function, "and")
    if parts is not None:
        return _read_and(tuple(parts.get("mask_functions", ())))
    parts = _closure(mask_function, "or")
    if parts is not None:
        return _read_or(tuple(parts.get("mask_functions", ())))
    raise LookupError("not one of Transformers' causal mask functions")


def _read_and(parts: tuple) -> Structure:
    if len(parts) == 1:
        return read_structure(parts[0])
    if len(parts) == 2:
        first, second = parts
        window = _window_of(first)                  # sliding_window_causal_mask_function(W)
        if window is not None:
            inner = read_structure(second)
            if inner.window is None and inner.segments is None and inner.blocks is None:
                return Structure(window=window)
        window = _window_of(second)                 # Gemma 3's sliding layers with images
        if window is not None:
            inner = read_structure(first)
            if inner.window is None:
                return inner._replace(window=window, blocks_windowed=inner.blocks is not None)
        segments = _ids(_closure(first, "packed"), "packed_sequence_mask")
        remap = _closure(second, "remap")
        if segments is not None and remap is not None:    # packed sequences
            inner = read_structure(remap.get("mask_function"))
            if inner.segments is None and inner.blocks is None:
                return inner._replace(segments=segments)
    raise LookupError("an intersection of mask functions ACT does not know")


def _read_or(parts: tuple) -> Structure:
    if len(parts) == 1:
        return read_structure(parts[0])
    if len(parts) == 2:
        blocks = _ids(_closure(parts[1], "blocks"), "block_sequence_ids")
        if blocks is not None:
            inner = read_structure(parts[0])
            if inner.blocks is None:
                return inner._replace(blocks=blocks)
    raise LookupError("a union of mask functions ACT does not know")
