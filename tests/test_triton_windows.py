"""Sliding windows in the Triton kernels (interpreter on CPU), beyond the op-level cases of
``test_windows.py``: windows spanning several key blocks (every stage of the forward's walk),
key blocks left of every window never read, the column grid starting at the window, decode
splits over the window only, and the direct recompute of rows almost entirely on sinks.

The judge is the float64 brute force (``docs/spec.md``, "Attention windows")."""
import math
import os

import pytest
import torch

from helpers.optional import import_optional

triton = import_optional("triton", "triton")

from act_kernels import act_attention, calibration  # noqa: E402

from act_kernels import triton_backend as tb  # noqa: E402
from act_kernels.kernels import column_scores as cs_mod  # noqa: E402
from act_kernels.kernels import configs, decode  # noqa: E402

from bruteforce import bruteforce_details  # noqa: E402
from inputs import left_padding, make_qkv  # noqa: E402
from helpers.compare import check  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                                and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

BLOCK = configs.INTERP_BLOCK


def out_error(out, want, v):
    """max |out - want| in units of max |v|."""
    return ((out.double() - want.double()).abs().max() / v.double().abs().max()).item()


def windowed(q, k, v, window, heads=None, kpm=None, stats=False, tau=0.1):
    return act_attention(q, k, v, heads=heads, beta=0.4, tau=tau, key_padding_mask=kpm,
                         window=window, backend="triton", return_stats=stats)


# (Nq, Nk, W, pads): Nq = Nk = 70, W = 40: the tile of rows 48..63 walks a masked window edge
# [0, 32), full blocks [32, 48) and the diagonal [48, 64); chunked prefill with the first row's
# window starting at block 32; decode with a window that is not block-aligned
CASES = [(70, 70, 40, None), (70, 70, 19, [0, 21]), (20, 90, 24, None), (20, 90, 24, [0, 40]),
         (1, 90, 37, [0, 60])]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter block sizes")
