"""Correctness of ``act_kernels.act_attention`` against the float64 brute force, per backend.

Run one backend with ``-k eager`` / ``-k torch``. Every check compares the public op with
``tests/bruteforce.py`` (which shares no code with the package) or with another call of the same
backend (uncalibrated heads must be bit-identical to ``heads=None``).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from act_kernels import act_attention
from bruteforce import act_bruteforce, bruteforce_details
from helpers.compare import TOLS, Tol, assert_stats_calibrated_is_fresh, check, describe
from inputs import (backend_name, integer_qkv, left_padding, make_qkv, random_head_mask,
                    random_pads)

# "torch-pruned": the torch backend with its dense path for short prefills off (conftest.py)
BACKENDS = ["eager", "torch", "torch-pruned"]


def planted_positions(nk: int, nq: int):
    """Two keys beyond position 0 that most rows see: one early, one late."""
    return sorted({j for j in (nk // 3, nk - max(nq, 2) // 2 - 1) if 0 < j < nk})


# ----------------------------------------------------------------------------------------------
# shapes: (B, Hq, Hkv, Nq, Nk, D); N up to 301, primes and non-multiples of 16/32/64/128
# ----------------------------------------------------------------------------------------------

PREFILL = [
    (1, 1, 1, 1, 1, 64),
    (2, 2, 2, 2, 2, 64),
    (2, 3, 1, 7, 7, 40),      # GQA 3, odd head dim
    (2, 8, 1, 31, 31, 64),    # GQA 8
    (1, 6, 2, 97, 97, 80),    # GQA 3
    (2, 2, 2, 131, 131, 64),
    (1, 3, 1, 257, 257, 64),
    (1, 2, 2, 301, 301, 40),
]
DECODE = [
    (2, 4, 4, 1, 2, 64),
    (2, 4, 4, 1, 7, 64),
    (3, 6, 2, 1, 97, 40),
    (2, 8, 1, 1, 301, 64),
]
CHUNKED = [
    (1, 3, 3, 2, 3, 64),
    (1, 2, 2, 7, 31, 80),
    (2, 3, 1, 16, 131, 64),
    (2, 6, 2, 100, 257, 64),
]
ALL_SHAPES = PREFILL + DECODE + CHUNKED


def shape_id(shape):
    b, hq, hkv, nq, nk, d = shape
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-D{d}"


# ----------------------------------------------------------------------------------------------
# the matrix
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=shape_id)
def test_matches_bruteforce(backend, shape):
    """Planted sinks, a different calibrated head set per batch row, fp32."""
    bsz, hq, hkv, nq, nk, dim = shape
    seed = sum(shape)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=planted_positions(nk, nq))
    heads = random_head_mask(bsz, hq, seed=seed)
    _, stats, bf = check(backend, q, k, v, heads=heads, seed=seed)
    if nk > 2:   # the planted keys must actually be found, or the test would prove little
        assert bool(bf.sinks.any()), "no sink in this case"
        assert bool(stats.sinks.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [
    (3, 2, 2, 31, 31, 64),
    (3, 4, 1, 97, 97, 40),
    (3, 3, 1, 1, 131, 64),    # decode
    (3, 6, 2, 1, 7, 64),
    (3, 2, 1, 16, 257, 80),   # chunked: heavy padding reaches into the query rows
    (3, 2, 2, 7, 31, 64),
], ids=shape_id)
def test_left_padding(backend, shape):
    """Different left padding per row (row 0 unpadded); a sink planted exactly where row 1's real
    tokens begin, which must not be a sink there (first valid key) but may be elsewhere."""
    bsz, hq, hkv, nq, nk, dim = shape
    seed = 7 * sum(shape)
    pads = [0, nk // 4 + 1, nk - max(1, nq // 2)]
    first_real = pads[1]
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed,
                       planted=sorted({first_real, nk // 2} - {0}))
    kpm = left_padding(nk, pads)
    heads = random_head_mask(bsz, hq, seed=seed)
    out, stats, bf = check(backend, q, k, v, heads=heads, key_padding_mask=kpm, seed=seed)
    assert not bool(stats.sinks[1, :, first_real].any()), "first real key of row 1 became a sink"
    assert not bool(stats.sinks[:, :, 0].any()), "position 0 is padding or first valid"
    assert not bool((stats.sinks & ~kpm[:, None, :]).any()), "a padded key became a sink"
    assert bool(bf.sinks[0].any()), "row 0 should have a planted sink"
    # padded query rows (if this case has any) only need to be finite, which check() asserts
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [
    (2, 6, 2, 97, 97, 64),
    (2, 8, 1, 1, 131, 64),
    (2, 3, 1, 31, 257, 40),
], ids=shape_id)
def test_dtypes(backend, dtype, shape):
    """Half precision against the brute force of the same rounded inputs; float64 tightly."""
    bsz, hq, hkv, nq, nk, dim = shape
    seed = sum(shape) + 3
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, dtype=dtype,
                       planted=planted_positions(nk, nq))
    kpm = left_padding(nk, [0, nk // 3])
    heads = random_head_mask(bsz, hq, seed=seed)
    out, _, bf = check(backend, q, k, v, heads=heads, key_padding_mask=kpm, seed=seed)
    assert out.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 61, 61, 64), (2, 4, 2, 1, 61, 64),
                                   (2, 3, 3, 13, 61, 40)], ids=shape_id)
def test_beta_extremes(backend, shape):
    """beta = 0 moves all sink attention away; beta = 1 is plain attention."""
    bsz, hq, hkv, nq, nk, dim = shape
    seed = 11 + sum(shape)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=planted_positions(nk, nq))
    kpm = left_padding(nk, [0, 5])
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend=backend_name(backend))

    out0, stats0, bf0 = check(backend, q, k, v, heads=[0, hq - 1], beta=0.0,
                              key_padding_mask=kpm, seed=seed)
    assert bool(bf0.changed[:, 0].any()), "beta=0 should rewrite some rows"
    assert (out0[:, 0] - plain[:, 0]).abs().max() > 1e-2, "beta=0 left head 0 unchanged"

    out1, _, _ = check(backend, q, k, v, heads=[0, hq - 1], beta=1.0, key_padding_mask=kpm,
                       seed=seed)
    valid = bf0.row_valid[:, None, :, None]
    diff = ((out1 - plain).abs() * valid).max().item()
    assert diff <= 2e-5 * v.abs().max().item(), f"beta=1 differs from plain attention by {diff:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 61, 61, 64), (2, 4, 1, 1, 97, 64),
                                   (2, 3, 3, 13, 61, 40)], ids=shape_id)
def test_tiny_tau_makes_nearly_every_key_a_sink(backend, shape):
    bsz, hq, hkv, nq, nk, dim = shape
    seed = 13 + sum(shape)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed)
    kpm = left_padding(nk, [0, 9])
    heads = random_head_mask(bsz, hq, seed=seed)
    _, stats, bf = check(backend, q, k, v, heads=heads, tau=1e-6, key_padding_mask=kpm, seed=seed)
    seen = bf.key_seen.sum().item() * hq
    assert bf.sinks.sum().item() >= 0.9 * (seen - bsz * hq), "tau=1e-6 should catch most keys"
    # rows then keep little besides the first valid key: the rewrite is large but finite
    assert bool((bf.sink_mass[bf.row_valid[:, None].expand_as(bf.sink_mass)] > 0.5).any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.9, 2.0])
@pytest.mark.parametrize("shape", [(2, 4, 2, 61, 61, 64), (2, 4, 1, 1, 97, 64),
                                   (2, 3, 3, 13, 61, 40)], ids=shape_id)
def test_large_tau_is_plain_attention(backend, tau, shape):
    bsz, hq, hkv, nq, nk, dim = shape
    seed = 17 + sum(shape)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed)
    kpm = left_padding(nk, [0, 4])
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend=backend_name(backend))
    out, stats, bf = check(backend, q, k, v, heads=torch.ones(hq, dtype=torch.bool), tau=tau,
                           key_padding_mask=kpm, seed=seed)
    assert not bool(bf.sinks.any()) and not bool(stats.sinks.any())
    assert bool((stats.sink_mass == 0).all())
    diff = ((out - plain).abs() * bf.row_valid[:, None, :, None]).max().item()
    assert diff <= 1e-6, f"no sinks, yet the output moved by {diff:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 40, 40, 64), (3, 4, 2, 1, 40, 64),
                                   (2, 4, 4, 9, 40, 64)], ids=shape_id)
@pytest.mark.parametrize("beta,tau", [(0.4, 0.1), (0.0, 1e-6), (0.7, 0.02)])
def test_rows_still_sum_to_one(backend, shape, beta, tau):
    """With v = 1 every calibrated output is 1: the rewrite only moves attention around."""
    bsz, hq, hkv, nq, nk, dim = shape
    q, k, _ = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=5, planted=planted_positions(nk, nq))
    v = torch.ones(bsz, hkv, nk, dim)
    kpm = left_padding(nk, random_pads(bsz, nk, seed=5, max_frac=0.3))
    out, stats = act_attention(q, k, v, heads=torch.ones(hq, dtype=torch.bool), beta=beta, tau=tau,
                               key_padding_mask=kpm, backend=backend_name(backend), return_stats=True)
    assert bool(stats.sinks.any())
    valid = kpm[:, nk - nq:][:, None, :, None].expand_as(out)
    err = (out[valid] - 1).abs().max().item()
    assert err <= 1e-5, f"rows do not sum to 1 (error {err:.3g})"


# ----------------------------------------------------------------------------------------------
# heads: bit-identical uncalibrated heads, equivalent spellings
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 6, 2, 53, 53, 64), (3, 8, 1, 1, 131, 64),
                                   (2, 6, 3, 17, 71, 40), (2, 4, 4, 1, 1, 64)], ids=shape_id)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("return_stats", [False, True], ids=["out", "stats"])
def test_uncalibrated_heads_are_bit_identical(backend, shape, padded, return_stats):
    bsz, hq, hkv, nq, nk, dim = shape
    seed = 19 + sum(shape)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=planted_positions(nk, nq),
                       layout="bnhd")
    kpm = left_padding(nk, random_pads(bsz, nk, seed=seed)) if padded else None
    heads = random_head_mask(bsz, hq, seed=seed)
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend=backend_name(backend))
    result = act_attention(q, k, v, heads=heads, key_padding_mask=kpm, backend=backend_name(backend),
                           return_stats=return_stats)
    out = result[0] if return_stats else result
    keep = ~heads
    assert bool(keep.any())
    assert torch.equal(out[keep], plain[keep]), (
        f"uncalibrated heads changed (max diff {(out[keep] - plain[keep]).abs().max():.3g}): "
        f"{describe(q, k, v, backend=backend, heads=heads.int().tolist())}")
    if nk > 1:
        assert not torch.equal(out[heads], plain[heads]), "calibrated heads did not change"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 6, 2, 33, 33, 64), (2, 6, 3, 1, 33, 64)], ids=shape_id)
def test_head_spellings_agree(backend, shape):
    """Indices, an index tensor, a [Hq] mask and the expanded [B, Hq] mask are the same thing;
    an all-False mask and an empty list are heads=None."""
    bsz, hq, hkv, nq, nk, dim = shape
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=23, planted=planted_positions(nk, nq))
    row = torch.tensor([i in (1, 4) for i in range(hq)])
    ref = act_attention(q, k, v, heads=[1, 4], backend=backend_name(backend))
    for spelling in ([4, 1], (1, 4), torch.tensor([1, 4]), row, row[None].expand(bsz, hq).clone()):
        assert torch.equal(act_attention(q, k, v, heads=spelling, backend=backend_name(backend)), ref), spelling
    assert torch.equal(act_attention(q, k, v, heads=1, backend=backend_name(backend)),
                       act_attention(q, k, v, heads=[1], backend=backend_name(backend)))
    plain = act_attention(q, k, v, backend=backend_name(backend))
    assert not torch.equal(ref, plain)
    for nothing in ([], torch.zeros(hq, dtype=torch.bool), torch.zeros(bsz, hq, dtype=torch.bool)):
        assert torch.equal(act_attention(q, k, v, heads=nothing, backend=backend_name(backend)), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_heads_calibrate_only_their_row(backend):
    """Row b calibrates head b only: each row must equal a B=1 call with that single head."""
    bsz, hq, hkv, n, dim = 3, 3, 1, 45, 64
    q, k, v = make_qkv(bsz, hq, hkv, n, n, dim, seed=29, planted=[15, 30])
    heads = torch.eye(bsz, hq, dtype=torch.bool)
    out = act_attention(q, k, v, heads=heads, backend=backend_name(backend))
    for b in range(bsz):
        alone = act_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], heads=[b], backend=backend_name(backend))
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 10, 37], ids=lambda n: f"Nq{n}")
def test_stats_for_every_head_and_the_first_valid_key(backend, nq):
    """Stats are filled for all heads even with heads=None; a huge sink at the first valid key
    (position 0, or the first real token) is never reported; unseen keys score exactly 0."""
    bsz, hq, hkv, nk, dim = 2, 4, 2, 37, 64
    pads = [0, 6]
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=31, planted=[0, 6, 20], sink_logit=8.0)
    kpm = left_padding(nk, pads)
    _, stats, bf = check(backend, q, k, v, key_padding_mask=kpm, seed=31)
    assert not bool(stats.calibrated.any())
    assert bool(stats.sinks[:, :, 20].all()), "the planted key 20 is a sink of every head"
    assert bool(stats.sinks[0, :, 6].all()) and not bool(stats.sinks[1, :, 6].any())
    assert not bool(stats.sinks[:, :, 0].any())
    assert bool((stats.scores[0, :, 0] > 0.1).all()), "position 0 is the biggest sink of row 0"
    assert bool((stats.scores[1, :, :6] == 0).all()), "padded keys have no score"
    assert bool((stats.sink_mass > 0).any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spelling", ["bool [B, Hq]", "bool [Hq]", "index list"])
def test_stats_calibrated_is_a_fresh_copy_of_the_requested_pairs(backend, spelling):
    """``stats.calibrated`` lists the requested (batch row, head) pairs and shares no memory with
    the caller's mask or the op's cached one: editing it changes no later call."""
    assert_stats_calibrated_is_fresh(backend_name(backend), spelling)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_scores_are_the_attention_row(backend):
    """Nq == 1: score_j = P_0j, so the scores of a row sum to 1."""
    q, k, v = make_qkv(2, 4, 2, 1, 77, 64, seed=37, planted=[30])
    _, stats, _ = check(backend, q, k, v, heads=[2], seed=37)
    torch.testing.assert_close(stats.scores.sum(-1), torch.ones(2, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_with_tau(backend):
    """tau set to a key's exact score: either decision is accepted, the output must follow it."""
    q, k, v = make_qkv(1, 2, 1, 29, 29, 64, seed=41, planted=[10])
    bf = bruteforce_details(q, k, v, None, 0.4, 0.1, None, None)
    tau = float(bf.scores[0, 0, 10])
    check(backend, q, k, v, heads=[0, 1], tau=tau, seed=41)
    check(backend, q, k, v, heads=[0, 1], tau=math.nextafter(tau, 0.0), seed=41)


