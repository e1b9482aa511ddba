"""Values derived from a tensor's data, computed once per tensor and then reused.

Some facts about a mask need its values on the host: whether a heads mask calibrates anything,
which (batch row, head) pairs it lists, whether a key-padding mask pads anything, what an
attention mask means. On a GPU, reading them synchronises the host with the device. Those masks
are the same tensors call after call (a profile's per-layer heads mask, the attention mask every
layer of one forward receives), so :class:`TensorCache` computes such a value on first sight of
a tensor's data and returns it afterwards without touching the device. It is the one cache by
tensor identity and version in the package: the op, the Triton backend and the Transformers
integration all use it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


def data_version(tensor: torch.Tensor) -> Optional[int]:
    """The version counter of ``tensor``'s data (an in-place edit bumps it); ``None`` for an
    inference tensor, which has none (its in-place edits inside ``torch.inference_mode`` are not
    seen)."""
    return None if tensor.is_inference() else tensor._version


def data_owner(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``tensor``'s data: itself, or the base of a view."""
    return tensor if tensor._base is None else tensor._base


def _view_key(tensor: torch.Tensor, owner: torch.Tensor) -> tuple:
    # the owner's identity fixes the storage and so the device
    return id(owner), tensor.shape, tensor.stride(), tensor.storage_offset()


class TensorCache:
    """``get(tensor, compute, extra=None)``: ``compute(tensor)`` the first time, the cached
    value after.

    An entry is keyed by the tensor that owns the data (a view's ``_base``; held weakly, so the
    entry goes when that tensor does), the view's shape, strides, offset and device, and
    ``extra`` (any hashable, e.g. the call's shape), and checked against the data's version
    counter (an in-place edit recomputes). A fresh ``expand`` or slice view of the same tensor
    therefore hits, a copy does not. ``tensor`` may also be a tuple of tensors (``None`` allowed
    in it): the entry then depends on all of them.

    With ``views=False`` an entry is keyed by the tensor object itself (held weakly): a fresh
    view misses, and a lookup costs a third as much (for a per-call cache on the op's hot path).

    The cached value must not hold a reference to the tensor (a view of it included), or the
    entry would keep the tensor alive; callers store a marker instead (see ``op._steady_heads``).
    """

    def __init__(self, views: bool = True):
        self._entries = {}
        self._views = views

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, tensor, compute: Callable[..., T], extra=None) -> T:
        if type(tensor) is tuple:
            return self._get_many(tensor, compute, extra)
        # data_owner, _view_key and data_version written out: this runs on every steady call
        if self._views:
            owner = tensor if tensor._base is None else tensor._base
            key = (id(owner), tensor.shape, tensor.stride(), tensor.storage_offset(), extra)
        else:
            owner, key = tensor, (id(tensor), extra)
        version = None if tensor.is_inference() else tensor._version
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is owner and entry[1] == version:
            return entry[2]
        value = compute(tensor)
        self._put(key, (owner,), version, value, single=True)
        return value

    def _get_many(self, tensors: tuple, compute, extra):
        owners = tuple(None if t is None else data_owner(t) for t in tensors)
        key = tuple(None if t is None else _view_key(t, o) for t, o in zip(tensors, owners)) \
            + (extra,)
        version = tuple(None if t is None else data_version(t) for t in tensors)
        entry = self._entries.get(key)
        if entry is not None and entry[1] == version \
                and all(o is None or r() is o for r, o in zip(entry[0], owners)):
            return entry[2]
        value = compute(tensors)
        self._put(key, owners, version, value, single=False)
        return value

    def _put(self, key, owners: tuple, version, value, single: bool) -> None:
        entries = self._entries
        drop = lambda _, key=key: entries.pop(key, None)  # noqa: E731
        try:
            refs = tuple(None if o is None else weakref.ref(o, drop) for o in owners)
        except TypeError:          # a tensor subclass without weak references: not cached
            return
        entries[key] = (refs[0] if single else refs, version, value)
