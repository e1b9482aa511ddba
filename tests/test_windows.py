"""Sliding-window attention (``docs/spec.md``, "Attention windows"): every backend against the
independent float64 brute force, and windowed Transformers models (Gemma 3, Mistral) against
sdpa and against an eager hook built on the brute force."""
from __future__ import annotations

import os

import pytest
import torch

from bruteforce import bruteforce_details, visible
from inputs import backend_name, left_padding, make_qkv, random_head_mask
from helpers.compare import check

from act_kernels import act_attention

BACKENDS = ["eager", "torch", "torch-pruned"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

# (B, Hq, Hkv, Nq, Nk, D, W): W smaller than, equal to and larger than N; W = 1; GQA; decode;
# chunked prefill (Nq < Nk)
CASES = [
    (2, 4, 2, 37, 37, 32, 8),
    (1, 3, 1, 29, 29, 40, 29),     # W == N: plain causal
    (1, 2, 2, 23, 23, 32, 64),     # W > N
    (2, 2, 1, 17, 17, 32, 1),      # every row sees only itself
    (2, 6, 2, 1, 45, 32, 9),       # decode
    (1, 4, 4, 1, 45, 32, 1),       # decode, W = 1
    (2, 4, 2, 9, 40, 48, 12),      # chunked prefill
    (1, 2, 1, 16, 33, 32, 5),
]


def case_id(case):
    b, hq, hkv, nq, nk, d, w = case
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-W{w}"


def planted_in_window(nk: int, w: int):
    """Keys late enough that some rows see them, so the window's sinks are tested."""
    return sorted({j for j in (nk - w // 2 - 1, nk - 2, nk // 2) if 0 < j < nk})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("padded", [False, True])
def test_windows_match_the_bruteforce(backend, case, padded):
    bsz, hq, hkv, nq, nk, dim, w = case
    seed = sum(case) + padded
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=planted_in_window(nk, w))
    heads = random_head_mask(bsz, hq, seed=seed)
    kpm = left_padding(nk, [0, 3][:bsz] if bsz > 1 else [2]) if padded else None
    _, stats, bf = check(backend, q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm,
                         seed=seed, window=w)
    if w > 1 and nk > 2:
        assert bool(bf.sinks.any()), "no sink: the case would prove little"
    if w == 1:       # every row is its own only key: calibration changes nothing
        plain = act_attention(q, k, v, key_padding_mask=kpm, window=1, backend=backend_name(backend))
        torch.testing.assert_close(act_attention(q, k, v, heads=heads, tau=0.05, window=1,
                                                 key_padding_mask=kpm, backend=backend_name(backend)),
                                   plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_at_least_n_is_plain_causal_and_bad_windows_are_refused(backend):
    q, k, v = make_qkv(1, 2, 1, 13, 13, 32, seed=4, planted=[5])
    want = act_attention(q, k, v, heads=[0, 1], tau=0.05, backend=backend_name(backend))
    for w in (13, 14, 1000):
        got = act_attention(q, k, v, heads=[0, 1], tau=0.05, window=w, backend=backend_name(backend))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        act_attention(q, k, v, window=0, backend=backend_name(backend))
    with pytest.raises(TypeError, match="window must be None or a positive integer"):
        act_attention(q, k, v, window=2.5, backend=backend_name(backend))


def test_the_first_valid_key_is_never_a_sink_even_outside_every_window():
    """Decode far past the window: position 0 is unseen, and the first seen key may be a sink."""
    q, k, v = make_qkv(1, 2, 2, 1, 30, 32, seed=9, planted=[22])
    _, stats = act_attention(q, k, v, heads=[0, 1], tau=0.05, window=8, backend="eager",
                             return_stats=True)
    assert not stats.sinks[..., :22].any()
    assert stats.sinks[..., 22].all()               # the first key the row sees is a sink
    assert (stats.scores[..., :22] == 0).all()      # unseen keys score 0


# ---------------------------------------------------------------------------------------------
# Transformers: Gemma 3 (sliding and full layers) and Mistral (one window for every layer)
# ---------------------------------------------------------------------------------------------

from act_kernels import ACTProfile, apply_profile  # noqa: E402
from act_kernels.hf import remove_profile  # noqa: E402
from helpers.models import tiny_sliding as tiny  # noqa: E402

TAU = 0.05
HOOK = {"profile": None, "real": None}


def prompts(lengths=(14, 9)):
    gen = torch.Generator().manual_seed(7)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, 97, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def bruteforce_hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    **kwargs):
    """ACT from the brute force, with the window the layer declares and the key padding of
    the 2D mask the test passed; prefill only (no cache)."""
    window = kwargs.get("sliding_window")
    real = HOOK["real"]
    bsz, hq, nq, _ = query.shape
    assert nq == key.shape[2], "the hook is for prefill without a cache"
    if attention_mask is not None:   # the mask Transformers built is the spec's visibility
        allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool \
            else attention_mask[:, 0] == 0
        for b in range(bsz):
            sees = visible(nq, nq, real[b], window)
            assert torch.equal(allowed[b][real[b]], sees[real[b]]), "mask != spec visibility"
    profile = HOOK["profile"]
    heads = torch.zeros(bsz, hq, dtype=torch.bool)
    heads[:, profile.heads.get(module.layer_idx, [])] = True
    bf = bruteforce_details(query, key, value, heads, profile.beta, profile.tau, scaling,
                            real, window=window)
    return bf.out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_hook():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("act_bf_window", bruteforce_hook)
    AttentionMaskInterface.register("act_bf_window", sdpa_mask)


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
@torch.no_grad()
def test_windowed_model_empty_profile_equals_sdpa_token_for_token(kind):
    model = tiny(kind)
    ids, mask = prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                  pad_token_id=0)
    want_logits = model(input_ids=ids, attention_mask=mask).logits
    want = model.generate(**kwargs)
    apply_profile(model, ACTProfile(tau=TAU), backend="torch")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want_logits,
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(**kwargs), want)


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
@torch.no_grad()
def test_windowed_model_profile_equals_the_bruteforce_hook(kind):
    model = tiny(kind)
    ids, mask = prompts()
    profile = ACTProfile.for_model(model, {0: [0, 3], 1: [1], 2: [2]}, tau=TAU)
    register_hook()
    HOOK.update(profile=profile, real=mask.bool())
    model.set_attn_implementation("act_bf_window")
    want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    remove_profile(model)
    plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    apply_profile(model, profile, backend="torch")
    got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert not torch.allclose(got[real], plain[real], atol=1e-4), "the profile changed nothing"
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_decode_past_the_window_lets_the_first_cached_key_be_a_sink():
    """Gemma 3's sliding cache drops the keys before the window: the first key of a decode call
    is then not the sequence's first key, and ACT may find a sink there."""
    model = tiny("gemma3")
    ids, mask = prompts((14,))
    apply_profile(model, ACTProfile.for_model(model, {0: [0, 1, 2, 3]}, tau=TAU),
                  backend="torch")
    from act_kernels import recording

    seen = []

    def recorder(module, stats, query, key, value, kpm):
        seen.append((query.shape[2], key.shape[2], kpm, stats.sinks, stats.scores))

    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    with recording(model, recorder, layers=[0]):
        model(input_ids=ids[:, -1:], past_key_values=out.past_key_values,
              attention_mask=torch.ones(1, 15, dtype=torch.long), use_cache=True)
    nq, nk, kpm, sinks, scores = seen[0]
    assert nq == 1 and nk == 6                     # the stand-in first key + the 5 in the window
    assert kpm is not None and bool(kpm[0, 0]) and bool(kpm.all())
    assert scores[..., 0].eq(0).all()              # the stand-in is seen by no row
    torch.testing.assert_close(sinks[..., 1:], scores[..., 1:] > TAU)   # no key excluded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sink_dominated_rows_in_a_window(backend, dtype):
    """Sinks that take nearly all of a row's attention (1 - m below the cancellation guard):
    the rows are recomputed from the non-sink keys, still equal to the brute force."""
    q, k, v = make_qkv(2, 4, 2, 40, 40, 32, seed=21, planted=[12, 13, 30], sink_logit=9.0,
                       dtype=dtype)
    _, stats, bf = check(backend, q, k, v, heads=[0, 1, 2, 3], tau=0.05, window=10, seed=21)
    assert bool((bf.changed & (bf.rest < 0.2)).any()), "no sink-dominated row: case too easy"


def test_windowed_passes_read_only_the_span_of_each_block(monkeypatch):
    """O(Nq W): every matmul of the bound pass and every fused plain call of a windowed prefill
    covers one block of rows and at most its span of W - 1 + rows keys, never the prefix; rows
    dominated by a sink recompute their non-sink part from fewer than 2 W keys."""
    import act_kernels.torch_backend as tb

    n, w = 700, 40
    q, k, v = make_qkv(1, 4, 2, n, n, 16, seed=33, planted=[100, 400], sink_logit=9.0)
    widths = []
    real_mm, real_sdpa = torch.mm, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def mm_spy(a, b, *, out=None):
        if a.shape[1] == 16 + 2:             # the bound pass: (q, -lse high, -lse low)
            widths.append(("bound", a.shape[0] // 2, b.shape[1]))   # rows x 2 heads, keys
        else:                                # the non-sink part of sink-dominated rows
            widths.append(("rows", w + 1, b.shape[1]))
        return real_mm(a, b, out=out)

    def sdpa_spy(q_, k_, v_, *args, **kwargs):
        widths.append(("plain", q_.shape[2], k_.shape[2]))
        return real_sdpa(q_, k_, v_, *args, **kwargs)
    monkeypatch.setattr(tb.torch, "mm", mm_spy)
    monkeypatch.setattr(tb.torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        sdpa_spy)
    out = act_attention(q, k, v, heads=[0, 1, 2, 3], window=w, tau=0.05, backend="torch")
    monkeypatch.undo()
    assert {kind for kind, _, _ in widths} == {"plain", "bound", "rows"}
    assert all(keys <= rows + w - 1 for _, rows, keys in widths), widths
    assert sum(rows for kind, rows, _ in widths if kind == "plain") == n
    want = act_attention(q, k, v, heads=[0, 1, 2, 3], window=w, tau=0.05, backend="eager")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