# ----------------------------------------------------------------------------------------------
# padding corner cases, huge logits, layouts, underflow
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 5, 23], ids=lambda n: f"Nq{n}")
def test_fully_padded_rows_are_finite(backend, nq):
    """Row 1 is all padding, row 2 pads past every query of a chunk; row 0 is normal."""
    bsz, hq, hkv, nk, dim = 3, 4, 2, 23, 64
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=43, planted=[11])
    kpm = left_padding(nk, [0, nk, nk - 1 if nq == 1 else nk - nq // 2])
    for heads in (None, torch.ones(hq, dtype=torch.bool)):
        out, stats, bf = check(backend, q, k, v, heads=heads, key_padding_mask=kpm, seed=43)
        assert torch.isfinite(out).all()
        for t in (stats.scores, stats.sink_mass):
            assert torch.isfinite(t).all()
        assert bool((stats.scores[1] == 0).all()) and not bool(stats.sinks[1].any())
    assert not bool(bf.row_valid[1].any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 67, 67, 64), (2, 4, 1, 1, 67, 64),
                                   (1, 3, 3, 9, 67, 64)], ids=shape_id)
def test_huge_logits_exact(backend, shape):
    """q scaled by 1000, integer entries: the float32 logits are exact, the softmax is nearly
    one-hot; the output must be finite and match the brute force."""
    bsz, hq, hkv, nq, nk, dim = shape
    q, k, v = integer_qkv(bsz, hq, hkv, nq, nk, dim, seed=47, q_scale=1000)
    kpm = left_padding(nk, [0, 10][:bsz])
    heads = torch.ones(hq, dtype=torch.bool)
    # A float32 log-sum-exp of magnitude L is only known to about L * 2**-24: a backend that
    # stores it (flash attention) rescales whole rows of P by up to that much. Allow one ulp.
    logits = q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) / 8
    lse_err = logits.abs().max().item() * 2.0 ** -23
    base = TOLS[torch.float32]
    tol = Tol(out_atol=base.out_atol + 2 * lse_err, out_rtol=base.out_rtol,
              score_atol=base.score_atol + lse_err, score_rtol=base.score_rtol,
              mass_atol=base.mass_atol + 2 * lse_err)
    assert lse_err < 2e-3
    for tau in (0.1, 0.01):
        out, _, _ = check(backend, q, k, v, heads=heads, tau=tau, key_padding_mask=kpm, seed=47,
                          tol=tol)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("nq", [1, 41], ids=lambda n: f"Nq{n}")
