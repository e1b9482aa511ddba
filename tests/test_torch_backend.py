"""Internals of the torch backend that the op-level tests do not reach on their own."""
import os
import warnings

import pytest
import torch

from act_kernels import act_attention
from act_kernels import torch_backend as tb
from act_kernels.torch_backend import blocks, bounds, columns, plain
from act_kernels.reference import act_attention_reference
from bruteforce import bruteforce_details

# These tests are about the pruned passes: short prefills take them too (conftest.py).
pytestmark = pytest.mark.usefixtures("pruned_torch_path")


def _inputs(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("nq,nk,pad", [(37, 37, False), (19, 53, True), (64, 64, True)])
def test_blocked_plain_pass_matches_fused_kernel(nq, nk, pad, monkeypatch):
    """The device-agnostic blocked plain pass (used off the CPU) equals the fused CPU kernel."""
    q, k, v = _inputs(2, 6, 3, nq, nk, 32)
    kpm = None
    if pad:
        kpm = torch.ones(2, nk, dtype=torch.bool)
        kpm[1, :5] = False
    monkeypatch.setattr(blocks, "BLOCK_FLOATS", 256)  # force several row blocks
    out_b, lse_b = plain._plain_blocked(q, k, v, 0.3, kpm)
    out_f, lse_f = plain.plain_attention(q, k, v, 0.3, kpm)
    alive = torch.ones(2, nq, dtype=torch.bool) if kpm is None else kpm[:, nk - nq:]
    torch.testing.assert_close(out_b[alive[:, None].expand(2, 6, nq)],
                               out_f[alive[:, None].expand(2, 6, nq)], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse_b.float()[alive[:, None].expand(2, 6, nq)],
                               lse_f[alive[:, None].expand(2, 6, nq)], atol=2e-6, rtol=1e-5)
    assert torch.isfinite(out_b).all()


def test_small_blocks_give_the_same_result(monkeypatch):
    """Row blocking of the column pass and the correction does not change the answer."""
    q, k, v = _inputs(1, 4, 2, 45, 71, 16, seed=3)
    k[:, :, 20] = 3 * q.mean((1, 2))  # a planted sink
    heads = [0, 3]
    ref = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
    monkeypatch.setattr(blocks, "BLOCK_FLOATS", 64)
    monkeypatch.setattr(blocks, "MIN_BLOCK_ROWS", 1)
    small = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch")
    torch.testing.assert_close(small, ref, atol=1e-6, rtol=1e-5)


def test_rows_dominated_by_a_sink_stay_accurate():
    """m_i close to 1 (non-sink mass ~1e-4): the direct recomputation keeps fp32 accuracy."""
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, seed=5)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0) * 4
    q = q * 0.1 + direction
    k[0, 0, 7] = direction * 4  # every row past 7 puts nearly all its attention on key 7
    out = act_attention(q, k, v, heads=[0, 1], tau=0.1, backend="torch")
    exact, _, stats = act_attention_reference(q.double(), k.double(), v.double(),
                                              heads=torch.ones(1, 2, dtype=torch.bool), beta=0.4, tau=0.1)
    assert stats["sink_mass"][0, :, 10:].min() > 0.99  # the case the fallback exists for
    torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=1e-4)


def test_compiled_column_pass_equals_eager(monkeypatch):
    """torch.compile'd column block (used for large inputs) gives the eager block's sums."""
    q, k, v = _inputs(1, 3, 1, 150, 150, 32, seed=7)
    out, lse = plain.plain_attention(q, k, v, 32 ** -0.5, None)
    b_idx, h_idx = torch.tensor([0, 0]), torch.tensor([0, 2])
    neg_lse = -lse[b_idx, h_idx]
    monkeypatch.setenv("ACT_KERNELS_COMPILE", "0")
    eager = columns.column_sums(q, k, neg_lse, b_idx, h_idx, 32 ** -0.5)
    monkeypatch.setenv("ACT_KERNELS_COMPILE", "1")
    compiled = columns.column_sums(q, k, neg_lse, b_idx, h_idx, 32 ** -0.5)
    if not columns.COMPILED.enabled:  # the compile failed and warned
        pytest.fail(f"torch.compile of the column pass failed here: {columns.COMPILED.failure}")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # both are sum_i P_ij over the rows that see j: the float64 brute force's score times count
    bf = bruteforce_details(q, k, v, None, 0.4, 0.1, 32 ** -0.5, None)
    truth = bf.scores[0, [0, 2]] * torch.arange(150, 0, -1, dtype=torch.float64)
    torch.testing.assert_close(eager.double(), truth, atol=1e-5, rtol=1e-5)


