"""The torch backend's pruned column pass (and the decode shortcut) against the float64 brute force.

The prefill column pass bounds every key's column sum from block maxima and sums exactly only
the keys whose bound reaches ``tau * count``. These tests check that the bound really bounds
(odd shapes, GQA, padding, chunks, huge logits, tiny blocks), that keys placed just above and
just below ``tau`` keep the brute force's decision, that pruning is active, that uncalibrated
heads are bit for bit the plain path and that the bound pass holds only a block of rows.
"""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention
from act_kernels import torch_backend as tb
from act_kernels.torch_backend import blocks, columns, cpu_rows, decode, plain
from act_kernels.torch_backend import bounds as bound_pass
from act_kernels.sinks import first_valid_index, seen_counts
from bruteforce import bruteforce_details
from inputs import integer_qkv, left_padding, make_qkv

# These tests are about the pruned passes: short prefills take them too (conftest.py).
pytestmark = pytest.mark.usefixtures("pruned_torch_path")

# (B, Hq, Hkv, Nq, Nk, D, planted keys, left pads per batch row)
SHAPES = [
    (1, 3, 1, 97, 97, 64, (5, 40), None),
    (2, 6, 3, 61, 61, 16, (7, 30), [0, 13]),
    (2, 4, 2, 37, 113, 40, (20, 90), [0, 50]),     # a chunk: Nq < Nk, padding inside the chunk
    (1, 2, 2, 150, 150, 8, (), None),
]
NEAR = 1e-4   # relative distance of tau from a key's score: far above float32 noise (1e-6)
WINDOWS = [None, 13]   # causal, and a window that bites on every shape (spans, both edges)


def shape_id(shape):
    b, hq, hkv, nq, nk, d, planted, pads = shape
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-D{d}" + ("-pad" if pads else "")


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32-bound", "bf16-bound"])
def tiny_blocks(request, monkeypatch):
    """Force many row blocks in the bound pass and the exact sums, with either matmul dtype."""
    monkeypatch.setattr(bound_pass, "_bound_dtype", lambda device: request.param)
    monkeypatch.setattr(bound_pass, "BOUND_BLOCK_FLOATS", 1)
    monkeypatch.setattr(bound_pass, "BOUND_MIN_ROWS", 5)
    monkeypatch.setattr(blocks, "BLOCK_FLOATS", 64)
    monkeypatch.setattr(blocks, "MIN_BLOCK_ROWS", 3)


def inputs(shape, seed, **kw):
    b, hq, hkv, nq, nk, d, planted, pads = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=seed, planted=planted, **kw)
    return q, k, v, (None if pads is None else left_padding(nk, pads))


def pairs_and_lse(q, k, v, kpm, scale, window=None):
    """Every (b, h) pair with its ``-lse`` as the backend computes them."""
    bsz, hq = q.shape[:2]
    _, lse = plain.plain_attention(q, k, v, scale, kpm, window)
    b_idx, h_idx = torch.ones(bsz, hq, dtype=torch.bool).nonzero(as_tuple=True)
    return b_idx, h_idx, tb.pair_neg_lse(lse, b_idx, h_idx, kpm, q.dtype)


def bounds_and_truth(q, k, v, kpm, window=None):
    """``(bounds, truth, seen, bf)``: the bound pass's column bounds of every pair, the float64
    column sums ``sum_i P_ij`` over the rows that see ``j``, which keys some row sees, and the
    brute force; the bounds are checked to hold (float32 exponentials underflow below ~1e-45,
    where the float64 truth does not)."""
    scale = q.shape[-1] ** -0.5
    b_idx, h_idx, neg_lse = pairs_and_lse(q, k, v, kpm, scale, window)
    bounds = bound_pass.column_bounds(q, k, neg_lse, b_idx, h_idx, scale, window).double()
    bf = bruteforce_details(q, k, v, None, 0.4, 0.1, scale, kpm, window=window)
    nq, nk = q.shape[2], k.shape[2]
    counts = seen_counts(nq, nk, kpm, q.shape[0], q.device, window)[b_idx].double()
    truth = bf.scores[b_idx, h_idx] * counts
    seen = counts > 0                        # padded keys have no score and no useful bound
    assert bool((bounds[seen] >= truth[seen] - 1e-37).all()), float((truth - bounds)[seen].max())
    return bounds, truth, seen, bf


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("q_scale", [1.0, 4.0])
@pytest.mark.parametrize("window", WINDOWS)
def test_bound_is_at_least_the_exact_column_sum(shape, q_scale, window, tiny_blocks):
    q, k, v, kpm = inputs(shape, seed=3, q_scale=q_scale)
    bounds, truth, seen, _ = bounds_and_truth(q, k, v, kpm, window)
    # and it is a bound worth having: within the block factor of the truth for most keys
    assert float((bounds[seen] < 1e3 * truth[seen] + 1e-3).double().mean()) > 0.5


