"""General masks (``docs/spec.md`` section 3a): packed segments, bidirectional blocks and a dense
boolean mask, through the op, against the independent float64 brute force; the split of packed
calls, the bit-identity of uncalibrated pairs, every refused input, and the memory of the
blocked path."""
from __future__ import annotations

import pytest
import torch

from bruteforce import bruteforce_details, visible
from helpers.compare import TOLS, check
from inputs import backend_name, left_padding, make_qkv, random_head_mask

from act_kernels import act_attention

BACKENDS = ["eager", "torch", "torch-pruned"]


def packed(lengths_per_row, dtype=torch.int32) -> torch.Tensor:
    """``[B, Nk]`` segment ids (odd, increasing values) of segments of the given lengths."""
    rows = [torch.repeat_interleave(torch.arange(len(ls)) * 3 + 1, torch.tensor(ls))
            for ls in lengths_per_row]
    return torch.stack(rows).to(dtype)


def blocks(nk: int, runs_per_row) -> torch.Tensor:
    """``[B, Nk]`` block ids: ``(start, end, id)`` runs, -1 elsewhere."""
    ids = torch.full((len(runs_per_row), nk), -1, dtype=torch.long)
    for b, runs in enumerate(runs_per_row):
        for a, e, i in runs:
            ids[b, a:e] = i
    return ids


def segment_starts(lengths_per_row):
    starts = set()
    for ls in lengths_per_row:
        pos = 0
        for n in ls:
            if n > 4:
                starts.add(pos + 3)
            pos += n
    return sorted(starts)


# (B, Hq, Hkv, Nq, Nk, D, segment lengths per row)
SEGMENT_CASES = [
    (2, 4, 2, 37, 37, 16, [[10, 15, 12], [37]]),          # one row not split
    (1, 3, 1, 29, 29, 24, [[7, 7, 7, 8]]),                # equal lengths: one batched view
    (3, 4, 4, 31, 31, 16, [[10, 21], [21, 10], [10, 10, 11]]),   # shapes shared across rows
    (2, 6, 2, 9, 40, 16, [[20, 20], [5, 30, 5]]),         # chunked prefill across segments
    (2, 4, 2, 1, 33, 16, [[11, 22], [33]]),               # decode: only the query's segment
    (1, 2, 1, 13, 13, 16, [[1] * 13]),                    # every token alone
]


def seg_id(case):
    b, hq, hkv, nq, nk, d, lengths = case
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-{'_'.join('.'.join(map(str, ls)) for ls in lengths)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=seg_id)
@pytest.mark.parametrize("variant", ["plain", "padded", "window"])
def test_segments_match_the_bruteforce(backend, case, variant):
    bsz, hq, hkv, nq, nk, dim, lengths = case
    seed = nq + nk + len(variant)
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=segment_starts(lengths))
    heads = random_head_mask(bsz, hq, seed=seed)
    kpm = left_padding(nk, [2, 5, 0][:bsz]) if variant == "padded" else None
    window = 6 if variant == "window" else None
    _, _, bf = check(backend, q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm, seed=seed,
                     window=window, segment_ids=packed(lengths))
    if min(min(ls) for ls in lengths) > 4:
        assert bool(bf.sinks.any()), "no sink: the case would prove little"


# (B, Hq, Hkv, Nq, Nk, D, block runs per row)
BLOCK_CASES = [
    (2, 4, 2, 37, 37, 16, [[(5, 12, 0), (20, 26, 1)], [(0, 9, 7)]]),
    (1, 3, 1, 29, 29, 24, [[(10, 29, 0)]]),               # a block to the end
    (2, 4, 2, 11, 40, 16, [[(25, 35, 0)], [(28, 40, 2)]]),  # chunked: a block across Nk - Nq
    (2, 4, 2, 1, 30, 16, [[(20, 30, 0)], []]),            # decode
    (1, 2, 2, 19, 19, 16, [[(3, 4, 0), (4, 9, 1), (9, 11, 2)]]),  # adjacent blocks, one of one key
]