@pytest.mark.parametrize("nq,nk,w,pads", CASES, ids=str)
def test_windows_over_many_blocks_match_the_bruteforce(nq, nk, w, pads):
    kpm = None if pads is None else left_padding(nk, pads)
    bsz = 1 if pads is None else len(pads)
    planted = sorted({nk - w // 2 - 1, nk - 3, nk - w + 1})
    q, k, v = make_qkv(bsz, 2, 1, nq, nk, 16, seed=nk + w, planted=planted)
    _, stats, bf = check("triton", q, k, v, heads=[0, 1], tau=0.05, key_padding_mask=kpm,
                         seed=nk + w, window=w)
    assert bool(bf.sinks.any())
    assert (stats.scores.cpu()[~bf.key_seen[:, None, :].expand_as(stats.scores)] == 0).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter block sizes")
@pytest.mark.parametrize("nq", [20, 1])
def test_key_blocks_left_of_every_window_are_never_read(nq):
    """NaN in K and V left of the first row's window: every pass skips those blocks (a masked
    load would still multiply them and give NaN), and the result is the brute force's."""
    nk, w = 90, 24
    skipped = (max(nk - nq - w + 1, 0) // BLOCK) * BLOCK        # 32 (prefill), 64 (decode)
    q, k, v = make_qkv(1, 2, 1, nq, nk, 16, seed=3, planted=(nk - 20, nk - 3), sink_logit=12.0)
    bf = bruteforce_details(q, k, v, torch.ones(1, 2, dtype=torch.bool), 0.4, 0.1, window=w)
    assert (1 - bf.sink_mass.max()) < calibration.stable_rest(torch.float32)   # recomputed too
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, :skipped] = float("nan")
    v_bad[:, :, :skipped] = float("nan")
    for stats in (False, True):       # decode: the one-pass kernel, then the general path
        got = windowed(q, k_bad, v_bad, w, heads=[0, 1], stats=stats)
        out = got[0] if stats else got
        assert torch.isfinite(out).all()
        assert out_error(out, bf.out, v) < 2e-5
        if stats:
            assert torch.isfinite(got[1].scores).all() and (got[1].scores[..., :skipped] == 0).all()
    plain = windowed(q, k_bad, v_bad, w)          # the forward's own output (no correction)
    assert out_error(plain, bf.plain, v) < 2e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter block sizes")
def test_column_grid_starts_at_the_first_rows_window(monkeypatch):
    nq, nk, w = 20, 90, 24
    q, k, v = make_qkv(1, 2, 2, nq, nk, 16, seed=5, planted=(80,))
    grids = []
    real = cs_mod.launch

    def spy(kernel, grid, *args, **kwargs):            # the column launcher's grids
        grids.append(grid(kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(cs_mod, "launch", spy)
    windowed(q, k, v, w, heads=[1])
    first_block = (nk - nq - w + 1) // BLOCK                     # block 2: keys 32..47
    assert grids == [(math.ceil(nk / BLOCK) - first_block, 1)]
    windowed(q, k, v, None, heads=[1])
    assert grids[1:] == [(math.ceil(nk / BLOCK), 1)]


@pytest.mark.parametrize("split", [None, 16])
def test_decode_window_keeps_the_sequences_first_valid_key(split, monkeypatch):
    """The first key of the window is a sink candidate like any other; the excluded key is the
    sequence's first valid key, outside the window here."""
    nk, w = 61, 29
    first_in_window = nk - w                                      # 32
    q, k, v = make_qkv(2, 2, 1, 1, nk, 16, seed=8, planted=(first_in_window, nk - 6),
                       sink_logit=3.0)
    kpm = left_padding(nk, [0, 5])
    heads = torch.ones(2, 2, dtype=torch.bool)
    first = tb.first_valid_index(kpm, 2, q.device).to(torch.int32)
    no_slot = torch.full((4,), -1, dtype=torch.int32)
    flags = []
    real = decode.launch

    def spy(kernel, grid, *args, **kwargs):            # the split kernel's overflow flags
        if kernel is decode._decode_split_kernel:
            flags.append(args[11])
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(decode, "launch", spy)
    fast, _, _, mass = decode.decode_attention(
        q, k, v, 16 ** -0.5, kpm.to(torch.int8), first, no_slot, 0,
        calibrated=heads.reshape(-1).to(torch.int8), beta=0.4, tau=0.1, split_size=split,
        window=w)
    assert len(flags) == 1 and not flags[0].any()
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, key_padding_mask=kpm, window=w)
    assert bf.sinks[..., first_in_window].all()
    assert out_error(fast, bf.out, v) < 2e-5
    assert torch.allclose(mass.view(2, 2).double(), bf.sink_mass[..., 0], atol=2e-6)
    _, st = windowed(q, k, v, w, heads=heads, kpm=kpm, stats=True)     # the general path
    assert torch.equal(st.sinks.cpu(), bf.sinks)


@pytest.mark.parametrize("nq,nk", [(40, 40), (1, 37)])
def test_dominant_sinks_in_a_window_are_recomputed_directly(nq, nk, monkeypatch):
    """Rows with 1 - m ~ 1e-5 take the correction's (or the decode epilogue's) softmax over the
    window's non-sink keys; without it, u - w cancels."""
    w = 12
    q, k, v = make_qkv(1, 2, 2, nq, nk, 16, seed=4, planted=(2, 13, 24, 35), sink_logit=12.0)
    heads = torch.ones(1, 2, dtype=torch.bool)
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, window=w)
    assert (1 - bf.sink_mass[..., -1] < 0.01).all(), "test needs rows with 1 - m < STABLE_REST"
    assert out_error(windowed(q, k, v, w, heads=heads), bf.out, v) < 2e-6
    monkeypatch.setitem(calibration.STABLE_REST, torch.float32, 0.0)    # what the kernels get
    assert out_error(windowed(q, k, v, w, heads=heads), bf.out, v) > 5e-5