def test_bound_holds_for_huge_logits(tiny_blocks):
    """Integer q/k scaled by 1000: exact float32 logits of magnitude ~1e4, nearly one-hot rows."""
    q, k, v = integer_qkv(2, 4, 2, 41, 41, 64, seed=5, q_scale=1000)
    bounds, _, seen, _ = bounds_and_truth(q, k, v, left_padding(41, [0, 9]))
    assert torch.isfinite(bounds[seen]).all()


@pytest.mark.parametrize("pads", [0, 7])
def test_bound_holds_where_a_sink_takes_almost_every_row(pads, tiny_blocks):
    """A sink about 12 ahead in the logits: s_ij - lse_i is within rounding of 0 for most rows,
    where the lowered entries of the bound pass come closest to 0 (bfloat16 products kept)."""
    q, k, v = make_qkv(2, 6, 2, 57, 57, 32, seed=9, planted=(9,), sink_logit=12.0)
    kpm = left_padding(57, [0, pads]) if pads else None
    bounds, truth, _, bf = bounds_and_truth(q, k, v, kpm)
    assert float(bf.scores[:, :, 9].min()) > 0.9                # the sink takes almost all
    assert float((bounds[:, 9] / truth[:, 9]).max()) < 1.5     # and stays close on the sink


def near_tau_targets(bf, first, count=3):
    """Keys whose score, moved by ``NEAR`` relatively, is no closer than ``10 NEAR`` to any other
    key's: tau can sit right next to them without a tie elsewhere. Strongest keys first, then the
    strongest key of the bulk (not among the top ``count``)."""
    scores = bf.scores.clone()
    scores[torch.arange(scores.shape[0]), :, first] = 0.0     # the first valid key is no sink
    flat = scores.flatten()
    order = flat.argsort(descending=True)
    picks = []
    for rank in list(range(count)) + [count + 5, count + 40]:
        value = float(flat[order[rank]])
        gaps = (flat - value).abs() / value
        gaps[order[rank]] = float("inf")
        if value > 0 and float(gaps.min()) > 10 * NEAR:
            picks.append(value)
    return picks


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("side", ["just_above", "just_below"])
@pytest.mark.parametrize("window", WINDOWS)
def test_keys_next_to_tau_keep_their_decision(shape, side, window, tiny_blocks):
    """tau a hair (1e-4 relative) below or above a key's score: with and without return_stats
    the key is a sink exactly when the brute force says so, and the output follows."""
    q, k, v, kpm = inputs(shape, seed=11)
    bsz, hq = q.shape[:2]
    heads = torch.ones(bsz, hq, dtype=torch.bool)
    heads[:, 1::2] = False                                      # odd heads stay plain
    bf_any = bruteforce_details(q, k, v, heads, 0.4, 0.1, None, kpm, window=window)
    targets = near_tau_targets(bf_any, first_valid_index(kpm, bsz, q.device))
    assert len(targets) >= 3, targets
    for score in targets:
        tau = score * (1 - NEAR) if side == "just_above" else score * (1 + NEAR)
        bf = bruteforce_details(q, k, v, heads, 0.4, tau, None, kpm, window=window)
        assert int(((bf.scores - tau).abs() < 2 * NEAR * tau).sum()) == 1   # exactly the target
        out, stats = act_attention(q, k, v, heads=heads, tau=tau, key_padding_mask=kpm,
                                   backend="torch", return_stats=True, window=window)
        out_only = act_attention(q, k, v, heads=heads, tau=tau, key_padding_mask=kpm,
                                 backend="torch", window=window)
        assert torch.equal(stats.sinks, bf.sinks), f"tau={tau}"
        assert torch.equal(out, out_only)
        alive = bf.row_valid[:, None, :, None].expand_as(out)
        scale_v = float(v.abs().max())
        torch.testing.assert_close(out.double()[alive], bf.out[alive], rtol=1e-5,
                                   atol=2e-5 * scale_v)


