"""The CPU decode step's calibrated rows in one compiled loop (``torch_backend/cpu_rows.py``,
issue 22): against the float64 brute force (both ways of step 4, the underflow edges), every row
it does not change bit for bit the plain step, taken exactly where its rule says, and without
numba the torch step with a warning."""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention
from act_kernels.torch_backend import cpu_rows, decode
from bruteforce import bruteforce_details
from helpers.compare import TOLS, assert_out_close, check
from inputs import left_padding, make_qkv


@pytest.fixture
def taken(monkeypatch):
    """The loop's thresholds opened (any share of rows, any length below the direct way); yields
    the list of row counts of the loop's calls in the test."""
    monkeypatch.setattr(cpu_rows, "MAX_ROW_SHARE", 1)
    monkeypatch.setattr(cpu_rows, "MAX_ROW_KEYS", 1 << 40)
    return spy_loop(monkeypatch)


def spy_loop(monkeypatch):
    calls = []
    real = cpu_rows.calibrate

    def spy(q, k, v, out, rows, *args):
        calls.append(len(rows))
        return real(q, k, v, out, rows, *args)
    monkeypatch.setattr(cpu_rows, "calibrate", spy)
    return calls


def mixed_heads(bsz, hq, seed):
    gen = torch.Generator().manual_seed(seed)
    heads = torch.rand(bsz, hq, generator=gen) < 0.5
    heads[0, 0], heads[-1, -1] = True, False
    return heads


CASES = [  # bsz, hq, hkv, nk, dim (g = 1, 3, 4, 7, 8)
    (1, 9, 3, 67, 64),
    (2, 7, 7, 30, 80),
    (3, 8, 2, 41, 16),
    (2, 7, 1, 95, 24),
    (1, 8, 1, 53, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_the_loop_is_the_bruteforce(taken, case, dtype, layout):
    bsz, hq, hkv, nk, dim = case
    q, k, v = make_qkv(bsz, hq, hkv, 1, nk, dim, seed=nk * hq, planted=(nk // 3, nk - 2),
                       sink_logit=5.0, dtype=dtype, layout=layout)
    heads = mixed_heads(bsz, hq, nk)
    _, _, bf = check("torch", q, k, v, heads=heads, tau=0.05)   # the loop is its out-only call
    assert taken == [int(heads.sum())]                       # the loop took the calibrated rows
    assert bool(bf.changed[heads].any())                     # and had work to do
    out = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
    plain = act_attention(q, k, v, backend="torch")
    same = ~heads | ~bf.changed[..., 0]                      # uncalibrated, or no sink
    assert bool(same.any()) and torch.equal(out[same], plain[same])


@pytest.mark.parametrize("sink_logit, how", [
    (3.0, "identity: r >= 0.2"),
    (9.0, "recomputed: r < 0.2"),
    (150.0, "recomputed: r ~ e^-150"),
    (650.0, "recomputed against the non-sink max: e_j subnormal"),
    (800.0, "no non-sink mass even in float64: plain"),
])
def test_each_way_of_the_non_sink_part(taken, sink_logit, how):
    q, k, v = make_qkv(2, 6, 2, 1, 71, 16, seed=43, planted=(30,), sink_logit=sink_logit)
    heads = torch.tensor([[True, False, False, True, False, False],
                          [False, True, False, False, False, True]])
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, None, None)
    out = act_attention(q, k, v, heads=heads, backend="torch")
    assert taken == [4]
    assert bool(bf.sinks[heads].any(-1).all()), how         # every calibrated row has the sink
    rest = bf.rest[heads]
    plain = act_attention(q, k, v, backend="torch")
    assert torch.equal(out[~heads], plain[~heads])
    if sink_logit == 800.0:                                  # the spec's unchanged rows
        assert bool((rest == 0).all()) and torch.equal(out, plain)
        return
    assert bool((rest >= 0.2).all() if sink_logit == 3.0 else (rest < 0.2).all()), how
    # strict: a row whose non-sink mass underflows float32 is still the float64 rule
    torch.testing.assert_close(out.double(), bf.out, rtol=1e-5, atol=2e-5)
    assert float((out[heads] - plain[heads]).abs().max()) > 1e-3


def test_the_first_key_is_never_a_sink(taken):
    """Key 0 takes most of every row (P > tau) and no other key does: nothing changes."""
    q, k, v = make_qkv(1, 6, 2, 1, 40, 16, seed=5, planted=(0,), sink_logit=8.0)
    out = act_attention(q, k, v, heads=[0, 2, 5], tau=0.3, backend="torch")
    assert taken == [3]
    assert torch.equal(out, act_attention(q, k, v, backend="torch"))


def test_an_in_place_edit_of_the_heads_mask_is_seen(taken):
    q, k, v = make_qkv(1, 6, 3, 1, 33, 16, seed=9, planted=(11,), sink_logit=5.0)
    heads = torch.zeros(1, 6, dtype=torch.bool)
    heads[0, 1] = True
    first = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
    heads[0, 4] = True                                       # the same tensor, edited
    second = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
    assert taken == [1, 2]
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.05, None, None)
    assert_out_close(second, bf, v, TOLS[torch.float32], "after the edit")
    assert torch.equal(first[0, 1], second[0, 1]) and not torch.equal(first[0, 4], second[0, 4])


def test_a_cache_slice_and_no_calibrated_row(taken):
    """k and v as a slice of a longer cache (non-contiguous), and a heads mask with no row."""
    q, k, v = make_qkv(2, 4, 2, 1, 90, 16, seed=13, planted=(20,), sink_logit=5.0)
    k, v = k[:, :, :61], v[:, :, :61]
    heads = torch.tensor([[True, False, False, False], [False, False, True, False]])
    out = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.05, None, None)
    assert_out_close(out, bf, v, TOLS[torch.float32], "cache slice")
    none = act_attention(q, k, v, heads=torch.zeros(2, 4, dtype=torch.bool), backend="torch")
    assert torch.equal(none, act_attention(q, k, v, backend="torch"))
    assert taken[0] == 2