def blk_id(case):
    b, hq, hkv, nq, nk, d, runs = case
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-{len(sum(runs, []))}blocks"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=blk_id)
@pytest.mark.parametrize("variant", ["plain", "padded", "window"])
def test_blocks_match_the_bruteforce(backend, case, variant):
    bsz, hq, hkv, nq, nk, dim, runs = case
    seed = 3 * nq + nk + len(variant)
    planted = sorted({j for rs in runs for a, e, _ in rs for j in (a + 1, e - 1) if j < nk} | {7})
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=seed, planted=planted)
    heads = random_head_mask(bsz, hq, seed=seed)
    kpm = left_padding(nk, [0, 3][:bsz]) if variant == "padded" else None
    window = 5 if variant == "window" else None
    _, _, bf = check(backend, q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm, seed=seed,
                     window=window, block_ids=blocks(nk, runs))
    assert bool(bf.sinks.any()), "no sink: the case would prove little"


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_and_blocks_together(backend):
    lengths = [[12, 17, 10], [39]]
    runs = [[(14, 20, 0), (30, 36, 1)], [(2, 9, 4), (25, 31, 5)]]
    q, k, v = make_qkv(2, 4, 2, 39, 39, 16, seed=5, planted=[3, 15, 16, 31, 33])
    for window in (None, 4):
        check(backend, q, k, v, heads=random_head_mask(2, 4, seed=5), tau=0.05, window=window,
              key_padding_mask=left_padding(39, [0, 2]), segment_ids=packed(lengths),
              block_ids=blocks(39, runs))


def random_mask(bsz, nq, nk, seed, density=0.5):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(bsz, nq, nk, generator=gen) < density
    mask[:, 0] = False                       # a row that sees nothing
    mask[:, 1, nk - 1] = True                # a row that sees a later key
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["B,Nq,Nk", "1,Nq,Nk", "B,1,Nq,Nk"])
@pytest.mark.parametrize("padded", [False, True])
def test_attn_mask_matches_the_bruteforce(backend, shape, padded):
    bsz, hq, hkv, nq, nk, dim = 2, 4, 2, 23, 31, 16
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=8, planted=[4, 17, 26])
    mask = random_mask(1 if shape.startswith("1") else bsz, nq, nk, seed=8)
    if shape == "B,1,Nq,Nk":
        mask = mask[:, None]
    kpm = left_padding(nk, [0, 6]) if padded else None
    _, stats, bf = check(backend, q, k, v, heads=random_head_mask(bsz, hq, seed=8), tau=0.05,
                         key_padding_mask=kpm, attn_mask=mask)
    assert bool(bf.sinks.any())
    assert bool((bf.out[:, :, 0] == 0).all())      # the row that sees nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["attn_mask", "blocks"])
def test_sink_dominated_rows(backend, kind, monkeypatch):
    """Rows whose non-sink mass is below the threshold of sums (1e-20) recompute their non-sink
    part from a softmax over their non-sink logits: still exact."""
    from act_kernels.torch_backend import masked

    redone = []
    real = masked.recalibrate_rows
    monkeypatch.setattr(masked, "recalibrate_rows",
                        lambda plain, *a: redone.append(len(plain)) or real(plain, *a))
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16, seed=21, planted=[5, 6, 18], sink_logit=60.0)
    if kind == "attn_mask":
        mask = torch.ones(30, 30, dtype=torch.bool).tril()[None]
        mask[:, :, 20:24] = True                  # a band every row sees, past rows too
        masks = dict(attn_mask=mask)
    else:
        masks = dict(block_ids=blocks(30, [[(15, 22, 0)], [(3, 9, 1)]]), window=6)
    _, _, bf = check(backend, q, k, v, heads=[0, 1, 2, 3], tau=0.05, **masks)
    assert bool((bf.changed & (bf.rest < 1e-20)).any()), "no sink-dominated row: case too easy"
    assert backend != "torch" or sum(redone) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["segments", "blocks", "attn_mask"])
def test_other_dtypes(dtype, kind):
    q, k, v = make_qkv(2, 4, 2, 33, 33, 16, seed=12, planted=[3, 14, 25], dtype=dtype)
    masks = {"segments": dict(segment_ids=packed([[11, 22], [16, 17]])),
             "blocks": dict(block_ids=blocks(33, [[(10, 18, 0)], [(20, 33, 1)]])),
             "attn_mask": dict(attn_mask=random_mask(2, 33, 33, seed=12))}[kind]
    check("torch", q, k, v, heads=random_head_mask(2, 4, seed=12), tau=0.05,
          key_padding_mask=left_padding(33, [0, 2]), tol=TOLS[dtype], **masks)


