"""The GQA-packed decode kernels (interpreter on CPU): one program holds every query row of a
kv head's group, each row with its own softmax state and candidate buffer.

Judged against the float64 brute force on odd group sizes, with left padding, windows and a mix
of calibrated and uncalibrated rows in one group; uncalibrated rows must be bit-identical to the
plain path (``heads=None``) of the same backend."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from act_kernels import act_attention  # noqa: E402
from act_kernels.kernels import configs, decode  # noqa: E402

from bruteforce import bruteforce_details  # noqa: E402
from inputs import left_padding, make_qkv  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                                and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def out_error(out, want, v):
    """max |out - want| in units of max |v|."""
    return ((out.double() - want.double()).abs().max() / v.double().abs().max()).item()


@pytest.fixture
def decode_launches(monkeypatch):
    """Records every decode launch (kernel, grid, args, kwargs) by wrapping ``decode.launch``."""
    seen = []
    real = decode.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel, grid, args, kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(decode, "launch", spy)
    return seen


def mixed_heads(bsz, hkv, group, seed):
    """Bool [B, Hq]: in every group of more than one row, calibrated and uncalibrated rows."""
    gen = torch.Generator().manual_seed(seed)
    heads = torch.rand(bsz, hkv, group, generator=gen) < 0.5
    if group > 1:
        heads[..., 0] = True
        heads[..., -1] = False
    else:
        heads[:, ::2] = True
    return heads.reshape(bsz, hkv * group)


@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("window", [None, 21])
def test_packed_decode_matches_bruteforce_and_plain(group, window, decode_launches):
    bsz, hkv, nk = 2, 2, 53
    hq = group * hkv
    q, k, v = make_qkv(bsz, hq, hkv, 1, nk, 24, seed=group * 10 + (window or 0),
                       planted=(7, nk - 9), sink_logit=3.5)
    kpm = left_padding(nk, [0, 6])
    heads = mixed_heads(bsz, hkv, group, seed=group)
    kw = dict(beta=0.4, tau=0.1, key_padding_mask=kpm, window=window, backend="triton")
    out = act_attention(q, k, v, heads=heads, **kw)
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1, key_padding_mask=kpm, window=window)
    assert out_error(out, bf.out, v) < 2e-5
    assert bf.changed[heads].any(), "the test needs calibrated rows that change"
    # one program per (split, group chunk): K/V blocks are shared by the group's rows
    split = next(launch for launch in decode_launches
                 if launch[0] is decode._decode_split_kernel)
    block_g, chunks = configs.decode_group_block(group)
    assert split[1][1] == bsz * hkv * chunks and split[3]["BLOCK_G"] == block_g
    assert split[3]["TRACK"] and not split[2][11].any()          # no candidate buffer overflowed
    # uncalibrated rows: bit for bit the plain path of the same backend
    plain = act_attention(q, k, v, heads=None, **kw)
    assert torch.equal(out[~heads], plain[~heads])
    assert out_error(plain, bf.plain, v) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_decode_half_precision(dtype):
    bsz, hkv, group, nk = 1, 2, 7, 40
    q, k, v = make_qkv(bsz, group * hkv, hkv, 1, nk, 16, seed=3, dtype=dtype, planted=(4,),
                       sink_logit=4.0)
    heads = mixed_heads(bsz, hkv, group, seed=5)
    out = act_attention(q, k, v, heads=heads, tau=0.1, backend="triton")
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1)
    assert out_error(out, bf.out, v) < {torch.bfloat16: 2.5e-2, torch.float16: 3e-3}[dtype]
    plain = act_attention(q, k, v, heads=None, tau=0.1, backend="triton")
    assert torch.equal(out[~heads], plain[~heads])


def test_packed_decode_guard_for_some_rows_of_a_group(monkeypatch):
    """Rows almost entirely on a sink (1 - m < STABLE_REST) next to rows that are not, in one
    group: the group's direct pass serves the first, the others keep the identity."""
    bsz, hkv, group, nk = 1, 1, 3, 37
    q, k, v = make_qkv(bsz, group, hkv, 1, nk, 16, seed=4, planted=(2,), sink_logit=12.0)
    q[:, 1] = make_qkv(bsz, 1, 1, 1, nk, 16, seed=9)[0][:, 0]      # row 1: no dominant sink
    heads = torch.ones(bsz, group, dtype=torch.bool)
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1)
    rest = 1 - bf.sink_mass[0, :, 0]
    assert rest[0] < 0.01 and rest[2] < 0.01 and rest[1] > 0.2
    out = act_attention(q, k, v, heads=heads, tau=0.1, backend="triton")
    assert out_error(out, bf.out, v) < 2e-6


def test_groups_larger_than_a_tile_are_cut_into_chunks(monkeypatch, decode_launches):
    """A group of 20 rows with 16-row tiles: two programs per kv head, the second one with 4
    real rows and 12 padded ones; the same results as the brute force."""
    monkeypatch.setattr(configs, "MAX_BLOCK_G", 16)
    bsz, hkv, group, nk = 1, 1, 20, 30
    q, k, v = make_qkv(bsz, group, hkv, 1, nk, 16, seed=6, planted=(3,), sink_logit=3.0)
    heads = mixed_heads(bsz, hkv, group, seed=2)
    out = act_attention(q, k, v, heads=heads, tau=0.1, backend="triton")
    bf = bruteforce_details(q, k, v, heads, 0.4, 0.1)
    assert out_error(out, bf.out, v) < 2e-5
    split = decode_launches[0]
    assert split[1][1] == 2 and split[3]["BLOCK_G"] == 16
