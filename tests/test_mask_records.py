"""Masks built by ``act_sdpa_mask`` carry a host record of what they were built from, which
lets a layer skip reading the mask from the device (``act_kernels/hf/masks.py``). The record
must give exactly what the full check gives, and never accept a mask the full check refuses."""
from __future__ import annotations

import pytest
import torch

from transformers import masking_utils

from act_kernels.hf.mask_functions import read_structure  # noqa: E402
from act_kernels.hf.masks import (ACTMaskError, _check_mask,  # noqa: E402
                                  act_sdpa_mask, built_from, keys_dropped, mask_plan,
                                  mask_to_key_padding)

causal = masking_utils.causal_mask_function


def padding(total: int, pads) -> torch.Tensor:
    mask = torch.ones(len(pads), total, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return mask


def build(q_len, kv_len, q_offset=0, kv_offset=0, function=causal, pads=(0, 3)):
    return act_sdpa_mask(batch_size=len(pads), q_length=q_len, kv_length=kv_len,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=function,
                         attention_mask=padding(kv_offset + kv_len, pads),
                         allow_is_causal_skip=False)


def same(a, b) -> bool:
    """Equal key-padding results; an all-real mask stands for None."""
    (ka, na), (kb, nb) = a, b
    ka = None if ka is None or bool(ka.all()) else ka
    kb = None if kb is None or bool(kb.all()) else kb
    return na == nb and (ka is None) == (kb is None) and (ka is None or torch.equal(ka, kb))


CALLS = {  # name: (q_len, kv_len, q_offset, kv_offset, window of the function and the layer)
    "prefill": (7, 7, 0, 0, None),
    "chunked prefill": (3, 10, 7, 0, None),
    "decode": (1, 12, 11, 0, None),
    "sliding prefill": (9, 9, 0, 0, 4),
    "sliding decode, start dropped": (1, 6, 14, 9, 6),
    "sliding chunk, start dropped": (3, 8, 12, 7, 6),
}


@pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
def test_the_record_gives_what_the_full_check_gives(call):
    q_len, kv_len, q_offset, kv_offset, window = call
    function = causal if window is None else \
        masking_utils.sliding_window_causal_mask_function(window)
    mask = build(q_len, kv_len, q_offset, kv_offset, function, pads=(0, 3))
    assert built_from(mask) is not None
    got = mask_to_key_padding(mask, 2, q_len, kv_len, window=window)
    assert same(got, _check_mask(mask, 2, q_len, kv_len, window))
    assert keys_dropped(mask) is (kv_offset > 0)


@pytest.mark.parametrize("name,function", [
    ("bidirectional", masking_utils.bidirectional_mask_function),
    ("chunked", masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))),
])
def test_masks_of_no_structure_record_only_their_padding_and_go_dense(name, function):
    """No structure recorded (the full check decides, and sends them to the dense path); the
    strict ``mask_to_key_padding`` refuses them."""
    mask = build(6, 6, function=function)
    built = built_from(mask)
    assert built.window_lo is None and built.segments is None and built.blocks is None
    assert torch.equal(built.padding, padding(6, (0, 3)))
    with pytest.raises(ACTMaskError):
        mask_to_key_padding(mask, 2, 6, 6)
    plan = mask_plan(mask, 2, 6, 6)
    assert plan.dense and plan.keys_used == 6 and torch.equal(plan.key_padding, built.padding)


def test_a_window_the_record_disagrees_with_gets_the_full_check():
    mask = build(6, 6)                                        # plain causal
    assert built_from(mask) is not None
    with pytest.raises(ACTMaskError, match="sliding-window \\(2\\)"):
        mask_to_key_padding(mask, 2, 6, 6, window=2)
    sliding = build(6, 6, function=masking_utils.sliding_window_causal_mask_function(3))
    with pytest.raises(ACTMaskError):
        mask_to_key_padding(sliding, 2, 6, 6)                 # a full-attention layer
    assert same(mask_to_key_padding(sliding, 2, 6, 6, window=3),
                _check_mask(sliding, 2, 6, 6, 3))


def test_an_edited_mask_loses_its_record():
    mask = build(5, 5)
    mask[0, 0, 4, 0] = False                                  # in place: no longer causal
    assert built_from(mask) is None
    with pytest.raises(ACTMaskError):
        mask_to_key_padding(mask, 2, 5, 5)


def test_tensor_offsets_static_caches_get_no_structure():
    mask = act_sdpa_mask(batch_size=2, q_length=1, kv_length=9, q_offset=torch.tensor(4),
                         kv_offset=0, mask_function=causal, attention_mask=padding(9, (0, 2)),
                         allow_is_causal_skip=False)
    assert built_from(mask).window_lo is None and keys_dropped(mask) is None
    assert same(mask_to_key_padding(mask, 2, 1, 9), _check_mask(mask, 2, 1, 9))


@pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
def test_recognised_functions_give_the_windows_evaluation_gives(call):
    """Transformers' causal and sliding functions are recorded without evaluation; their windows
    equal those of evaluating them (and of an unrecognised copy, which is evaluated)."""
    from act_kernels.hf import masks

    q_len, kv_len, q_offset, kv_offset, window = call
    for w in (window, 1, 2, 50):
        function = causal if w is None else masking_utils.sliding_window_causal_mask_function(w)
        fast = masks._band_windows(read_structure(function).window,
                                   q_offset + q_len - 1 - kv_offset)
        structure = masks._structure(function, 2, q_len, kv_len, q_offset, kv_offset)
        assert fast == masks._causal_windows(structure, q_offset, kv_offset), (w, fast)
        copy = (lambda f: lambda *idx: f(*idx))(function)
        with pytest.raises(LookupError):
            read_structure(copy)
        mask = build(q_len, kv_len, q_offset, kv_offset, copy)
        assert built_from(mask).window_lo == fast[0]
        assert built_from(mask).window_hi == fast[1]


def test_the_opaque_op_checks_a_mask_once_per_tensor_and_version(monkeypatch):
    """Inside torch.compile every layer's opaque op gets the forward's one mask tensor (no
    record): the first layer checks it, the others reuse the answer; an edit is checked anew."""
    from act_kernels.hf import attention, masks

    calls = []
    check = masks._check_mask
    monkeypatch.setattr(masks, "_check_mask", lambda *a, **kw: calls.append(1) or check(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., :30] = True
    mask[1, ..., 5:30] = True                      # left padding, a static cache's unfilled end
    want = attention.act_attention(q, k[:, :, :30], v[:, :, :30], backend="torch",
                                   key_padding_mask=mask[:, 0, 0, :30])
    with torch.no_grad():
        for _ in range(3):
            out = attention.hf_attention_op(q, k, v, mask, None, 0.4, 0.1, 0.25, "torch")
            assert torch.equal(out, want)
    assert len(calls) == 1
    mask[1, ..., 5] = False                        # an edit in place: a new version
    attention.hf_attention_op(q, k, v, mask, None, 0.4, 0.1, 0.25, "torch")
    assert len(calls) == 2