@pytest.mark.parametrize("kind", ["segments", "blocks", "blocks+window", "attn_mask"])
@pytest.mark.parametrize("nq", [1, 27])
def test_uncalibrated_pairs_are_bit_identical_to_heads_none(kind, nq):
    q, k, v = make_qkv(2, 4, 2, nq, 27, 16, seed=2, planted=[4, 13, 22])
    masks = {"segments": dict(segment_ids=packed([[9, 18], [27]])),
             "blocks": dict(block_ids=blocks(27, [[(10, 20, 0)], [(22, 27, 1)]])),
             "blocks+window": dict(block_ids=blocks(27, [[(10, 20, 0)], [(22, 27, 1)]]),
                                   window=4),
             "attn_mask": dict(attn_mask=random_mask(2, nq, 27, seed=2) if nq > 1
                               else torch.rand(2, 1, 27) < 0.7)}[kind]
    heads = random_head_mask(2, 4, seed=2)
    plain = act_attention(q, k, v, backend="torch", tau=0.05, **masks)
    out = act_attention(q, k, v, heads=heads, backend="torch", tau=0.05, **masks)
    assert torch.equal(out[~heads], plain[~heads])
    assert not torch.equal(out[heads], plain[heads]), "calibration changed nothing"


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_a_packed_call_equals_its_sequences_one_by_one(backend):
    lengths = [[13, 8, 21], [9, 33]]
    nk = 42
    q, k, v = make_qkv(2, 4, 2, nk, nk, 16, seed=31, planted=[2, 16, 24, 30])
    heads = random_head_mask(2, 4, seed=31)
    out, stats = act_attention(q, k, v, heads=heads, tau=0.05, backend=backend,
                               segment_ids=packed(lengths, torch.int64), return_stats=True)
    for b, ls in enumerate(lengths):
        a = 0
        for n in ls:
            part = slice(a, a + n)
            one, st = act_attention(q[b:b + 1, :, part], k[b:b + 1, :, part],
                                    v[b:b + 1, :, part], heads=heads[b:b + 1], tau=0.05,
                                    backend=backend, return_stats=True)
            torch.testing.assert_close(out[b:b + 1, :, part], one, rtol=1e-6, atol=1e-6)
            assert torch.equal(stats.sinks[b:b + 1, :, part], st.sinks)
            torch.testing.assert_close(stats.scores[b:b + 1, :, part], st.scores)
            torch.testing.assert_close(stats.sink_mass[b:b + 1, :, part], st.sink_mass)
            a += n
    assert bool(stats.sinks.any())


