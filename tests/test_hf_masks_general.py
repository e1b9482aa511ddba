"""Every mask Transformers builds (issue 21): packed sequences, Gemma 3's image blocks, custom
4-D masks, through ``act_torch``.

Transformers' packed-sequence and image-block mask functions are recognised from their
construction (``act_kernels/hf/mask_functions.py``) and reach the op as ``segment_ids`` /
``block_ids`` without reading the mask; any other valid mask goes to the op as a dense
``attn_mask``. Model results are compared with Transformers' own attention (empty profile) and
with a float64 hook: an attention implementation on Transformers' eager mask that runs the
brute force of ``tests/bruteforce.py`` with the structure the test knows (checked against the
eager mask) or, for custom masks, with the eager mask itself.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import transformers
from transformers import AttentionInterface, AttentionMaskInterface, masking_utils as mu

from act_kernels import ACTProfile, apply_profile
from act_kernels.hf import (ACTMaskError, DensePathWarning, mask_plan, mask_to_key_padding,
                            masks)
from act_kernels.hf.api import _set_attn_implementation
from act_kernels.hf.mask_functions import read_structure
from act_kernels.modelinfo import text_config

from bruteforce import bruteforce_details, visible

# ---------------------------------------------------------------------------------------------
# the float64 hook
# ---------------------------------------------------------------------------------------------

HOOK = {"profile": None, "padding": None, "segments": None, "blocks": None, "dense": False}
HOOK_NAME = "act_test_float64_hook"


def float64_hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
    """ACT in float64 on Transformers' eager mask (no cache: the queries are every key)."""
    bsz, hq, nq, _ = query.shape
    nk = key.shape[2]
    assert nq == nk, "the hook takes no cache"
    sees = (attention_mask[:, 0] == 0).expand(bsz, nq, nk)
    profile = HOOK["profile"]
    heads = None
    if profile is not None and profile.heads.get(module.layer_idx):
        heads = torch.zeros(bsz, hq, dtype=torch.bool)
        heads[:, profile.heads[module.layer_idx]] = True
    beta, tau = (profile.beta, profile.tau) if profile is not None else (0.4, 0.1)
    if HOOK["dense"]:
        bf = bruteforce_details(query, key, value, heads, beta, tau, scaling, attn_mask=sees)
    else:
        real = HOOK["padding"]
        window = kwargs.get("sliding_window")
        for b in range(bsz):     # the structure the test knows is the mask Transformers built
            row_real = torch.ones(nk, dtype=torch.bool) if real is None else real[b]
            want = visible(nq, nk, row_real, window,
                           None if HOOK["segments"] is None else HOOK["segments"][b],
                           None if HOOK["blocks"] is None else HOOK["blocks"][b])
            assert torch.equal(want[row_real], sees[b][row_real]), "hook: unexpected mask"
        bf = bruteforce_details(query, key, value, heads, beta, tau, scaling, real,
                                window=window, segment_ids=HOOK["segments"],
                                block_ids=HOOK["blocks"])
    return bf.out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(HOOK_NAME, float64_hook)
AttentionMaskInterface.register(HOOK_NAME, mu.eager_mask)


@contextmanager
def hooked(model, profile=None, **structure):
    """Run the model's text decoder through the float64 hook, with ``profile`` and the
    structure the test knows (``padding``, ``segments``, ``blocks`` [B, N]; or ``dense``)."""
    previous = text_config(model)._attn_implementation
    HOOK.update(profile=profile, **structure)
    _set_attn_implementation(model, HOOK_NAME)
    try:
        yield model
    finally:
        _set_attn_implementation(model, previous)
        HOOK.update(profile=None, padding=None, segments=None, blocks=None, dense=False)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_dense_evaluation(monkeypatch):
    """The recognised path reads no mask value: the full check and the host evaluation of a
    mask function fail the test if called."""
    def called(*args, **kwargs):
        raise AssertionError("the mask was evaluated")
    monkeypatch.setattr(masks, "_check_mask", called)
    monkeypatch.setattr(masks, "_structure", called)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------
