"""Bidirectional blocks (image tokens) in the Triton kernels, under the interpreter on CPU.

The backend is called directly (``act_attention_triton(..., block_ids=)``, what the op calls
once the blocks are validated), and judged by the float64 brute force
(``tests/bruteforce.py``: ``visible``, ``never_sinks``). The interval metadata
(``kernels.spans``) is checked against the brute force's visibility on its own, so that a
kernel walking a wrong interval cannot pass by luck; NaN in K/V outside every row's interval
shows the kernels skip those tiles instead of masking them.
"""
import os

import pytest
import torch

from helpers.optional import import_optional

triton = import_optional("triton", "triton")

from act_kernels import triton_backend as tb  # noqa: E402
from act_kernels.kernels import spans as spans_mod  # noqa: E402
from act_kernels.kernels.configs import INTERP_BLOCK  # noqa: E402

from bruteforce import bruteforce_details, visible  # noqa: E402
from helpers.compare import (TOLS, assert_out_close, assert_sink_mass_close,  # noqa: E402
                             assert_stats_close)
from inputs import left_padding, make_qkv  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                                and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

BETA, TAU = 0.4, 0.1


def block_ids(nk, runs):
    """long ``[B, Nk]``: ``runs[b]`` lists ``(start, end, id)``, the keys ``start .. end - 1``."""
    ids = torch.full((len(runs), nk), -1, dtype=torch.long)
    for b, row in enumerate(runs):
        for start, end, name in row:
            ids[b, start:end] = name
    return ids


def call(q, k, v, heads, kpm, stats, window, ids):
    got = tb.act_attention_triton(q, k, v, heads, BETA, TAU, q.shape[-1] ** -0.5, kpm, stats,
                                  window=window, block_ids=ids)
    return got if stats else got[0]


def check_blocks(q, k, v, heads, kpm, window, ids, tol=None):
    """Output with and without statistics, and the statistics, against the brute force."""
    tol = tol or TOLS[q.dtype]
    where = f"q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype} window={window}"
    out, st = call(q, k, v, heads, kpm, True, window, ids)
    out_only = call(q, k, v, heads, kpm, False, window, ids)
    stats = BackendStats(st)
    bf = bruteforce_details(q, k, v, heads, BETA, TAU, None, kpm, window=window, block_ids=ids)
    assert_stats_close(stats, bf, heads, TAU, tol, where)
    if not torch.equal(stats.sinks, bf.sinks):        # a tie with tau decided the other way
        bf = bruteforce_details(q, k, v, heads, BETA, TAU, None, kpm, window=window,
                                block_ids=ids, force_sinks=stats.sinks)
    assert_sink_mass_close(stats, bf, tol, where)
    assert_out_close(out, bf, v, tol, where + " [stats]")
    assert_out_close(out_only, bf, v, tol, where)
    return out_only, bf


class BackendStats:
    """The backend's stats dict seen as ACTStats (the attributes the helpers read)."""

    def __init__(self, st):
        self.scores, self.sinks = st["scores"], st["sinks"]
        self.sink_mass, self.calibrated = st["sink_mass"], st["calibrated"]