def test_huge_logits_finite(backend, dtype, nq):
    """randn q times 1000 in every dtype, with padding and tiny tau: finite everywhere."""
    bsz, hq, hkv, nk, dim = 2, 4, 2, 41, 64
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=53, dtype=dtype, q_scale=1e3,
                       planted=[7, 20])
    kpm = left_padding(nk, [0, 8])
    for tau in (0.1, 1e-6):
        out, stats = act_attention(q, k, v, heads=torch.ones(hq, dtype=torch.bool), tau=tau,
                                   key_padding_mask=kpm, backend=backend_name(backend), return_stats=True)
        assert torch.isfinite(out).all(), f"tau={tau}"
        assert torch.isfinite(stats.scores).all() and torch.isfinite(stats.sink_mass).all()
        # a calibrated row is a convex combination of the values it sees
        assert out.float().abs().max() <= v.float().abs().max() * (1 + 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 6, 2, 45, 45, 64), (2, 6, 2, 1, 45, 80),
                                   (2, 6, 3, 12, 45, 40)], ids=shape_id)
def test_non_contiguous_inputs(backend, shape):
    """q/k/v as transposed [B, N, H, D] views (Transformers' layout) and k/v as slices of a longer
    cache: same results as contiguous copies, and right against the brute force."""
    bsz, hq, hkv, nq, nk, dim = shape
    seed = 59 + sum(shape)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=planted_positions(nk, nq),
                       layout="bnhd")
    if nq == 1:   # a transposed [B, 1, H, D] is contiguous: take q from a fused qkv buffer instead
        q = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :dim]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cache_k = torch.zeros(bsz, hkv, nk + 19, dim).copy_(torch.cat([k, -k[:, :, :19]], 2))
    cache_v = torch.zeros(bsz, hkv, nk + 19, dim).copy_(torch.cat([v, -v[:, :, :19]], 2))
    kpm = left_padding(nk, [0, 3])
    heads = random_head_mask(bsz, hq, seed=seed)
    contiguous = act_attention(q.contiguous(), k.contiguous(), v.contiguous(), heads=heads,
                               key_padding_mask=kpm, backend=backend_name(backend))
    for kk, vv in ((k, v), (cache_k[:, :, :nk], cache_v[:, :, :nk])):
        out, _, _ = check(backend, q, kk, vv, heads=heads, key_padding_mask=kpm, seed=seed)
        torch.testing.assert_close(out, contiguous, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 2], ids=lambda n: f"Nq{n}")