# recognition of Transformers' mask functions (no op call)
# ---------------------------------------------------------------------------------------------

def packed_positions():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6],
                        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3]])
    return pos, mu.find_packed_sequence_indices(pos)


def image_ids(runs, length=14, batch=2):
    """Block ids as Gemma 3 builds them: a new id for each run of image tokens."""
    token_type = torch.zeros(batch, length, dtype=torch.long)
    for b, start, stop in runs:
        token_type[b, start:stop] = 1
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
    return get_block_sequence_ids_for_mask(token_type)


BLOCKS = [(0, 3, 7), (1, 4, 8), (1, 9, 12)]


def recognised_cases():
    pos, psm = packed_positions()
    ids = image_ids(BLOCKS)
    causal, sliding = mu.causal_mask_function, mu.sliding_window_causal_mask_function
    gemma_sliding = mu.and_masks(mu.or_masks(causal, mu.blockwise_overlay(ids)),
                                 mu.sliding_window_overlay(5))
    return {   # name: (function, layer window, left padding per row, q_len, q_offset,
        #         kv_offset, (segment ids, block ids) by absolute position)
        "packed": (mu.packed_sequence_compatibility_function(causal, pos, psm), None, None,
                   14, 0, 0, (psm, None)),
        "packed sliding": (mu.packed_sequence_compatibility_function(sliding(3), pos, psm), 3,
                           None, 14, 0, 0, (psm, None)),
        "image blocks": (mu.or_masks(causal, mu.blockwise_overlay(ids)), None, (0, 2), 14, 0,
                         0, (None, ids)),
        "image blocks, sliding (or)": (mu.or_masks(sliding(5), mu.blockwise_overlay(ids)), 5,
                                       (1, 0), 14, 0, 0, (None, ids)),
        "image blocks, sliding (Gemma 3: and)": (gemma_sliding, 5, (0, 2), 14, 0, 0,
                                                 (None, ids)),
        "image blocks, chunked prefill": (mu.or_masks(causal, mu.blockwise_overlay(ids)), None,
                                          (0, 2), 4, 10, 0, (None, ids)),
        "image blocks, sliding cache dropped keys": (gemma_sliding, 5, (0, 2), 4, 10, 5,
                                                     (None, ids)),
    }


def build(function, padding_rows, q_len, q_offset, kv_offset=0, total=14):
    attention_mask = None
    if padding_rows is not None:
        attention_mask = torch.ones(2, total, dtype=torch.bool)
        for b, p in enumerate(padding_rows):
            attention_mask[b, :p] = False
    return masks.act_sdpa_mask(batch_size=2, q_length=q_len, kv_length=total - kv_offset,
                               q_offset=q_offset, kv_offset=kv_offset, mask_function=function,
                               attention_mask=attention_mask, allow_is_causal_skip=False)


@pytest.mark.parametrize("name", list(recognised_cases()))
def test_transformers_structures_are_read_without_evaluating_the_mask(name, no_dense_evaluation):
    function, window, pads, q_len, q_offset, kv_offset, ids = recognised_cases()[name]
    nk = 14 - kv_offset
    mask = build(function, pads, q_len, q_offset, kv_offset)
    plan = mask_plan(mask, 2, q_len, nk, window=window)
    assert plan.dense is None and plan.keys_used == nk
    segments, blocks = (None if t is None else t[:, kv_offset:] for t in ids)
    assert (plan.segment_ids is None) == (segments is None)
    assert (plan.block_ids is None) == (blocks is None)
    if segments is not None:
        assert torch.equal(plan.segment_ids, segments)
    if blocks is not None:
        assert torch.equal(plan.block_ids, blocks)
    # the structure handed to the op is the mask Transformers built (on the real query rows)
    for b in range(2):
        real = torch.ones(nk, dtype=torch.bool) if plan.key_padding is None \
            else plan.key_padding[b]
        want = visible(q_len, nk, real, window,
                       None if segments is None else segments[b],
                       None if blocks is None else blocks[b])
        rows = real[nk - q_len:]
        assert torch.equal(want[rows], mask[b, 0][rows]), b


