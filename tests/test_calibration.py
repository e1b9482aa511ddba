"""The calibration rule and its one table of thresholds (``act_kernels/calibration.py``): the
identity on small tensors against float64, which threshold each path asks for, and that the
Triton kernels are launched with the table's value."""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention, calibration
from act_kernels.calibration import (SUMMED, STABLE_REST, calibrate_rows, recalibrate_rows,
                                     sink_logit_shift)
from bruteforce import bruteforce_details
from inputs import make_qkv


def test_the_table_keys_every_source_the_backends_meet():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert 0.0 < calibration.stable_rest(dtype) < 1.0
    # a plain output rounded to half precision needs the wider margin; sums need almost none
    assert calibration.stable_rest(torch.float16) > calibration.stable_rest(torch.float32)
    assert calibration.stable_rest(torch.bfloat16) == calibration.stable_rest(torch.float16)
    assert calibration.stable_rest(SUMMED) < 1e-10
    with pytest.raises(KeyError):
        calibration.stable_rest(torch.int8)


def test_calibrate_rows_is_the_rule_in_float64():
    """Rows of every kind: m = 0, ordinary m, m near 1 (flagged), 1 - m rounded to 0 (flagged,
    kept), and the recomputed rows' combination."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    n = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mass = torch.tensor([0.0, 0.3, 0.7, 0.95, 1.0, 0.1], dtype=torch.float64)[:, None]
    u = w + n
    beta = 0.4
    rows, redo = calibrate_rows(u, w, n, mass, 1.0 - mass, beta, torch.float32)
    want = beta * w + (1 - beta * mass) / (1 - mass).clamp(min=1e-300) * n
    assert torch.equal(rows[0], u[0]) and torch.equal(rows[4], u[4])          # unchanged rows
    torch.testing.assert_close(rows[[1, 2, 3, 5]], want[[1, 2, 3, 5]], rtol=1e-12, atol=0)
    threshold = calibration.stable_rest(torch.float32)
    assert redo[:, 0].tolist() == [m > 0 and 1 - m < threshold for m in mass[:, 0].tolist()]
    assert redo[:, 0].tolist() == [False, False, False, True, True, False]
    average = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    rest = torch.tensor([1.0, 0.5, 0.3, 0.05, 0.0, 0.9], dtype=torch.float64)[:, None]
    fixed = recalibrate_rows(u, w, mass, average, rest, beta)
    assert torch.equal(fixed[4], u[4])                     # no non-sink mass: the plain row
    torch.testing.assert_close(fixed[3], beta * w[3] + (1 - beta * 0.95) * average[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [28.0, 200.0, 1000.0], ids=["summed", "log-space", "none"])
def test_sink_logit_shift_is_the_rule(dtype, gap):
    """The decode step's form: ``softmax(l + shift)`` is ``beta P`` on the sinks and
    ``(1 - beta m) / (1 - m) P`` off them, against float64, on rows without a sink, ordinary
    rows, a row whose sink logit leads by ``gap`` (``1 - m ~ e^-28``: summed from P; ``e^-200``:
    P's non-sink entries are 0 even in float64, so ``1 - m`` comes from the logits), and padded
    keys; beta 0 and 1 included (1 leaves every row exactly as it was)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, generator=gen, dtype=torch.float64) * 3
    logits[4, 7] = gap
    logits[5, 30:] = float("-inf")                             # padded keys
    probs = torch.softmax(logits, dim=-1)
    sinks = probs > 0.04
    sinks[:, 0] = False
    sinks[0] = False                                           # a row with no sink
    assert bool(sinks[1:].any(-1).all())
    # the true non-sink mass (and so the weights) in float64 from the logits
    log_rest = torch.logsumexp(logits.masked_fill(sinks, float("-inf")), -1, keepdim=True) \
        - torch.logsumexp(logits, -1, keepdim=True)
    rest = log_rest.exp()
    small = torch.softmax(logits.masked_fill(sinks, float("-inf")), dim=-1)   # P / (1 - m)
    assert (float(rest[4]) < calibration.stable_rest(SUMMED)) == (gap > 100)
    assert (float(rest[4]) == 0.0) == (gap == 1000.0)
    for beta in (0.0, 0.4, 0.999, 1.0):
        shift = sink_logit_shift(logits.to(dtype), probs.to(dtype), sinks, beta)
        got = torch.softmax(logits.to(dtype) + shift, dim=-1).double()
        want = torch.where(sinks, beta * probs, ((1 - beta) + beta * rest) * small)
        if gap == 1000.0:
            want[4] = probs[4]
        # float32: the logits (up to 30 here) round to ~30 eps in the exponent, and weights
        # below 1e-38 (beta = 1 with the 200 gap: P itself) underflow
        single = dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-5 if single else 1e-12,
                                   atol=1e-38 if single else 1e-300)
        assert bool((shift[~sinks] == 0).all())
        if beta == 1.0:
            assert bool((shift == 0).all())