def test_pruning_skips_most_keys_and_sums_the_rest_exactly(tiny_blocks):
    """Random keys with two planted sinks: few candidates survive, the planted ones do, and the
    candidates' sums equal the full column pass's."""
    q, k, v, kpm = inputs(SHAPES[0], seed=2)
    scale = 64 ** -0.5
    b_idx, h_idx, neg_lse = pairs_and_lse(q, k, v, kpm, scale)
    nk = k.shape[2]
    counts = seen_counts(nk, nk, None, 1, q.device)[b_idx]
    first = first_valid_index(None, 1, q.device)[b_idx]
    sums, candidates = bound_pass.pruned_column_sums(q, k, neg_lse, b_idx, h_idx, counts, first,
                                                     0.1, scale)
    full = columns.column_sums(q, k, neg_lse, b_idx, h_idx, scale)
    assert bool(candidates[:, [5, 40]].all())
    assert int(candidates.sum()) < 0.25 * candidates.numel()
    torch.testing.assert_close(sums[candidates], full[candidates], rtol=1e-5, atol=1e-6)
    assert bool((sums[~candidates] == 0).all())
    skipped = ~candidates
    skipped[:, 0] = False                     # the first key is never a sink, whatever its score
    assert bool((full[skipped] <= 0.1 * counts[skipped]).all())   # no sink was skipped


@pytest.mark.parametrize("nq", [1, 33], ids=["decode", "prefill"])
def test_uncalibrated_heads_are_the_plain_path_bit_for_bit(nq):
    q, k, v = make_qkv(2, 6, 2, nq, 70, 32, seed=17, planted=(9, 50))
    kpm = left_padding(70, [0, 12])
    heads = torch.tensor([[True, False, True, False, False, True],
                          [False, True, False, False, True, False]])
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend="torch")
    calibrated = act_attention(q, k, v, heads=heads, key_padding_mask=kpm, backend="torch")
    assert torch.equal(calibrated[~heads], plain[~heads])
    assert not torch.equal(calibrated[heads], plain[heads])   # the sinks did change something


@pytest.mark.parametrize("side", ["just_above", "just_below"])
def test_decode_keys_next_to_tau(side):
    """Decode: tau a hair from a key's probability; the sinks and output follow the brute force."""
    q, k, v = make_qkv(2, 4, 2, 1, 90, 16, seed=23, planted=(30, 61), sink_logit=4.0)
    kpm = left_padding(90, [0, 7])
    bf_any = bruteforce_details(q, k, v, None, 0.4, 0.1, None, kpm)
    targets = near_tau_targets(bf_any, first_valid_index(kpm, 2, q.device))
    assert len(targets) >= 3
    heads = torch.ones(2, 4, dtype=torch.bool)
    for score in targets:
        tau = score * (1 - NEAR) if side == "just_above" else score * (1 + NEAR)
        bf = bruteforce_details(q, k, v, heads, 0.4, tau, None, kpm)
        out, stats = act_attention(q, k, v, heads=heads, tau=tau, key_padding_mask=kpm,
                                   backend="torch", return_stats=True)
        assert torch.equal(stats.sinks, bf.sinks)
        torch.testing.assert_close(out.double(), bf.out, rtol=1e-5, atol=2e-5)


def test_decode_without_sinks_skips_the_calibration(monkeypatch):
    """No calibrated row has a sink: the step is the plain path, the calibration never runs."""
    q, k, v = make_qkv(1, 4, 2, 1, 300, 16, seed=29)

    def boom(*args, **kwargs):
        raise AssertionError("calibration ran without a sink")
    monkeypatch.setattr(decode, "sink_logit_shift", boom)
    monkeypatch.setattr(cpu_rows, "MAX_ROW_KEYS", 0)     # the torch step, not the CPU loop
    out = act_attention(q, k, v, heads=[0, 1, 2, 3], backend="torch")
    assert torch.equal(out, act_attention(q, k, v, backend="torch"))