def test_a_window_the_structure_disagrees_with_is_not_taken_from_the_record():
    function = mu.packed_sequence_compatibility_function(
        mu.sliding_window_causal_mask_function(3), *packed_positions())
    mask = build(function, None, 14, 0)
    plan = mask_plan(mask, 2, 14, 14)                    # a full-attention layer
    assert plan.dense is not None


def test_gemma3_sliding_blocks_longer_than_the_window_go_dense():
    """Gemma 3's sliding layers also hide block keys more than W before a row; with a block
    longer than W that is not the op's block rule, so the mask takes the exact dense path."""
    ids = image_ids([(0, 2, 10)])                            # 8 image tokens, W = 5
    function = mu.and_masks(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
                            mu.sliding_window_overlay(5))
    mask = build(function, None, 14, 0)
    assert masks.built_from(mask).window_lo is None
    plan = mask_plan(mask, 2, 14, 14, window=5)
    assert plan.dense is not None and plan.block_ids is None
    assert torch.equal(masks.dense_mask(mask), mask[:, 0])


def test_unknown_compositions_are_not_recognised():
    pos, psm = packed_positions()
    ids = image_ids(BLOCKS)
    blocks = mu.blockwise_overlay(ids)
    unknown = {
        # Transformers reads the blocks of a packed sliding layer at the remapped positions
        "packed blocks": mu.packed_sequence_compatibility_function(
            mu.and_masks(mu.or_masks(mu.causal_mask_function, blocks),
                         mu.sliding_window_overlay(4)), pos, psm),
        "chunked": mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)),
        "bidirectional": mu.bidirectional_mask_function,
        "blocks without causal": mu.or_masks(mu.bidirectional_mask_function, blocks),
        "a copy of causal": lambda *idx: mu.causal_mask_function(*idx),
        "three parts": mu.or_masks(mu.causal_mask_function, blocks, blocks),
    }
    for name, function in unknown.items():
        with pytest.raises(LookupError):
            read_structure(function)
    assert read_structure(mu.or_masks(mu.causal_mask_function, blocks)).blocks is ids


def test_error_messages_say_what_the_mask_does():
    n = 5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    later = causal.clone()
    later[1, 3] = True                               # row 1 sees a later key
    with pytest.raises(ACTMaskError, match="query row 1 of batch row 0 sees key 3, after its "
                                           "own position 1") as error:
        mask_to_key_padding(later[None, None], 1, n, n)
    assert "sees no key at its own position" not in str(error.value)
    hole = causal.clone()
    hole[4, 2] = False
    with pytest.raises(ACTMaskError, match="at position 4 it does not see key 2"):
        mask_to_key_padding(hole[None, None], 1, n, n)
    bias = torch.zeros(n, n).masked_fill(~causal, float("-inf"))
    bias[3, 1] = -1.5
    with pytest.raises(ACTMaskError, match=r"adds a bias to the scores \(e.g. -1.5 for query "
                                           "row 3, key 1"):
        mask_plan(bias[None, None], 1, n, n)
    with pytest.raises(ACTMaskError, match="a mask per head"):
        mask_plan(causal[None, None].expand(1, 2, n, n), 1, n, n)
    with pytest.raises(ACTMaskError, match="no query may attend to any key"):
        mask_plan(torch.zeros(1, 1, n, n, dtype=torch.bool), 1, n, n)
    plan = mask_plan(later[None, None], 1, n, n)
    assert "sees key 3, after its own position 1" in plan.dense
    assert plan.keys_used == n and plan.key_padding is None