def test_the_loop_is_taken_exactly_where_its_rule_says(monkeypatch):
    taken = spy_loop(monkeypatch)
    nk = 500
    q, k, v = make_qkv(1, 9, 3, 1, nk, 64, seed=3, planted=(100,), sink_logit=5.0)

    def runs(q=q, k=k, v=v, heads=(2, 6), **kw):
        taken.clear()
        act_attention(q, k, v, heads=list(heads), backend="torch", **kw)
        return bool(taken)

    assert runs()                                            # 2 of 9 rows, 1000 row-keys
    assert not runs(heads=(1, 2, 6))                         # 3 of 9 > 1/4 of the rows
    wide = make_qkv(1, 32, 8, 1, 1100, 16, seed=3)         # the row-keys cap: 8192
    assert runs(*wide, heads=range(7))                       # 7 x 1100 = 7700
    assert not runs(*wide, heads=range(8))                   # 8 x 1100 = 8800
    assert not runs(return_stats=True)
    assert not runs(key_padding_mask=left_padding(nk, [3]))
    assert not runs(attn_mask=torch.ones(1, 1, 1, nk, dtype=torch.bool))
    for dtype in (torch.bfloat16, torch.float16):
        assert not runs(q.to(dtype), k.to(dtype), v.to(dtype))
    with torch.enable_grad():      # the op's differentiable call runs the backend without grad
        assert runs(q.clone().requires_grad_(), k, v)
    monkeypatch.setattr(decode, "DIRECT_MIN_KEYS", nk)       # the direct way reads k once
    assert not runs()


def test_without_numba_the_torch_step_runs_with_a_warning(monkeypatch):
    q, k, v = make_qkv(1, 8, 2, 1, 45, 16, seed=21, planted=(7,), sink_logit=5.0)
    monkeypatch.setattr(cpu_rows, "MAX_ROW_KEYS", 0)
    want = act_attention(q, k, v, heads=[3], tau=0.05, backend="torch")     # the torch step
    monkeypatch.undo()
    monkeypatch.setattr(cpu_rows, "numba", None)
    with pytest.warns(RuntimeWarning, match="numba is not installed"):
        got = act_attention(q, k, v, heads=[3], tau=0.05, backend="torch")
    assert torch.equal(got, want)


def test_numba_is_there_for_the_tests():
    """The dev requirements install numba: without it the tests above would test the torch
    step twice."""
    assert cpu_rows.numba is not None and cpu_rows._calibrate_rows is not None


def test_non_sink_logits_far_below_the_sink_are_recomputed(taken):
    """The non-sink logits 740 below the sink's: their ``exp(s_j - M)`` are subnormal (a few
    bits), so the loop recomputes them against their own max; the row is ``beta v_sink +
    (1 - beta) softmax(non-sink logits) v`` (``m = 1`` in float64, ``r ~ e^-736`` is not 0)."""
    gen = torch.Generator().manual_seed(17)
    nk, dim, sink = 70, 16, 23
    logits = torch.rand(nk, generator=gen, dtype=torch.float64)
    logits[sink] = 741.0
    q = torch.zeros(1, 2, 1, dim)
    q[..., 0] = 1.0
    k = torch.randn(1, 1, nk, dim, generator=gen)
    k[0, 0, :, 0] = logits.float()
    v = torch.randn(1, 1, nk, dim, generator=gen)
    out = act_attention(q, k, v, heads=[1], scale=1.0, backend="torch")
    assert taken == [1]
    s = k[0, 0, :, 0].double()
    rest = torch.ones(nk, dtype=torch.bool)
    rest[sink] = False
    assert -744 < float(torch.logsumexp(s[rest], 0) - torch.logsumexp(s, 0)) < -730
    want = 0.4 * v[0, 0, sink].double() + 0.6 * torch.softmax(s[rest], 0) @ v[0, 0, rest].double()
    torch.testing.assert_close(out[0, 1, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_a_backend_call_that_builds_a_graph_keeps_the_torch_step(monkeypatch):
    """Called with q requiring grad in grad mode (the backend entry, not the op's differentiable
    call), the loop's in-place rows would be invisible to autograd: the torch step runs."""
    from act_kernels.torch_backend import act_attention_torch
    taken = spy_loop(monkeypatch)
    q, k, v = make_qkv(1, 8, 2, 1, 45, 16, seed=31, planted=(7,), sink_logit=5.0)
    heads = torch.zeros(1, 8, dtype=torch.bool)
    heads[0, 3] = True
    grads = []
    for loop in (True, False):
        monkeypatch.setattr(cpu_rows, "MAX_ROW_KEYS", 8192 if loop else 0)
        qq = q.clone().requires_grad_()
        with torch.enable_grad():
            out, _ = act_attention_torch(qq, k, v, heads, 0.4, 0.05, 0.25, None, False)
            out.square().sum().backward()
        grads.append(qq.grad)
    assert taken == []
    assert torch.equal(grads[0], grads[1])


def test_without_a_place_to_cache_the_loop_still_compiles():
    """numba refuses ``cache=True`` where it finds no writable cache location (here: a function
    with no source file); the module then compiles per process instead of failing to import."""
    namespace = {}
    exec("def bump(x):\n    return x + 1\n", namespace)
    assert cpu_rows.compiled(namespace["bump"])(41) == 42