# (Nq, Nk, window, pads, runs per batch row). Two batch rows, GQA 4:2, odd lengths, every case
# with a block whose later keys some row sees from several key tiles away (16-wide tiles):
# several blocks, a block at the end, a block of 1, blocks under a window reaching before it,
# chunked prefill whose first rows sit inside a block, left padding through a block's start.
CASES = {
    "several blocks, padding": (45, 45, None, [0, 7],
                                [[(3, 9, 0), (12, 30, 1), (40, 45, 2)], [(5, 21, 0), (33, 34, 1)]]),
    "window inside blocks": (45, 45, 6, [0, 3],
                             [[(10, 29, 4), (29, 31, 5)], [(2, 20, 0), (38, 45, 1)]]),
    "chunk inside a block": (19, 50, 9, None, [[(25, 44, 0)], [(31, 50, 7), (20, 22, 3)]]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_match_the_bruteforce_in_fp32(name):
    nq, nk, window, pads, runs = CASES[name]
    ids = block_ids(nk, runs)
    kpm = None if pads is None else left_padding(nk, pads)
    planted = (nk - nq + 2, runs[0][0][0] + 1, nk - 4)
    q, k, v = make_qkv(2, 4, 2, nq, nk, 16, seed=nk + nq, planted=planted, sink_logit=4.0)
    heads = torch.tensor([[True, False, True, True], [False, True, False, True]])
    out, bf = check_blocks(q, k, v, heads, kpm, window, ids)
    assert bool(bf.sinks.any()) and bool(bf.changed.any())
    # the blocks matter here: without them the output differs
    plain = bruteforce_details(q, k, v, heads, BETA, TAU, None, kpm, window=window)
    assert (bf.out - plain.out).abs().max() > 1e-2
    # uncalibrated pairs: bit-identical to heads=None with the same blocks
    alone = call(q, k, v, None, kpm, False, window, ids)
    assert torch.equal(out[~heads], alone[~heads])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocks_in_half_precision(dtype):
    nq, nk, window, pads, runs = CASES["window inside blocks"]
    q, k, v = make_qkv(2, 4, 2, nq, nk, 16, seed=3, planted=(5, 20), sink_logit=4.0,
                       dtype=dtype)
    check_blocks(q, k, v, torch.ones(2, 4, dtype=torch.bool), left_padding(nk, pads), window,
                 block_ids(nk, runs))


@pytest.mark.parametrize("stats", [False, True])
def test_decode_row_in_a_block_under_a_window(stats):
    """One row at the last position, inside a block that starts before its window: it sees the
    whole block (no later key exists). Decode runs the split kernels with the row's own first
    key (one-pass without stats, the general path with)."""
    nk, window = 61, 9
    ids = block_ids(nk, [[(40, 61, 0)], [(5, 20, 1)]])      # row 1's block is behind it
    kpm = left_padding(nk, [0, 4])
    q, k, v = make_qkv(2, 4, 2, 1, nk, 16, seed=9, planted=(42, 58), sink_logit=5.0)
    heads = torch.tensor([[True, False, True, True], [True, True, False, True]])
    bf = bruteforce_details(q, k, v, heads, BETA, TAU, None, kpm, window=window, block_ids=ids)
    assert bool(bf.sinks[0, :, 42].all())                   # a sink only the block reaches
    if stats:
        check_blocks(q, k, v, heads, kpm, window, ids)
    else:
        out = call(q, k, v, heads, kpm, False, window, ids)
        assert_out_close(out, bf, v, TOLS[torch.float32], "decode one-pass")
        alone = call(q, k, v, None, kpm, False, window, ids)
        assert torch.equal(out[~heads], alone[~heads])


def test_decode_without_window_ignores_the_blocks():
    """A row at Nk - 1 sees every earlier key anyway: the same launches as without blocks."""
    nk = 40
    q, k, v = make_qkv(1, 2, 1, 1, nk, 16, seed=2, planted=(30,))
    ids = block_ids(nk, [[(25, 40, 0)]])
    heads = torch.ones(1, 2, dtype=torch.bool)
    for stats in (False, True):
        with_blocks = call(q, k, v, heads, None, stats, None, ids)
        without = call(q, k, v, heads, None, stats, None, None)
        first = with_blocks[0] if stats else with_blocks
        assert torch.equal(first, without[0] if stats else without)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter block sizes")
@pytest.mark.parametrize("nq", [30, 1])
def test_tiles_outside_every_interval_are_never_read(nq):
    """NaN in K and V on the key tiles no row of the call sees (left of every window; the
    block stretches the windows of its rows back to its start, at key 32): every pass skips
    them (a masked load would still multiply them into NaN) and matches the brute force."""
    nk, window = 70, 5
    ids = block_ids(nk, [[(36, 70, 0)]])
    skipped = 2 * INTERP_BLOCK
    q, k, v = make_qkv(1, 2, 1, nq, nk, 16, seed=6, planted=(37, 60), sink_logit=12.0)
    heads = torch.ones(1, 2, dtype=torch.bool)
    bf = bruteforce_details(q, k, v, heads, BETA, TAU, window=window, block_ids=ids)
    assert not bf.key_seen[:, :skipped].any() and bf.key_seen[:, skipped + 4].all()
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, :skipped] = float("nan")
    v_bad[:, :, :skipped] = float("nan")
    for stats in (False, True):
        got = call(q, k_bad, v_bad, heads, None, stats, window, ids)
        out = got[0] if stats else got
        assert_out_close(out, bf, v, TOLS[torch.float32], f"nq={nq} stats={stats}")
        if stats:
            assert (got[1]["scores"][..., :skipped] == 0).all()


def test_spans_are_the_bruteforce_visibility():
    """Row intervals, the key -> row ranges and the divisors equal the brute force's
    visibility (padding aside), for windows, padding and every block layout above."""
    for nq, nk, window, pads, runs in CASES.values():
        ids = block_ids(nk, runs)
        kpm = torch.ones(2, nk, dtype=torch.bool) if pads is None else left_padding(nk, pads)
        first = tb.first_valid_index(kpm, 2, "cpu")
        spans = spans_mod.block_spans(ids, nq, window, first)
        counts = spans_mod.span_counts(spans, kpm)
        for b in range(2):
            sees = visible(nq, nk, torch.ones(nk, dtype=torch.bool), window, None, ids[b])
            sees &= kpm[b][None, :]                         # the kernels mask padded keys
            keys = torch.arange(nk)
            inside = ((keys[None, :] >= spans.row_lo[b][:, None])
                      & (keys[None, :] <= spans.row_hi[b][:, None]))
            assert torch.equal(inside & kpm[b][None, :], sees)
            rows = torch.arange(nq)[:, None]
            ranged = (rows >= spans.col_first[b][None, :]) & (rows < spans.col_end[b][None, :])
            assert torch.equal(ranged & kpm[b][None, :], inside & kpm[b][None, :])
            real_rows = visible(nq, nk, kpm[b], window, None, ids[b])
            assert torch.equal(counts[b], real_rows.sum(0).float())


def test_registered_op_takes_the_blocks():
    """``torch.ops.act_kernels.act_attention_triton`` (the torch.compile path) with blocks: the
    eager backend's launches (bit-identical output), and ``opcheck`` passes."""
    nk, window = 29, 6
    q, k, v = make_qkv(2, 4, 2, 11, nk, 16, seed=4, planted=(20,), sink_logit=4.0)
    ids = block_ids(nk, [[(19, 27, 0)], [(16, 29, 2)]])
    kpm = left_padding(nk, [0, 3])
    heads = torch.tensor([[True, False, False, True], [False, True, True, False]])
    got = tb.compiled_call(q, k, v, [0, 3], kpm, BETA, TAU, 0.25, window, ids)
    eager = call(q, k, v, torch.tensor([[True, False, False, True]] * 2), kpm, False, window, ids)
    assert torch.equal(got, eager)
    without = tb.compiled_call(q, k, v, [0, 3], kpm, BETA, TAU, 0.25, window)
    assert not torch.equal(got, without)
    torch.library.opcheck(torch.ops.act_kernels.act_attention_triton.default,
                          (q, k, v, heads, torch.arange(8, dtype=torch.int32), kpm, BETA, TAU,
                           0.25, window, ids))