def test_equal_segments_are_one_batched_call_on_views(monkeypatch):
    """8 packed sequences of one length: one backend call of batch 8, q, k and v views."""
    import act_kernels.op as op

    calls = []
    real = op._backend_fn("torch")

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), q._base is not None, k._base is not None))
        return real(q, k, v, *args, **kwargs)
    monkeypatch.setattr(op, "_backend_fn", lambda name: spy)
    q, k, v = make_qkv(1, 4, 2, 8 * 24, 8 * 24, 16, seed=1, planted=[3])
    seg = packed([[24] * 8])
    out = act_attention(q, k, v, heads=[1], backend="torch", segment_ids=seg)
    assert calls == [((8, 4, 24, 16), (8, 2, 24, 16), True, True)]
    monkeypatch.undo()
    want = torch.cat([act_attention(q[:, :, i:i + 24], k[:, :, i:i + 24], v[:, :, i:i + 24],
                                    heads=[1], backend="torch") for i in range(0, 192, 24)], 2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_decode_with_segments_calls_only_the_query_segment(monkeypatch):
    import act_kernels.op as op

    calls = []
    real = op._backend_fn("torch")

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, *args, **kwargs)
    monkeypatch.setattr(op, "_backend_fn", lambda name: spy)
    q, k, v = make_qkv(1, 4, 2, 1, 40, 16, seed=6, planted=[20, 30])
    out, stats = act_attention(q, k, v, heads=[0, 2], tau=0.05, backend="torch",
                               segment_ids=packed([[17, 23]]), return_stats=True)
    assert calls == [(1, 23)]
    monkeypatch.undo()
    assert not stats.scores[..., :17].any() and not stats.sinks[..., :17].any()
    bf = bruteforce_details(q, k, v, torch.tensor([True, False, True, False]), 0.4, 0.05,
                            segment_ids=packed([[17, 23]]))
    torch.testing.assert_close(out.double(), bf.out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("nq", [1, 11, 29])
def test_attn_mask_equal_to_causal_is_the_causal_answer(backend, nq):
    nk = 29
    q, k, v = make_qkv(2, 4, 2, nq, nk, 16, seed=nq, planted=[5, 12])
    kpm = left_padding(nk, [0, 4])
    causal = torch.stack([visible(nq, nk, torch.ones(nk, dtype=torch.bool))] * 2)
    heads = random_head_mask(2, 4, seed=nq)
    want, want_stats = act_attention(q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm,
                                     backend=backend, return_stats=True)
    got, stats = act_attention(q, k, v, heads=heads, tau=0.05, key_padding_mask=kpm,
                               backend=backend, attn_mask=causal, return_stats=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.sinks, want_stats.sinks)
    torch.testing.assert_close(stats.scores, want_stats.scores, rtol=1e-5, atol=1e-7)


def test_no_block_with_two_members_is_plain_causal(monkeypatch):
    """Blocks of single keys change nothing: the backend gets no block_ids at all."""
    q, k, v = make_qkv(1, 2, 1, 15, 15, 16, seed=3, planted=[6])
    ids = torch.full((1, 15), -1)
    ids[0, 4], ids[0, 9] = 0, 1
    want = act_attention(q, k, v, heads=[0], tau=0.05, backend="torch")
    assert torch.equal(act_attention(q, k, v, heads=[0], tau=0.05, backend="torch",
                                     block_ids=ids), want)


# ---------------------------------------------------------------------------------------------
# refused inputs: one clear error each
# ---------------------------------------------------------------------------------------------

def _bad_inputs():
    seg = packed([[5, 8]])
    blk = blocks(13, [[(2, 6, 0)]])
    mask = torch.ones(1, 13, 13, dtype=torch.bool)
    return [
        (dict(segment_ids=seg[:, :-1]), ValueError, r"segment_ids must have shape \[B, Nk\]"),
        (dict(segment_ids=seg.float()), TypeError, "segment_ids must be an integer tensor"),
        (dict(segment_ids=seg.bool()), TypeError, "segment_ids must be an integer tensor"),
        (dict(segment_ids=[0] * 13), TypeError, "segment_ids must be an integer tensor"),
        (dict(segment_ids=seg.flip(1)), ValueError, "segment_ids must be non-decreasing"),
        (dict(block_ids=blk[:, :5]), ValueError, r"block_ids must have shape \[B, Nk\]"),
        (dict(block_ids=blk.double()), TypeError, "block_ids must be an integer tensor"),
        (dict(block_ids=blocks(13, [[(2, 4, 0), (6, 8, 0)]])), ValueError,
         "block 0 of batch row 0 is not one contiguous run"),
        (dict(block_ids=blocks(13, [[(3, 7, 2)]]), segment_ids=seg), ValueError,
         "block 2 of batch row 0 spans two segments"),
        (dict(attn_mask=mask.float()), TypeError, "attn_mask must be bool"),
        (dict(attn_mask=mask[:, :5]), ValueError, r"attn_mask must have shape \[B or 1, Nq, Nk\]"),
        (dict(attn_mask=mask[:, None, None]), ValueError, "attn_mask must have shape"),
        (dict(attn_mask="causal"), TypeError, "attn_mask must be a bool tensor"),
        (dict(attn_mask=mask, window=4), ValueError, "attn_mask cannot be combined with window"),
        (dict(attn_mask=mask, window=100), ValueError, "attn_mask cannot be combined with window"),
        (dict(attn_mask=mask, segment_ids=seg), ValueError,
         "attn_mask cannot be combined with segment_ids"),
        (dict(attn_mask=mask, block_ids=blk), ValueError,
         "attn_mask cannot be combined with block_ids"),
    ]


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("bad", _bad_inputs(), ids=lambda b: b[2][:40])
def test_bad_mask_arguments_are_refused(backend, bad):
    kwargs, error, message = bad
    q, k, v = make_qkv(1, 2, 1, 13, 13, 16, seed=0)
    with pytest.raises(error, match=message):
        act_attention(q, k, v, heads=[0], backend=backend, **kwargs)


def test_mask_on_another_device_is_refused():
    q, k, v = make_qkv(1, 2, 1, 13, 13, 16, seed=0)
    for name, value in (("segment_ids", torch.zeros(1, 13, dtype=torch.long, device="meta")),
                        ("block_ids", torch.zeros(1, 13, dtype=torch.long, device="meta")),
                        ("attn_mask", torch.ones(1, 13, 13, dtype=torch.bool, device="meta"))):
        with pytest.raises(ValueError, match=f"{name} is on meta but q is on cpu"):
            act_attention(q, k, v, backend="torch", **{name: value})


def test_a_backend_without_the_argument_raises_naming_it(monkeypatch):
    import act_kernels.op as op

    def bare(q, k, v, *args):
        raise AssertionError("must not be called")
    monkeypatch.setattr(op, "_backend_fn", lambda name: bare)
    q, k, v = make_qkv(1, 2, 1, 13, 13, 16, seed=0)
    with pytest.raises(NotImplementedError, match=r"'torch' backend does not support block_ids"):
        act_attention(q, k, v, backend="torch", block_ids=blocks(13, [[(2, 6, 0)]]))
    with pytest.raises(NotImplementedError,
                       match=r"does not support attn_mask.*use backend='torch'"):
        act_attention(q, k, v, backend="torch", attn_mask=torch.ones(1, 13, 13, dtype=bool))


def test_triton_refuses_a_general_mask():
    pytest.importorskip("triton")
    q, k, v = make_qkv(1, 2, 1, 13, 13, 16, seed=0)
    with pytest.raises(NotImplementedError, match="'triton' backend does not support attn_mask"):
        act_attention(q, k, v, backend="triton", attn_mask=torch.ones(1, 13, 13, dtype=bool))


def test_the_registered_op_takes_the_masks():
    q, k, v = make_qkv(2, 4, 2, 21, 21, 16, seed=4, planted=[3, 12])
    seg, blk = packed([[9, 12], [21]]), blocks(21, [[(12, 17, 0)], [(5, 9, 3)]])
    heads = random_head_mask(2, 4, seed=4)
    mask = random_mask(2, 21, 21, seed=4)
    for kw in (dict(segment_ids=seg, block_ids=blk), dict(attn_mask=mask)):
        want = act_attention(q, k, v, heads=heads, tau=0.05, backend="torch", **kw)
        got = torch.ops.act_kernels.act_attention(q, k, v, heads, None, 0.4, 0.05, 0.25, "torch",
                                                  None, kw.get("segment_ids"),
                                                  kw.get("block_ids"), kw.get("attn_mask"))
        assert torch.equal(got, want)
        compiled = torch.compile(lambda q, k, v: act_attention(q, k, v, heads=heads, tau=0.05,
                                                               backend="torch", **kw),
                                 backend="eager", fullgraph=True)
        assert torch.equal(compiled(q, k, v), want)


# ---------------------------------------------------------------------------------------------
# memory: O(N * block), never an N x N float map
# ---------------------------------------------------------------------------------------------

def _largest_allocation(fn) -> int:
    """The largest memory any single operator of ``fn()`` allocates (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(e.cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("kind", ["blocks", "segments"])
def test_memory_of_a_long_call_is_o_n_block(kind):
    n, hq = 2048, 4
    q, k, v = make_qkv(1, hq, 2, n, n, 16, seed=7, planted=[100, 1500])
    masks = {"blocks": dict(block_ids=blocks(n, [[(300, 556, 0), (1200, 1456, 1)]])),
             "segments": dict(segment_ids=packed([[512] * 4]))}[kind]
    run = lambda: act_attention(q, k, v, heads=[0, 1, 2, 3], tau=0.05, backend="torch",  # noqa
                                return_stats=True, **masks)
    largest = _largest_allocation(run)
    one_head_map = n * n * 4                                     # 16 MiB in float32
    assert largest <= one_head_map // 2, f"an operator allocated {largest} bytes"
    # the bound is not vacuous: a dense map of the same call allocates more
    dense = _largest_allocation(lambda: act_attention(q[:, :, :1024], k[:, :, :1024],
                                                      v[:, :, :1024], heads=[0],
                                                      backend="eager"))
    assert dense > one_head_map // 2
