"""``TensorCache``, the one cache by tensor identity and version (the op's masks, the Triton
backend's pairs, the Transformers integration's checked attention masks)."""
from __future__ import annotations

import gc

import torch

from act_kernels.tensor_cache import TensorCache, data_version


def counting():
    calls = []          # what compute was called with, not the tensors (they must be able to die)

    def compute(arg):
        calls.append(type(arg).__name__ if isinstance(arg, tuple) else tuple(arg.shape))
        return len(calls)
    return calls, compute


def test_one_tensor_views_edits_extra_and_lifetime():
    cache, (calls, compute) = TensorCache(), counting()
    t = torch.zeros(3, 4)
    assert cache.get(t, compute) == 1 and cache.get(t, compute) == 1
    assert cache.get(t[None].expand(2, 3, 4)[1], compute) == 1     # the same view of its data
    assert cache.get(t[1:], compute) == 2                          # another view geometry...
    assert cache.get(t[1:], compute) == 2                          # ...a fresh one hits
    assert cache.get(t.clone(), compute) == 3                      # a copy does not
    assert cache.get(t, compute, extra=(2, 5)) == 4                # nor another extra key
    t.add_(1)                                                      # an edit recomputes
    assert cache.get(t, compute) == 5 and cache.get(t, compute) == 5
    del t
    gc.collect()
    assert len(cache) == 0                                         # entries go with the tensor


def test_several_tensors_none_allowed():
    cache, (calls, compute) = TensorCache(), counting()
    a, b = torch.zeros(2), torch.ones(3)
    assert cache.get((a, None, b), compute) == 1
    assert cache.get((a, None, b), compute) == 1 and calls == ["tuple"]
    assert cache.get((a, b, None), compute) == 2
    b.mul_(2)
    assert cache.get((a, None, b), compute) == 3
    del b
    gc.collect()
    assert len(cache) == 0                                         # either tensor dying drops it
    assert cache.get((a, None), compute) == 4 and len(cache) == 1


def test_inference_tensors_have_no_version_and_are_cached():
    with torch.inference_mode():
        t = torch.zeros(2)
    assert data_version(t) is None and data_version(torch.zeros(2)) == 0
    cache, (calls, compute) = TensorCache(), counting()
    assert cache.get(t, compute) == cache.get(t, compute) == 1


def test_by_object_a_fresh_view_misses():
    cache, (calls, compute) = TensorCache(views=False), counting()
    t = torch.zeros(4)
    assert cache.get(t, compute, extra=1) == cache.get(t, compute, extra=1) == 1
    assert cache.get(t[:], compute, extra=1) == 2                  # another object
    t.add_(1)
    assert cache.get(t, compute, extra=1) == 3
    del t
    gc.collect()
    assert len(cache) == 0
