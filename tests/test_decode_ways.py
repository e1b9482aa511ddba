"""The torch decode step's two ways (fused SDPA below ``DIRECT_MIN_KEYS`` keys, the direct
product from there on; issue 22): each against the float64 brute force, uncalibrated rows bit for
bit the ``heads=None`` step of the same way, and the way chosen by the number of keys alone."""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention
from act_kernels.torch_backend import cpu_rows, decode
from bruteforce import bruteforce_details
from helpers.compare import TOLS, check
from inputs import left_padding, make_qkv

WAYS = {  # DIRECT_MIN_KEYS, and whether the CPU loop may take the calibrated rows
    "fused": (1 << 40, False), "fused+loop": (1 << 40, True), "direct": (1, False)}


@pytest.fixture(params=list(WAYS))
def way(request, monkeypatch):
    """Every decode step of the test takes this way (the thresholds moved, nothing else): the
    fused way with its calibration by torch ops or (where the call qualifies: no mask, no
    statistics, float32/64) by the CPU loop of ``cpu_rows``, or the direct way."""
    direct_min, loop = WAYS[request.param]
    monkeypatch.setattr(decode, "DIRECT_MIN_KEYS", direct_min)
    monkeypatch.setattr(cpu_rows, "MAX_ROW_KEYS", 1 << 40 if loop else 0)
    monkeypatch.setattr(cpu_rows, "MAX_ROW_SHARE", 1)
    return request.param


CASES = [  # bsz, hq, hkv, nk, dim, pads (None: no padding; nk: the query itself padded)
    (1, 9, 3, 67, 64, None),
    (2, 6, 2, 83, 24, (0, 9)),
    (3, 8, 1, 41, 16, (5, 0, 41)),
    (2, 7, 7, 30, 80, (0, 29)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_each_way_is_the_bruteforce(way, case, dtype):
    bsz, hq, hkv, nk, dim, pads = case
    kpm = None if pads is None else left_padding(nk, list(pads))
    q, k, v = make_qkv(bsz, hq, hkv, 1, nk, dim, seed=nk + hq, planted=(nk // 3, nk - 4),
                       sink_logit=5.0, dtype=dtype)
    heads = torch.zeros(bsz, hq, dtype=torch.bool)
    heads[:, ::2] = True
    heads[-1, 1] = True
    out, stats, bf = check("torch", q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm)
    assert bool(bf.sinks[heads].any())                      # the calibration had work to do
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend="torch")
    assert torch.equal(out[~heads], plain[~heads])
    if pads is not None and nk in pads:                      # a padded query's row is 0
        assert not bool(out[list(pads).index(nk)].any())


def test_underflowing_non_sink_mass_in_each_way(way):
    q, k, v = make_qkv(2, 6, 2, 1, 71, 16, seed=43, planted=(30,), sink_logit=150.0)
    heads = torch.tensor([[True, False, False, True, False, False],
                          [False, True, False, False, False, True]])
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, None, None)
    out = act_attention(q, k, v, heads=heads, backend="torch")
    torch.testing.assert_close(out.double(), bf.out, rtol=1e-5, atol=2e-5)
    plain = act_attention(q, k, v, backend="torch")
    assert torch.equal(out[~heads], plain[~heads])
    assert float((out[heads] - plain[heads]).abs().max()) > 0.1


@pytest.mark.parametrize("heads", [None, [1, 4]], ids=["plain", "calibrated"])
def test_the_way_follows_the_number_of_keys_alone(heads, monkeypatch):
    """At the real threshold: one key fewer takes the fused way, the threshold the direct one,
    whether or not a head is calibrated; both are the brute force."""
    taken = []
    for name in ("attend", "weigh"):
        real = getattr(decode, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            taken.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(decode, name, spy)
    n = decode.DIRECT_MIN_KEYS
    for nk, want in ((n - 1, "attend"), (n, "weigh")):
        q, k, v = make_qkv(1, 6, 2, 1, nk, 16, seed=nk, planted=(nk // 2,), sink_logit=9.0)
        taken.clear()
        out = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
        assert taken == [want]
        mask = None if heads is None else torch.tensor([[h in heads for h in range(6)]])
        bf = bruteforce_details(q, k, v, mask, 0.4, 0.05, None, None)
        tol = TOLS[torch.float32]
        torch.testing.assert_close(out.double(), bf.out, rtol=tol.out_rtol,
                                   atol=tol.out_atol * float(v.abs().max()))


@pytest.mark.parametrize("shape", ["B,1,Nk", "1,1,Nk", "B,1,1,Nk"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-pad", "pad"])
def test_a_decode_step_under_a_general_mask_is_the_bruteforce(way, shape, padded):
    """The row's visible keys are its real keys: the first one is never a sink (here not the
    sequence's first key), a row that sees nothing is 0, and keys past an unseen gap count."""
    bsz, hq, hkv, nk, dim = 3, 6, 2, 37, 16
    q, k, v = make_qkv(bsz, hq, hkv, 1, nk, dim, seed=61, planted=(5, 12, 30), sink_logit=5.0)
    gen = torch.Generator().manual_seed(61)
    mask = torch.rand(bsz, 1, nk, generator=gen) < 0.6
    mask[0, 0, :3] = False                   # row 0: the first key it sees is not key 0
    mask[0, 0, [3, 12, 30]] = True
    mask[1, 0, :] = False                    # row 1 sees nothing
    if shape.startswith("1"):
        mask = mask[:1]
    elif shape == "B,1,1,Nk":
        mask = mask[:, None]
    kpm = left_padding(nk, [0, 2, 4]) if padded else None
    heads = torch.zeros(bsz, hq, dtype=torch.bool)
    heads[:, [0, 3, 4]] = True
    out, stats, bf = check("torch", q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm,
                           attn_mask=mask)
    assert bool(bf.sinks[heads].any())
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend="torch", attn_mask=mask)
    assert torch.equal(out[~heads], plain[~heads])
    if not shape.startswith("1"):
        assert not bool(out[1].any())         # the row that sees nothing
