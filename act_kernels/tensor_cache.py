"""Values derived from a tensor's data, computed once per tensor and then reused.

Some facts about a mask need its values on the host: whether a heads mask calibrates anything,
which (batch row, head) pairs it lists, whether a key-padding mask pads anything. On a GPU,
reading them synchronises the host with the device. Those masks are the same tensors call after
call (a profile's per-layer heads mask, the key-padding mask every layer of one forward
receives), so :class:`TensorCache` computes such a value on first sight of a tensor's data and
returns it afterwards without touching the device.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class TensorCache:
    """``get(tensor, compute)``: ``compute(tensor)`` the first time, the cached value after.

    An entry is keyed by the tensor that owns the data (a view's ``_base``; held weakly, so the
    entry goes when that tensor does), the view's shape, strides, offset and device, and checked
    against the data's version counter (an in-place edit recomputes). A fresh ``expand`` or
    slice view of the same tensor therefore hits, a copy does not.
    """

    def __init__(self):
        self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tensor: torch.Tensor, compute: Callable[[torch.Tensor], T]) -> T:
        owner = tensor._base if tensor._base is not None else tensor
        key = (id(owner), tuple(tensor.shape), tensor.stride(), tensor.storage_offset(),
               tensor.device)
        version = None if tensor.is_inference() else tensor._version  # inference: no counter
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is owner and entry[1] == version:
            return entry[2]
        value = compute(tensor)
        entries = self._entries
        ref = weakref.ref(owner, lambda _, key=key: entries.pop(key, None))
        entries[key] = (ref, version, value)
        return value
