"""The torch backend's dense path for short prefills (``Nq x Nk <= DENSE_MAX_ENTRIES``).

The whole matrix of ``test_op.py`` and ``test_windows.py`` runs both torch paths against the
float64 brute force (``backend="torch"`` and ``"torch-pruned"``). These tests pin what is
particular to the dense path: which calls take it, that chunking pairs changes nothing, that it
agrees with the pruned passes, and that the rows calibration leaves alone are the plain path's
bit for bit (the head search reuses the positions before a head's first sink unchanged).
"""
from __future__ import annotations

import pytest
import torch

from act_kernels import act_attention
from act_kernels import torch_backend as tb
from act_kernels.torch_backend import dense as dense_path
from bruteforce import bruteforce_details
from inputs import left_padding, make_qkv, random_head_mask


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args[1].shape if name == "dense_pairs" else args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


def test_short_prefills_take_the_dense_path_and_long_ones_the_pruned(monkeypatch):
    dense = _spy(monkeypatch, dense_path, "dense_pairs")
    pruned = _spy(monkeypatch, tb, "pruned_column_sums")
    monkeypatch.setattr(dense_path, "DENSE_MAX_ENTRIES", 40 * 40)
    small = make_qkv(1, 4, 2, 40, 40, 16, seed=1, planted=(9,))
    large = make_qkv(1, 4, 2, 41, 41, 16, seed=1, planted=(9,))
    decode = make_qkv(1, 4, 2, 1, 40, 16, seed=1, planted=(9,))
    act_attention(*small, heads=[0, 1], backend="torch")
    assert len(dense) == 1 and not pruned
    act_attention(*large, heads=[0, 1], backend="torch")
    assert len(dense) == 1 and len(pruned) == 1
    act_attention(*decode, heads=[0, 1], backend="torch")         # decode has its own path
    assert len(dense) == 1 and len(pruned) == 1
    # the choice depends on the shape alone: return_stats takes the same path
    act_attention(*small, heads=[0], backend="torch", return_stats=True)
    assert len(dense) == 2 and len(pruned) == 1


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_chunks_of_pairs_change_nothing(monkeypatch, window, padded):
    q, k, v = make_qkv(3, 6, 2, 29, 29, 32, seed=4, planted=(5, 17))
    kpm = left_padding(29, [0, 6, 11]) if padded else None
    heads = random_head_mask(3, 6, seed=4)
    kw = dict(heads=heads, tau=0.05, key_padding_mask=kpm, window=window, backend="torch",
              return_stats=True)
    out, stats = act_attention(q, k, v, **kw)
    monkeypatch.setattr(dense_path, "DENSE_CHUNK_FLOATS", 1)                # one pair a chunk
    out1, stats1 = act_attention(q, k, v, **kw)
    torch.testing.assert_close(out1, out, atol=1e-6, rtol=1e-6)
    assert torch.equal(stats1.sinks, stats.sinks)
    torch.testing.assert_close(stats1.scores, stats.scores, atol=1e-7, rtol=1e-6)


# (B, Hq, Hkv, Nq, Nk, D, planted, pads): the head search's own shape (a batch of left-padded
# prompts, all 9 heads of SmolLM2's layout), a chunk (Nq < Nk), odd sizes
SHAPES = [
    (8, 9, 3, 59, 59, 64, (3, 20), [0, 4, 9, 0, 17, 2, 30, 1]),
    (2, 4, 2, 23, 71, 40, (10, 50), [0, 33]),
    (1, 3, 1, 45, 45, 24, (1, 44), None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}/{s[2]}-Nq{s[3]}-Nk{s[4]}")
def test_dense_and_pruned_paths_agree_with_the_bruteforce(monkeypatch, shape):
    b, hq, hkv, nq, nk, d, planted, pads = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=nq, planted=planted)
    kpm = None if pads is None else left_padding(nk, pads)
    heads = torch.ones(b, hq, dtype=torch.bool)
    kw = dict(heads=heads, tau=0.1, key_padding_mask=kpm, backend="torch", return_stats=True)
    dense, d_stats = act_attention(q, k, v, **kw)
    monkeypatch.setattr(dense_path, "DENSE_MAX_ENTRIES", 0)
    pruned, p_stats = act_attention(q, k, v, **kw)
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, None, kpm)
    assert bool(bf.sinks.any())
    assert torch.equal(d_stats.sinks, bf.sinks) and torch.equal(p_stats.sinks, bf.sinks)
    scale_v = float(v.abs().max())
    for out in (dense, pruned):
        torch.testing.assert_close(out.double(), bf.out, atol=2e-5 * scale_v, rtol=1e-5)
    torch.testing.assert_close(d_stats.scores.double(), bf.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d_stats.sink_mass, p_stats.sink_mass, atol=2e-6, rtol=1e-5)


def test_rows_that_see_no_sink_keep_the_plain_output_bit_for_bit():
    """A causal row before the first sink, and every row of a head without one, are the plain
    path's rows exactly (the search recomputes only the positions from the first sink on)."""
    q, k, v = make_qkv(2, 4, 2, 37, 37, 32, seed=6, planted=(12,))
    kpm = left_padding(37, [0, 5])
    plain = act_attention(q, k, v, key_padding_mask=kpm, backend="torch")
    out, stats = act_attention(q, k, v, heads=[0, 1, 2, 3], key_padding_mask=kpm,
                               backend="torch", return_stats=True)
    assert bool(stats.sinks.any())
    first = torch.where(stats.sinks.any(-1), stats.sinks.float().argmax(-1), 37)   # [B, H]
    changed = 0
    for b in range(2):
        for h in range(4):
            f = int(first[b, h])
            assert torch.equal(out[b, h, :f], plain[b, h, :f]), (b, h, f)
            changed += int(not torch.equal(out[b, h, f:], plain[b, h, f:]))
    assert changed > 0      # and the rows that see a sink did change
