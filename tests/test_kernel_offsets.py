"""64-bit address arithmetic in the Triton kernels (issue 10, item 5).

Triton types an integer kernel argument as i32 whenever its value fits, and ``tl.program_id``
is i32, so ``b * stride_qb`` computed from them wraps once a tensor holds more than 2**31
elements. The kernels widen every base offset to int64 (``common.head_prologue`` for the
coordinates, ``common.tile_offsets`` / ``load_rows_t`` / ``store_rows`` for tiles).

Two checks, both under the interpreter, which computes i32 arithmetic in numpy int32 (it wraps
exactly as the GPU does):

1. ``test_offsets_at_a_large_shape``: the strides the launcher passes for a large shape
   (taken from ``meta`` tensors, no memory) go through the kernels' own prologue and tile
   helpers in a tiny jit kernel; the offsets of the last rows must equal Python's exact integers.
   Note the issue's example B=4, H=32, N=128k, D=128 holds exactly 2**31 elements, so its
   largest offset (2**31 - 1) still fits in i32; the test uses B=8 (2**32 elements), where
   32-bit math really wraps.
2. ``test_kernels_read_past_2_31_elements``: every real kernel (forward, column scores, sink
   correction, both decode kernels) runs on q/k/v views whose batch stride puts batch row 2
   past element 2**31 of one storage. A full-size run at B=8, H=32, N=128k needs 2**32 * 2 bytes
   per tensor (8 GiB, more than this machine's memory next to the interpreter's copies) and
   days of interpreter time, so the views are sparse: a 4 GiB allocation of which only the few
   rows used are ever touched (Linux commits pages on first write). With 32-bit offsets the
   kernel would read 4 GiB before the storage (a crash or garbage), so it runs in a subprocess
   and must give exactly the output of the same inputs stored contiguously.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.optional import import_optional

triton = import_optional("triton", "triton")
import triton.language as tl  # noqa: E402

from act_kernels.kernels import common  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (TRITON_INTERPRET=1, as in make test)")

BIG = dict(bsz=8, hq=32, hkv=8, n=128 * 1024, dim=128)


@triton.jit
def _offsets_probe(Out, Kpm, Rows, stride_b, stride_h, stride_n, stride_d, Hq, group, Nk,
                   D: tl.constexpr, N_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """For program ``bh``: the element offsets of rows ``Rows`` (lane 0 and the last lane) of
    query head h and of kv head kvh, built exactly as the kernels build them."""
    bh, b, h, kvh, offs_d, d_ok, kpm_row = common.head_prologue(tl.program_id(0), Hq, group, Kpm,
                                                                Nk, D, BLOCK_D)
    rows = tl.load(Rows + tl.arange(0, N_ROWS))
    q_off = b * stride_b + h * stride_h + common.tile_offsets(rows, stride_n, offs_d, stride_d)
    kv_off = b * stride_b + kvh * stride_h + common.tile_offsets(rows, stride_n, offs_d,
                                                                   stride_d)
    lanes = tl.arange(0, N_ROWS)
    base = Out + bh * (4 * N_ROWS)
    tl.store(base + lanes, tl.sum(tl.where(offs_d[None, :] == 0, q_off, 0), 1))
    tl.store(base + N_ROWS + lanes, tl.sum(tl.where(offs_d[None, :] == D - 1, q_off, 0), 1))
    tl.store(base + 2 * N_ROWS + lanes, tl.sum(tl.where(offs_d[None, :] == 0, kv_off, 0), 1))
    tl.store(base + 3 * N_ROWS + lanes, tl.sum(tl.where(offs_d[None, :] == D - 1, kv_off, 0), 1))


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_offsets_at_a_large_shape(layout):
    bsz, hq, hkv, n, dim = BIG.values()
    shape = (bsz, hq, n, dim)
    if layout == "bhnd":
        q = torch.empty(shape, device="meta", dtype=torch.float16)
    else:
        q = torch.empty(bsz, n, hq, dim, device="meta", dtype=torch.float16).transpose(1, 2)
    assert q.numel() == 2 ** 32
    sb, sh, sn, sd = q.stride()
    rows = torch.tensor([0, 1, n // 2, n - 1], dtype=torch.int32)
    out = torch.zeros(bsz * hq * 4 * 4, dtype=torch.int64)
    kpm = torch.zeros(1, dtype=torch.int8)      # never read
    _offsets_probe[(bsz * hq,)](out, kpm, rows, sb, sh, sn, sd, hq, hq // hkv, n, dim,
                                N_ROWS=4, BLOCK_D=dim)
    want = []
    for bh in range(bsz * hq):
        b, h = divmod(bh, hq)
        kvh = h // (hq // hkv)
        for head, lane in ((h, 0), (h, dim - 1), (kvh, 0), (kvh, dim - 1)):
            want += [b * sb + head * sh + int(r) * sn + lane * sd for r in rows]
    got = out.tolist()
    assert max(want) > 2 ** 31, "the shape must need 64-bit offsets"
    assert got == want


_SPARSE_SCRIPT = textwrap.dedent("""
    import os, sys, resource
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests!r})
    import torch
    from act_kernels import act_attention
    from inputs import make_qkv, left_padding

    torch.manual_seed(0)
    bsz, hq, hkv, nk, dim, nq = 3, 2, 1, 24, 16, 20
    stride_b = 2 ** 30                       # batch row 2 starts at element 2**31
    big = torch.empty(2 * stride_b + 3 * 4096, dtype=torch.float16)

    def sparse_view(x, offset):
        b, h, n, d = x.shape
        view = big.as_strided(x.shape, (stride_b, n * d, d, 1), offset)
        view.copy_(x)                        # touches only these rows' pages
        return view

    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=3, dtype=torch.float16, planted=(5,))
    qs, ks, vs = sparse_view(q, 0), sparse_view(k, 4096), sparse_view(v, 8192)
    assert qs.storage_offset() + 2 * qs.stride(0) >= 2 ** 31
    kpm = left_padding(nk, [0, 3, 6])
    heads = torch.tensor([[True, False], [True, True], [False, True]])
    runs = {{
        "prefill": dict(q=(q, qs)),
        "chunked, stats": dict(q=(q[:, :, -5:], qs[:, :, -5:]), return_stats=True),
        "decode": dict(q=(q[:, :, -1:], qs[:, :, -1:])),
        "decode, stats": dict(q=(q[:, :, -1:], qs[:, :, -1:]), return_stats=True),
    }}
    for name, run in runs.items():
        (q_dense, q_sparse) = run.pop("q")
        kw = dict(heads=heads, key_padding_mask=kpm, backend="triton", **run)
        dense = act_attention(q_dense.contiguous(), k, v, **kw)
        sparse = act_attention(q_sparse, ks, vs, **kw)
        if run.get("return_stats"):
            assert torch.equal(dense[1].sinks, sparse[1].sinks), name
            dense, sparse = dense[0], sparse[0]
        assert torch.isfinite(sparse).all(), name
        assert torch.equal(dense, sparse), name + ": output differs"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("OK peak RSS GiB %.2f" % rss)
""")


def test_kernels_read_past_2_31_elements():
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _SPARSE_SCRIPT.format(tests=tests)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"kernels on views past 2**31 elements failed (exit {proc.returncode}; a negative exit "
        f"is a crash, e.g. a wrapped 32-bit offset):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    assert "OK" in proc.stdout
    # the 4 GiB allocation stays sparse: only the touched pages are resident
    assert float(proc.stdout.split()[-1]) < 3.0, proc.stdout