@pytest.mark.parametrize("pads", [0, 5], ids=["no-pad", "pad"])
def test_decode_with_only_the_first_valid_key_above_tau_is_plain(pads):
    """The first valid key takes most of every row's attention (P > tau = 0.3) and no other key
    does: the sink test (the first valid key excepted) finds no sink, and the step is the plain
    one bit for bit."""
    kpm = left_padding(60, [pads, pads]) if pads else None
    q, k, v = make_qkv(2, 4, 2, 1, 60, 16, seed=37, planted=[pads], sink_logit=8.0)
    _, stats = act_attention(q, k, v, key_padding_mask=kpm, tau=0.3, backend="torch",
                             return_stats=True)
    assert bool((stats.scores[:, :, pads] > 0.5).all())
    assert not stats.sinks.any()
    calibrated = act_attention(q, k, v, heads=[0, 1, 2, 3], key_padding_mask=kpm, tau=0.3,
                               backend="torch")
    assert torch.equal(calibrated, act_attention(q, k, v, key_padding_mask=kpm, backend="torch"))


def test_bound_pass_holds_one_block_of_rows(monkeypatch):
    """Extra memory is O(N): every matmul output of the bound pass fits one block."""
    q, k, v = make_qkv(1, 6, 2, 400, 400, 16, seed=31)
    sizes = []
    real_mm = torch.mm

    def spy(a, b, *, out=None):
        sizes.append(a.shape[0] * b.shape[1])
        return real_mm(a, b, out=out)
    monkeypatch.setattr(bound_pass, "BOUND_BLOCK_FLOATS", 4096)
    monkeypatch.setattr(bound_pass, "BOUND_MIN_ROWS", 4)
    monkeypatch.setattr(tb.torch, "mm", spy)
    act_attention(q, k, v, heads=list(range(6)), backend="torch")
    monkeypatch.setattr(tb.torch, "mm", real_mm)
    group, rows = 3, 4                        # 4096 floats hold fewer than 4 rows of 3 heads
    assert max(sizes) <= rows * group * 400
    assert len(sizes) >= 2 * (400 // rows)    # two kv heads, every block of rows


@pytest.mark.parametrize("pads", [None, (0, 9, 3)], ids=["no-pad", "pad"])
def test_decode_calibrates_only_the_calibrated_rows(pads):
    """A decode step whose heads mask differs per batch row (GQA 3, odd sizes): the calibrated
    rows (read and written back on their own) equal the float64 brute force, every other row is
    the plain step bit for bit, and a second call with the same mask (its rows cached) agrees."""
    kpm = left_padding(83, list(pads)) if pads else None
    q, k, v = make_qkv(3, 6, 2, 1, 83, 24, seed=41, planted=(20, 50), sink_logit=5.0)
    heads = torch.zeros(3, 6, dtype=torch.bool)
    heads[0, [1, 4]] = True
    heads[1, 5] = True
    heads[2, [0, 1, 2]] = True
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend="torch")
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.05, None, kpm)
    assert bool(bf.sinks[heads].any())
    for _ in range(2):
        out = act_attention(q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm,
                            backend="torch")
        assert torch.equal(out[~heads], plain[~heads])
        torch.testing.assert_close(out.double(), bf.out, rtol=1e-5, atol=2e-5)
        assert not torch.equal(out[heads], plain[heads])


@pytest.mark.parametrize("pads", [None, (0, 6)], ids=["no-pad", "pad"])
def test_decode_with_underflowing_non_sink_mass_is_calibrated(pads):
    """float32 decode rows whose sink leads every other key by ~150 in the logits: their non-sink
    entries of P underflow to 0 in float32, yet the calibrated rows are the float64 brute force
    (beta w + (1 - beta) a, a the non-sink average), not the plain row; the other heads are the
    plain step bit for bit, with and without statistics."""
    kpm = left_padding(71, list(pads)) if pads else None
    q, k, v = make_qkv(2, 6, 2, 1, 71, 16, seed=43, planted=(30,), sink_logit=150.0)
    heads = torch.tensor([[True, False, False, True, False, False],
                          [False, True, False, False, False, True]])
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, None, kpm)
    probs = torch.softmax(torch.matmul(q, k.repeat_interleave(3, 1).transpose(-1, -2)) * 16 ** -0.5,
                          dim=-1)
    assert bool((probs[..., 30] == 1.0).all())              # float32: 1 - m rounds to 0
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend="torch")
    for stats in (False, True):
        out = act_attention(q, k, v, heads=heads, key_padding_mask=kpm, backend="torch",
                            return_stats=stats)
        out = out[0] if stats else out
        torch.testing.assert_close(out.double(), bf.out, rtol=1e-5, atol=2e-5)
        assert torch.equal(out[~heads], plain[~heads])
        assert float((out[heads] - plain[heads]).abs().max()) > 0.1
