"""Triton backend (kernels through the interpreter on CPU): every kernel against the eager
reference and a float64 brute force, on small odd shapes so the file stays fast.

Output tolerances are relative to the magnitude of v (an attention output, calibrated or not, is
a convex combination of v rows), so they mean the same thing whatever the scale of the inputs.
"""
import math
import os
import random

import pytest
import torch

from helpers.optional import import_optional

triton = import_optional("triton", "triton")

from act_kernels import act_attention, calibration  # noqa: E402
from act_kernels.reference import act_attention_reference  # noqa: E402

from act_kernels import triton_backend as tb  # noqa: E402
from act_kernels.kernels import column_scores as cs_mod  # noqa: E402
from act_kernels.kernels import configs, decode  # noqa: E402
from act_kernels.kernels.flash_forward import flash_forward  # noqa: E402

from bruteforce import act_bruteforce  # noqa: E402  (the independent float64 judge)
from inputs import left_padding, make_qkv, random_head_mask, random_pads  # noqa: E402
from helpers.compare import (assert_stats_calibrated_is_fresh,  # noqa: E402
                             check)  # (the op-level comparison with the brute force)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                                and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

# output error allowed, relative to max |v|
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def brute(q, k, v, heads, beta, tau, kpm):
    """(out64, scores, sinks, sink_mass) in float64 from the exact inputs the kernels read."""
    return act_bruteforce(q, k, v, heads, beta, tau, None, kpm)


def out_error(out, want, v):
    """max |out - want| in units of max |v| (the scale of every attention output)."""
    return ((out.double() - want.double()).abs().max() / v.double().abs().max()).item()


def triton_act(q, k, v, heads=None, beta=0.4, tau=0.1, kpm=None, stats=False):
    return act_attention(q, k, v, heads=heads, beta=beta, tau=tau, key_padding_mask=kpm,
                         backend="triton", return_stats=stats)


def padded_rows(kpm, nq, nk):
    return ~kpm[:, nk - nq:]


# ---------------------------------------------------------------------------------------------
# 1. the plain forward kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,nk,group,dim", [(17, 17, 1, 16), (5, 33, 3, 64), (33, 33, 3, 40),
                                             (2, 18, 1, 128)])