@pytest.fixture
def sources(monkeypatch):
    """The sources the calls below ask the table about."""
    asked = []
    real = calibration.stable_rest

    def spy(source):
        asked.append(source)
        return real(source)
    monkeypatch.setattr(calibration, "stable_rest", spy)
    return asked


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_each_torch_path_asks_for_the_precision_it_starts_from(sources, monkeypatch, dtype):
    """The pruned correction starts from the output in q's dtype; the dense path and the decode
    step from direct sums of P (the decode step then recomputes from its logits)."""
    from act_kernels.torch_backend import dense

    q, k, v = make_qkv(1, 4, 2, 24, 24, 16, seed=2, planted=(5,), sink_logit=9.0, dtype=dtype)
    act_attention(q, k, v, heads=[0, 1, 2, 3], backend="torch")
    assert set(sources) == {SUMMED}
    sources.clear()
    monkeypatch.setattr(dense, "DENSE_MAX_ENTRIES", 0)
    act_attention(q, k, v, heads=[0, 1, 2, 3], backend="torch")
    assert set(sources) == {dtype}
    sources.clear()
    step, stats = act_attention(q[:, :, -1:], k, v, heads=[0, 1, 2, 3], backend="torch",
                                return_stats=True)
    assert bool(stats.sinks.any()) and set(sources) == {SUMMED}


def test_the_table_decides_which_rows_are_recomputed(monkeypatch):
    """Every path reads its threshold from the table: raised to 2 (every row with a sink
    recomputed) the outputs stay those of the float64 brute force; lowered to 0 (none), the
    pruned correction's sink-dominated rows lose digits to ``u - w``: the guard is live."""
    from act_kernels.torch_backend import dense

    q, k, v = make_qkv(1, 4, 2, 30, 30, 16, seed=8, planted=(6,), sink_logit=7.0)
    heads = torch.ones(1, 4, dtype=torch.bool)
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1)
    step_bf = bruteforce_details(q[:, :, -1:], k, v, heads, 0.4, 0.1)
    assert bool(bf.sinks.any()) and bool(step_bf.sinks.any())
    monkeypatch.setattr(calibration, "STABLE_REST", {key: 2.0 for key in STABLE_REST})
    for limit in (dense.DENSE_MAX_ENTRIES, 0):
        monkeypatch.setattr(dense, "DENSE_MAX_ENTRIES", limit)
        out = act_attention(q, k, v, heads=[0, 1, 2, 3], backend="torch")
        torch.testing.assert_close(out.double(), bf.out, rtol=1e-4, atol=2e-5)
    step = act_attention(q[:, :, -1:], k, v, heads=[0, 1, 2, 3], backend="torch")
    torch.testing.assert_close(step.double(), step_bf.out, rtol=1e-4, atol=2e-5)
    monkeypatch.setattr(calibration, "STABLE_REST", {key: 0.0 for key in STABLE_REST})
    out = act_attention(q, k, v, heads=[0, 1, 2, 3], backend="torch")      # pruned (limit 0)
    assert float((out.double() - bf.out).abs().max()) > 1e-4


@pytest.mark.parametrize("nq", [1, 13], ids=["decode", "prefill"])
def test_triton_is_launched_with_the_tables_threshold(monkeypatch, nq):
    """The correction kernel and the decode epilogue get the table's value for their float32
    ``u`` (a changed table reaches them: the value is not a copy)."""
    pytest.importorskip("triton")
    from act_kernels import triton_backend as tb

    launched = []

    def spy(real, position):
        def call(*args, **kwargs):
            launched.append(kwargs.get("stable_rest") if position is None else args[position])
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(tb, "sink_correction", spy(tb.sink_correction, 13))
    monkeypatch.setattr(tb, "decode_attention", spy(tb.decode_attention, None))
    q, k, v = make_qkv(1, 2, 1, nq, 21, 16, seed=5, planted=(4,))
    for value in (calibration.stable_rest(torch.float32), 0.375):
        monkeypatch.setitem(calibration.STABLE_REST, torch.float32, value)
        launched.clear()
        tb.act_attention_triton(q, k, v, torch.ones(1, 2, dtype=torch.bool), 0.4, 0.1, 0.25,
                                None, False)
        given = [x for x in launched if x is not None]     # the plain decode pass has none
        assert given and set(given) == {value}