def _column_inputs():
    q, k, v = _inputs(1, 3, 1, 150, 150, 32, seed=7)
    _, lse = plain.plain_attention(q, k, v, 32 ** -0.5, None)
    b_idx, h_idx = torch.tensor([0, 0]), torch.tensor([0, 2])
    return q, k, -lse[b_idx, h_idx], b_idx, h_idx


@pytest.mark.parametrize("error", [RuntimeError("boom"), torch.OutOfMemoryError("no memory"),
                                   MemoryError()], ids=["RuntimeError", "OOM", "MemoryError"])
def test_an_error_of_the_compiled_column_pass_is_raised_not_swallowed(monkeypatch, error):
    """Only a failure to compile turns compilation off: any other error of the compiled block
    (a real bug, out of memory) reaches the caller, and compilation stays on."""
    q, k, neg_lse, b_idx, h_idx = _column_inputs()
    state = columns.CompiledBlock()
    monkeypatch.setattr(columns, "COMPILED", state)
    monkeypatch.setenv("ACT_KERNELS_COMPILE", "1")

    def compiled(*args):
        raise error
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled)
    with pytest.raises(type(error)):
        columns.column_sums(q, k, neg_lse, b_idx, h_idx, 32 ** -0.5)
    assert state.enabled and os.environ["ACT_KERNELS_COMPILE"] == "1"
    assert columns.pick_column_block(150, 150) is state


def test_a_failed_compile_switches_the_compiled_column_pass_off_with_a_warning(monkeypatch):
    """The failure torch.compile raises without a working C++ compiler (an inductor error, a
    ``BackendCompilerFailed``) warns once, answers the call with the eager block and keeps it
    for the rest of the process: module state, the environment untouched."""
    from torch._inductor.exc import InvalidCxxCompiler

    q, k, neg_lse, b_idx, h_idx = _column_inputs()
    monkeypatch.setenv("ACT_KERNELS_COMPILE", "0")
    eager = columns.column_sums(q, k, neg_lse, b_idx, h_idx, 32 ** -0.5)
    state = columns.CompiledBlock()
    monkeypatch.setattr(columns, "COMPILED", state)
    monkeypatch.setenv("ACT_KERNELS_COMPILE", "1")
    calls = []

    def compiled(*args):
        calls.append(1)
        raise InvalidCxxCompiler()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled)
    with pytest.warns(UserWarning, match="torch.compile of the column pass failed"):
        got = columns.column_sums(q, k, neg_lse, b_idx, h_idx, 32 ** -0.5)
    assert torch.equal(got, eager)
    assert not state.enabled and "InvalidCxxCompiler" in state.failure
    assert os.environ["ACT_KERNELS_COMPILE"] == "1"
    assert columns.pick_column_block(150, 150) is columns.column_block
    assert len(calls) == 1                           # later blocks never tried it again
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # and it warned once
        assert torch.equal(columns.column_sums(q, k, neg_lse, b_idx, h_idx, 32 ** -0.5), eager)


def test_decode_path_is_vectorised_over_heads(monkeypatch):
    """Nq == 1 never enters the prefill passes (no column pass, no per-head loop)."""
    q, k, v = _inputs(2, 8, 2, 1, 300, 16)

    def boom(*args, **kwargs):
        raise AssertionError("prefill pass used for a decode step")
    monkeypatch.setattr(tb, "column_sums", boom)
    monkeypatch.setattr(bounds, "column_bounds", boom)
    monkeypatch.setattr(tb, "sink_correction", boom)
    out = act_attention(q, k, v, heads=list(range(8)), backend="torch")
    ref, _, _ = act_attention_reference(q.double(), k.double(), v.double(),
                                        heads=torch.ones(2, 8, dtype=torch.bool), beta=0.4, tau=0.1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_negative_max_reads_the_bits_as_amax_does(dtype):
    """The bound pass's column max through integer bits, on what it is given (negative entries
    and -inf): equal to ``amax(0)`` for tiny and huge values, a finite entry among -inf and
    columns of -inf."""
    gen = torch.Generator().manual_seed(5)
    x = -torch.rand(37, 3, 50, generator=gen, dtype=torch.float64) * 40.0 - 1e-3
    x[:, 1, 25:30] = float("-inf")
    x[:, 1, 30:33] = float("-inf")                     # a column of -inf
    x[:, 2, 35:40] *= 1e30
    x = x.to(dtype)
    x[3, 1, 25:30] = -torch.finfo(dtype).tiny          # one finite entry among -inf
    x[:, 2, 40:45] = -torch.finfo(dtype).tiny * torch.arange(1, 38, dtype=dtype)[:, None]
    assert bool((x < 0).all())
    assert torch.equal(bounds.negative_max(x), x.amax(0))