def test_forward_output_and_lse(nq, nk, group, dim):
    q, k, v = make_qkv(2, 3, 3 // group, nq, nk, dim, seed=nq + nk + dim)
    kpm = left_padding(nk, [0, 4])
    bsz, hq = 2, 3
    scale = dim ** -0.5
    fv = torch.tensor([0, 4], dtype=torch.int32)
    out, lse2, _ = flash_forward(q, k, v, scale, kpm.to(torch.int8), fv,
                                 torch.full((bsz * hq,), -1, dtype=torch.int32), 0)
    ref, _, _, _ = brute(q, k, v, None, 0.4, 0.1, kpm)
    assert out_error(out, ref, v) <= 2e-5
    # natural-log LSE of the visible logits, for the real rows
    grp = hq // k.shape[1]
    logits = scale * torch.einsum("bhid,bhjd->bhij", q.double(),
                                  k.double().repeat_interleave(grp, 1))
    rows = torch.arange(nk - nq, nk)[:, None]
    sees = (torch.arange(nk)[None, :] <= rows)[None] & kpm[:, None, :] & kpm[:, nk - nq:, None]
    lse_ref = torch.logsumexp(logits.masked_fill(~sees[:, None], float("-inf")), -1)
    lse = (lse2.view(bsz, hq, nq).double() * math.log(2.0))
    real = ~padded_rows(kpm, nq, nk)[:, None, :].expand(bsz, hq, nq)
    assert torch.allclose(lse[real], lse_ref[real], atol=1e-5)
    assert torch.isinf(lse[~real]).all() and (lse[~real] > 0).all()
    assert (out.transpose(1, 2)[padded_rows(kpm, nq, nk)] == 0).all()


# ---------------------------------------------------------------------------------------------
# 2.-3. column scores, sink selection, correction: whole op against reference and brute force
# ---------------------------------------------------------------------------------------------
CASES = [  # (nq, nk, hq, hkv, dim)
    (33, 33, 3, 3, 16),   # prefill, Nq == Nk
    (5, 33, 3, 1, 64),    # chunked prefill, GQA 3
    (1, 17, 3, 1, 16),    # decode, GQA 3
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq,nk,hq,hkv,dim", CASES)
def test_act_matches_reference_and_bruteforce(nq, nk, hq, hkv, dim, dtype):
    bsz = 2
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=7 + nq, dtype=dtype,
                       planted=(9, nk - 3), sink_logit=4.0, layout="bnhd")
    kpm = left_padding(nk, [0, 5])
    heads = random_head_mask(bsz, hq, seed=nq)
    out, st = triton_act(q, k, v, heads, kpm=kpm, stats=True)
    out64, scores, sinks, mass = brute(q, k, v, heads, 0.4, 0.1, kpm)
    ref_out, _, ref_st = act_attention_reference(q, k, v, heads=heads, beta=0.4, tau=0.1,
                                                 key_padding_mask=kpm)

    assert out.dtype == dtype and out.shape == q.shape and not out.isnan().any()
    assert bool(sinks[:, :, 9].all()), "planted sink not detected by the brute force"
    assert torch.equal(st.sinks.cpu(), sinks), "sink sets differ from the brute force"
    assert torch.equal(st.sinks, ref_st["sinks"])
    assert torch.equal(st.calibrated, heads)
    assert torch.allclose(st.scores.double(), scores, atol=1e-5)
    assert torch.allclose(st.sink_mass.double(), mass, atol=1e-5)
    assert torch.allclose(st.scores, ref_st["scores"], atol=1e-5)
    tol = TOL[dtype]
    assert out_error(out, out64, v) <= tol
    assert out_error(out, ref_out, v) <= 2 * tol
    # calibration really changed the calibrated heads (else the test proves nothing)
    plain = triton_act(q, k, v, None, kpm=kpm)
    assert out_error(out[heads], plain[heads], v) > 10 * tol


@pytest.mark.parametrize("nq", [1, 9], ids=["decode", "prefill"])
@pytest.mark.parametrize("spelling", ["bool [B, Hq]", "bool [Hq]", "index list"])
def test_stats_calibrated_is_a_fresh_copy_of_the_requested_pairs(spelling, nq):
    """Editing ``stats.calibrated`` changes no later call (it once was the heads mask itself)."""
    assert_stats_calibrated_is_fresh("triton", spelling, nq=nq)


def test_stats_without_calibration_fill_every_head():
    q, k, v = make_qkv(1, 2, 2, 17, 17, 16, seed=3, planted=(6,))
    out, st = triton_act(q, k, v, None, stats=True)
    _, scores, sinks, mass = brute(q, k, v, None, 0.4, 0.1, None)
    assert not st.calibrated.any()
    assert bool(sinks[..., 6].all()) and torch.equal(st.sinks, sinks)
    assert torch.allclose(st.sink_mass.double(), mass, atol=1e-5)
    assert torch.allclose(st.scores.double(), scores, atol=1e-5)
    assert torch.equal(out, triton_act(q, k, v, None))


# ---------------------------------------------------------------------------------------------
# uncalibrated heads: bit for bit the plain path; and no column work for them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq,nk,tau", [(17, 33, 0.1), (1, 40, 0.1), (1, 40, 0.01)])
def test_uncalibrated_heads_bit_identical(nq, nk, tau):
    q, k, v = make_qkv(2, 4, 2, nq, nk, 16, seed=11, dtype=torch.bfloat16, planted=(5,))
    kpm = left_padding(nk, [0, 3])
    heads = random_head_mask(2, 4, seed=1)
    plain = triton_act(q, k, v, None, tau=tau, kpm=kpm)
    out = triton_act(q, k, v, heads, tau=tau, kpm=kpm)
    assert torch.equal(out[~heads], plain[~heads])
    assert not torch.equal(out[heads], plain[heads])


def spy_launches(monkeypatch, module):
    """Wrap ``module.launch`` (the kernel module's launcher): returns the list of launches it
    sees, each ``(kernel, grid as launched, args, kwargs)``."""
    seen = []
    real = module.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel, grid(kwargs) if callable(grid) else grid, args, kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(module, "launch", spy)
    return seen


def test_uncalibrated_heads_launch_no_column_work(monkeypatch):
    nk = 33
    q, k, v = make_qkv(2, 4, 4, 9, nk, 16, seed=5, planted=(4,))
    launches = spy_launches(monkeypatch, cs_mod)
    triton_act(q, k, v, None)
    assert launches == []
    heads = torch.zeros(2, 4, dtype=torch.bool)
    heads[1, 2] = True                                  # one (b, h) pair out of 8
    triton_act(q, k, v, heads)
    assert len(launches) == 1
    assert launches[0][1] == (math.ceil(nk / configs.INTERP_BLOCK), 1)


# ---------------------------------------------------------------------------------------------
# decode: the one-pass candidate kernel equals the general path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nk,hkv,split", [(1, 2, None), (70, 2, None), (70, 1, 16), (45, 2, 64)])
def test_decode_kernel_equals_general_path(nk, hkv, split, monkeypatch):
    bsz, hq = 2, 2
    launches = spy_launches(monkeypatch, decode)
    planted = (nk // 3, nk - 5) if nk > 8 else ()
    q, k, v = make_qkv(bsz, hq, hkv, 1, nk, 16, seed=nk, planted=planted, sink_logit=3.0)
    kpm = left_padding(nk, [0, nk // 4])
    heads = torch.ones(bsz, hq, dtype=torch.bool)
    first = tb.first_valid_index(kpm, bsz, q.device).to(torch.int32)
    no_slot = torch.full((bsz * hq,), -1, dtype=torch.int32)
    fast, _, _, mass = decode.decode_attention(
        q, k, v, q.shape[-1] ** -0.5, kpm.to(torch.int8), first, no_slot, 0,
        calibrated=heads.reshape(-1).to(torch.int8), beta=0.4, tau=0.1, split_size=split)
    overflow = launches[0][2][11]          # the split kernel's per-row overflow flags
    assert launches[0][0] is decode._decode_split_kernel and not overflow.any()
    general, st = triton_act(q, k, v, heads, kpm=kpm, stats=True)   # stats -> general path
    assert out_error(fast, general, v) <= 2e-6
    assert torch.allclose(mass.view(bsz, hq), st.sink_mass[..., 0], atol=2e-6)
    out64, _, sinks, _ = brute(q, k, v, heads, 0.4, 0.1, kpm)
    assert out_error(fast, out64, v) < 2e-5
    if planted:
        assert sinks.any(-1).all()         # every head has a sink to correct
    # the op takes this one-pass kernel (Nq == 1, calibrated heads, no stats) with the default
    # split, so it equals a direct call with that split bit for bit ...
    via_op = triton_act(q, k, v, heads, kpm=kpm)
    default_split, _, _, _ = decode.decode_attention(
        q, k, v, q.shape[-1] ** -0.5, kpm.to(torch.int8), first, no_slot, 0,
        calibrated=heads.reshape(-1).to(torch.int8), beta=0.4, tau=0.1)
    assert torch.equal(via_op, default_split)
    # ... and another split only changes the order of the fp32 sums
    assert out_error(via_op, fast, v) <= 2e-6


def test_decode_many_candidates_and_small_tau_fallback():
    # five planted keys of similar weight: several candidates live in one buffer
    nk = 50
    q, k, v = make_qkv(1, 2, 2, 1, nk, 16, seed=2, planted=(3, 11, 20, 31, 44), sink_logit=4.0)
    for tau in (0.05, 0.1, 0.01):       # 0.01 needs > MAX_CAND slots: general path
        out = triton_act(q, k, v, [0, 1], tau=tau)
        out64, _, sinks, _ = brute(q, k, v, torch.ones(1, 2, dtype=torch.bool), 0.4, tau, None)
        assert sinks.sum() >= 4
        assert out_error(out, out64, v) < 2e-5, tau
    assert decode.candidate_slots(0.01) is None and decode.candidate_slots(0.1) == 16


# ---------------------------------------------------------------------------------------------
# numerics: rows almost entirely on sinks (1 - m < STABLE_REST) are recomputed directly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sink_logit", [12.0, 95.0])   # 1 - m ~ 1e-3 .. 1e-6; ~1e-40 (subnormal)
@pytest.mark.parametrize("nq,nk", [(21, 21), (1, 37)])
def test_dominant_sink_rows_are_accurate(nq, nk, sink_logit, monkeypatch):
    q, k, v = make_qkv(1, 2, 2, nq, nk, 16, seed=4, planted=(2,), sink_logit=sink_logit)
    heads = torch.ones(1, 2, dtype=torch.bool)
    out = triton_act(q, k, v, heads)
    out64, _, sinks, mass = brute(q, k, v, heads, 0.4, 0.1, None)
    assert (1 - mass[..., -1] < 0.01).all(), "test needs rows with 1 - m < STABLE_REST"
    # the non-sink part is scaled by (1 - beta m) / (1 - m) >= 100x: still accurate, because
    # those rows take a softmax over the non-sink keys
    assert out_error(out, out64, v) < 2e-6
    # ... and it is the direct recompute that makes it so: without it u - w cancels (measured:
    # 9e-5 .. 0.8 of max |v|, against < 5e-7 with it)
    monkeypatch.setitem(calibration.STABLE_REST, torch.float32, 0.0)    # what the kernels get
    unguarded = triton_act(q, k, v, heads)
    assert out_error(unguarded, out64, v) > 5e-5


# ---------------------------------------------------------------------------------------------
# masking, padding, layouts, head dims, errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq", [1, 9, 20])
def test_padded_rows_are_zero_never_nan(nq):
    nk = 20
    q, k, v = make_qkv(3, 2, 1, nq, nk, 16, seed=nq, planted=(12,))
    kpm = left_padding(nk, [0, 15, 19])      # row 2: only the last key is real
    heads = torch.ones(3, 2, dtype=torch.bool)
    out, st = triton_act(q, k, v, heads, kpm=kpm, stats=True)
    assert torch.isfinite(out).all() and torch.isfinite(st.scores).all()
    pad = padded_rows(kpm, nq, nk)
    assert (out.transpose(1, 2)[pad] == 0).all()
    assert (st.sink_mass.transpose(1, 2)[pad] == 0).all()
    out64, _, _, _ = brute(q, k, v, heads, 0.4, 0.1, kpm)
    assert out_error(out, out64, v) < 2e-5
    fast = triton_act(q, k, v, heads, kpm=kpm)
    assert torch.isfinite(fast).all() and out_error(fast, out64, v) < 2e-5


def test_noncontiguous_inputs_read_through_strides():
    q, k, v = make_qkv(2, 3, 3, 7, 19, 16, seed=8, planted=(4,), layout="bnhd")
    assert not k.is_contiguous()
    heads = torch.tensor([True, False, True])
    a = triton_act(q, k, v, heads)
    b = triton_act(q.contiguous(), k.contiguous(), v.contiguous(), heads)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dim", [24, 128])
def test_other_head_dims(dim):
    q, k, v = make_qkv(1, 2, 2, 6, 11, dim, seed=dim, planted=(3,), dtype=torch.float16)
    heads = torch.tensor([True, False])
    out = triton_act(q, k, v, heads)
    out64, _, _, _ = brute(q, k, v, heads[None], 0.4, 0.1, None)
    assert out_error(out, out64, v) < TOL[torch.float16]


def test_clear_errors(monkeypatch):
    q, k, v = make_qkv(1, 1, 1, 3, 3, 16, seed=0)
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        triton_act(q.double(), k.double(), v.double())
    big = torch.zeros(1, 1, 2, 264)
    with pytest.raises(RuntimeError, match=r"head dim D=264.*supported head dims are 1\.\.256"):
        triton_act(big, big, big)
    monkeypatch.setattr(configs, "is_interpreted", lambda kernel: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before importing triton.*"
                                           "backend='torch'"):
        triton_act(q, k, v)


# ---------------------------------------------------------------------------------------------
# randomized sweep: shapes, GQA, padding, heads, dtypes, beta/tau/scale, layouts
# ---------------------------------------------------------------------------------------------
def sweep_cases(n_cases: int, seed: int):
    """Fixed-seed random cases at sizes the interpreter runs in a few seconds each: prefill,
    decode and chunked prefill, GQA groups 1-3, padded and unpadded batches, per-row head masks,
    head lists, every dtype. Lengths are odd or just past a 16-block to exercise tail masks."""
    rng = random.Random(seed)
    for i in range(n_cases):
        nk = rng.choice([1, 2, 7, 17, 31, 40])
        nq = rng.choice([nk, 1, rng.randint(1, nk)])
        group, hkv = rng.choice([(1, 1), (1, 2), (3, 1), (2, 2)])
        bsz = rng.randint(1, 3)
        yield pytest.param(dict(
            shape=(bsz, group * hkv, hkv, nq, nk, rng.choice([16, 24, 64])),
            dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]),
            pads=random_pads(bsz, nk, seed=seed + i) if rng.random() < 0.6 else None,
            planted=sorted(rng.sample(range(nk), min(nk, rng.randint(0, 2)))),
            heads=rng.choice(["per-row", "list", "none"]),
            beta=rng.choice([0.0, 0.4, 1.0]), tau=rng.choice([0.01, 0.1, 0.3]),
            scale=rng.choice([None, 0.3]), layout=rng.choice(["bhnd", "bnhd"]),
            seed=seed + i), id=f"case{i}")


@pytest.mark.parametrize("case", list(sweep_cases(10, seed=2026)))
def test_random_sweep(case):
    bsz, hq, hkv, nq, nk, dim = case["shape"]
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=case["seed"], dtype=case["dtype"],
                       planted=case["planted"], layout=case["layout"], scale=case["scale"])
    kpm = None if case["pads"] is None else left_padding(nk, case["pads"])
    heads = {"per-row": random_head_mask(bsz, hq, seed=case["seed"]),
             "list": list(range(0, hq, 2)), "none": None}[case["heads"]]
    check("triton", q, k, v, heads=heads, beta=case["beta"], tau=case["tau"],
          scale=case["scale"], key_padding_mask=kpm, seed=case["seed"])