@pytest.mark.parametrize("gap", [92.0, 100.0, 110.0], ids=lambda g: f"gap{g:g}")
def test_underflowing_non_sink_mass(backend, nq, gap):
    """The last row puts all but exp(-gap) of its attention on a sink (key 1); its only non-sink
    key is the first one. That rest is subnormal (gap 92, 100) or zero (110) in float32: the row
    must stay finite, either unchanged or properly calibrated."""
    dim = 4
    q = torch.zeros(1, 1, nq, dim)
    q[0, 0, -1, 0] = 1.0
    k = torch.zeros(1, 1, 2, dim)
    k[0, 0, 0, 0] = -gap
    v = torch.randn(1, 1, 2, dim, generator=torch.Generator().manual_seed(61))
    out, stats, bf = check(backend, q, k, v, heads=[0], scale=1.0, seed=61)
    assert bool(stats.sinks[0, 0, 1])
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# a randomised sweep over everything at once
# ----------------------------------------------------------------------------------------------

SIZES = [1, 2, 3, 7, 16, 31, 64, 97, 128, 131, 200, 257, 301]


@st.composite
def cases(draw):
    nk = draw(st.sampled_from(SIZES))
    kind = draw(st.sampled_from(["prefill", "decode", "chunk"]))
    nq = {"prefill": nk, "decode": 1}.get(kind) or draw(st.integers(1, nk))
    group = draw(st.sampled_from([1, 3, 8]))
    hkv = 1 if group == 8 else draw(st.sampled_from([1, 2]))
    bsz = draw(st.integers(1, 2 if nk > 100 else 3))
    dim = draw(st.sampled_from([16, 40, 64, 80]))
    pads = [0] + [draw(st.integers(0, nk)) for _ in range(bsz - 1)]
    n_planted = draw(st.integers(0, 3))
    planted = sorted({draw(st.integers(0, nk - 1)) for _ in range(n_planted)})
    return dict(
        shape=(bsz, hkv * group, hkv, nq, nk, dim),
        pads=pads if draw(st.booleans()) else None,
        planted=planted,
        sink_logit=draw(st.sampled_from([3.0, 6.0, 10.0])),
        beta=draw(st.sampled_from([0.0, 0.4, 0.75, 1.0])),
        tau=draw(st.sampled_from([1e-6, 0.01, 0.1, 0.3, 0.9])),
        scale=draw(st.sampled_from([None, 0.05, 0.3])),
        layout=draw(st.sampled_from(["bhnd", "bnhd"])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(case=cases())
def test_random_sweep(backend, case):
    bsz, hq, hkv, nq, nk, dim = case["shape"]
    seed = case["seed"]
    scale = case["scale"]
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=case["planted"],
                       sink_logit=case["sink_logit"], layout=case["layout"], scale=scale)
    kpm = None if case["pads"] is None else left_padding(nk, case["pads"])
    heads = random_head_mask(bsz, hq, seed=seed)
    check(backend, q, k, v, heads=heads, beta=case["beta"], tau=case["tau"], scale=scale,
          key_padding_mask=kpm, seed=seed)


def test_auto_backend_on_cpu_is_torch():
    q, k, v = make_qkv(2, 4, 2, 19, 19, 64, seed=67, planted=[7])
    kw = dict(heads=[1, 2], key_padding_mask=left_padding(19, [0, 4]))
    assert torch.equal(act_attention(q, k, v, backend="auto", **kw),
                       act_attention(q, k, v, backend="torch", **kw))


def test_bruteforce_agrees_with_a_hand_computed_case():
    """Guard the brute force itself on a case small enough to work out by hand.

    Nq = Nk = 3, one head, scale 1, q = 0 except the last row: rows 0 and 1 attend uniformly.
    Row 2 has logits (0, log 8, 0) -> P = (0.1, 0.8, 0.1). Scores: key 0 = (1 + 1/2 + 0.1) / 3,
    key 1 = (1/2 + 0.8) / 2 = 0.65, key 2 = 0.1 / 1. With tau = 0.3 the sinks are {1} (key 0 is
    the first valid key). Row 1: m = 1/2, row 2: m = 0.8. With beta = 0.5, row 2 becomes
    (0.1 * 0.6 / 0.2, 0.4, 0.1 * 0.6 / 0.2) = (0.3, 0.4, 0.3).
    """
    d = 3
    q = torch.zeros(1, 1, 3, d, dtype=torch.float64)
    k = torch.zeros(1, 1, 3, d, dtype=torch.float64)
    q[0, 0, 2, 0] = math.log(8.0)
    k[0, 0, 1, 0] = 1.0
    v = torch.eye(3, dtype=torch.float64)[None, None]
    out, scores, sinks, mass = act_bruteforce(q, k, v, torch.tensor([[True]]), 0.5, 0.3, 1.0)
    torch.testing.assert_close(scores[0, 0],
                               torch.tensor([1.6 / 3, 0.65, 0.1], dtype=torch.float64))
    assert sinks[0, 0].tolist() == [False, True, False]
    torch.testing.assert_close(mass[0, 0], torch.tensor([0.0, 0.5, 0.8], dtype=torch.float64))
    # row 1: (0.5, 0.5) -> sink keeps 0.25, key 0 gets 0.75
    torch.testing.assert_close(out[0, 0], torch.tensor(
        [[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.3, 0.4, 0.3]], dtype=torch.float64))
