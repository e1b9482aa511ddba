"""Argument validation of ``act_kernels.act_attention``: every bad input is refused with an error
that names the problem, before any backend runs (so the checks hold for every backend)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from act_kernels import act_attention

BACKENDS = ["eager", "torch"]
B, HQ, HKV, NQ, NK, D = 2, 4, 2, 5, 7, 16


def qkv(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, NQ, D, generator=gen).to(dtype)
    k = torch.randn(B, HKV, NK, D, generator=gen).to(dtype)
    v = torch.randn(B, HKV, NK, D, generator=gen).to(dtype)
    return q, k, v


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("ndim", [3, 5])
def test_wrong_ndim(backend, which, ndim):
    tensors = dict(zip("qkv", qkv()))
    t = tensors[which]
    tensors[which] = t[0] if ndim == 3 else t[None]
    with pytest.raises(ValueError, match=rf"{which} must be 4-D \[B, H, N, D\]"):
        act_attention(**tensors, backend=backend)


def test_not_a_tensor(backend):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        act_attention(q.tolist(), k, v, backend=backend)


def test_dtype_mismatch(backend):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q, k, v dtypes differ"):
        act_attention(q, k.half(), v.half(), backend=backend)
    with pytest.raises(TypeError, match="differ: torch.float32, torch.float32, torch.bfloat16"):
        act_attention(q, k, v.bfloat16(), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(backend, dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"q has dtype {dtype}; expected one of float16"):
        act_attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend)


def test_device_mismatch(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="different devices: cpu, meta, cpu"):
        act_attention(q, k.to("meta"), v, backend=backend)


def test_kv_shape_mismatch(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=re.escape("k and v shapes differ: (2, 2, 7, 16) vs "
                                                   "(2, 2, 6, 16)")):
        act_attention(q, k, v[:, :, :6], backend=backend)


def test_batch_mismatch(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch sizes differ: q has 1, k/v have 2"):
        act_attention(q[:1], k, v, backend=backend)


def test_head_dim_mismatch(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dims differ: q has D=8, k/v have D=16"):
        act_attention(q[..., :8], k, v, backend=backend)


@pytest.mark.parametrize("hq", [3, 5, 1])
def test_query_heads_not_a_multiple_of_kv_heads(backend, hq):
    q, k, v = qkv()
    q = torch.randn(B, hq, NQ, D)
    with pytest.raises(ValueError, match=rf"Hq={hq} query heads is not a multiple of Hkv=2"):
        act_attention(q, k, v, backend=backend)


def test_more_queries_than_keys(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Nq=7 queries exceed Nk=5 keys"):
        act_attention(torch.randn(B, HQ, 7, D), k[:, :, :5], v[:, :, :5], backend=backend)


@pytest.mark.parametrize("dim,match", [(0, "empty input"), (2, "empty input"), (3, "empty input"),
                                       (1, "Hq=4 query heads is not a multiple of Hkv=0")])
def test_empty_input(backend, dim, match):
    q, k, v = qkv()
    if dim == 2:
        q = q[:, :, :0]
    elif dim == 1:   # no kv heads
        k, v = k[:, :0], v[:, :0]
    else:
        q, k, v = (t.narrow(dim, 0, 0) for t in (q, k, v))
    with pytest.raises(ValueError, match=match):
        act_attention(q, k, v, backend=backend)


# ----------------------------------------------------------------------------------------------
# scalars
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [-0.1, -1e-12, 1.0 + 1e-9, 2.0, math.nan, math.inf, -math.inf])
def test_beta_out_of_range(backend, beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        act_attention(*qkv(), heads=[0], beta=beta, backend=backend)


@pytest.mark.parametrize("tau", [0.0, -0.0, -1e-9, -0.5, math.nan, -math.inf])
def test_tau_not_positive(backend, tau):
    with pytest.raises(ValueError, match="tau must be > 0"):
        act_attention(*qkv(), heads=[0], tau=tau, backend=backend)


@pytest.mark.parametrize("name,value", [(name, value) for name in ("beta", "tau", "scale")
                                        for value in ("0.4", True, None, [0.4])
                                        if (name, value) != ("scale", None)])   # None: default
def test_scalar_of_wrong_type(backend, name, value):
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        act_attention(*qkv(), **{name: value}, backend=backend)


@pytest.mark.parametrize("scale", [0.0, math.nan, math.inf, -math.inf])
def test_bad_scale(backend, scale):
    with pytest.raises(ValueError, match="scale must be finite and non-zero"):
        act_attention(*qkv(), scale=scale, backend=backend)


def test_scalar_boundaries_and_tensor_scalars_are_accepted(backend):
    q, k, v = qkv()
    for beta in (0.0, 1.0, torch.tensor(0.5)):
        out = act_attention(q, k, v, heads=[1], beta=beta, backend=backend)
        assert out.shape == q.shape and torch.isfinite(out).all()
    out = act_attention(q, k, v, heads=[1], tau=torch.tensor(1e-9), scale=torch.tensor(0.2),
                        backend=backend)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,bad", [([HQ], HQ), ([0, 9], 9), ([-1], -1), ([1, -4], -4),
                                        (HQ, HQ), (-1, -1), (torch.tensor([0, HQ]), HQ)])
def test_head_index_out_of_range(backend, heads, bad):
    with pytest.raises(ValueError, match=f"head index {bad} out of range: there are {HQ} query"):
        act_attention(*qkv(), heads=heads, backend=backend)


@pytest.mark.parametrize("shape", [(HQ + 1,), (HQ - 1,), (B, HQ + 1), (B + 1, HQ), (1, HQ),
                                   (B, HQ, 1), ()])
def test_bool_heads_of_wrong_shape(backend, shape):
    with pytest.raises(ValueError, match=r"bool heads must have shape \[Hq\]=\[4\] or \[B, Hq\]"):
        act_attention(*qkv(), heads=torch.ones(shape, dtype=torch.bool), backend=backend)


@pytest.mark.parametrize("heads,match", [
    (torch.ones(HQ), "heads must be a bool mask"),                       # float tensor
    (torch.zeros(B, HQ, dtype=torch.long), "heads must be a bool mask"),  # 2-D index tensor
    ([0.0, 1.0], "head indices must be integers"),
    ([True, False, True, False], "head indices must be integers"),
    ("0", "heads must be None, a bool tensor"),
    (1.5, "heads must be None, a bool tensor"),
])
def test_heads_of_wrong_type(backend, heads, match):
    with pytest.raises(TypeError, match=match):
        act_attention(*qkv(), heads=heads, backend=backend)


@pytest.mark.parametrize("good,bad", [([0, 1], [0.0, 1.0]), ([1, 0, 1, 0], [True, False, True, False])])
def test_a_valid_list_seen_first_does_not_vouch_for_an_equal_invalid_one(backend, good, bad):
    """``[0.0, 1.0] == [0, 1]`` in Python: the op's cache of head lists must not mix them up."""
    act_attention(*qkv(), heads=good, backend=backend)
    with pytest.raises(TypeError, match="head indices must be integers"):
        act_attention(*qkv(), heads=bad, backend=backend)


# ----------------------------------------------------------------------------------------------
# key padding mask
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(B, NK - 1), (B, NK + 1), (B + 1, NK), (NK,), (B, 1, NK),
                                   (B, NQ)])
def test_key_padding_mask_of_wrong_shape(backend, shape):
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, Nk\]=\[2, 7\]"):
        act_attention(*qkv(), key_padding_mask=torch.ones(shape, dtype=torch.bool),
                      backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.complex64])
def test_key_padding_mask_of_float_dtype(backend, dtype):
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        act_attention(*qkv(), key_padding_mask=torch.ones(B, NK, dtype=dtype), backend=backend)


def test_key_padding_mask_not_a_tensor(backend):
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        act_attention(*qkv(), key_padding_mask=[[1] * NK] * B, backend=backend)


def test_integer_key_padding_mask_must_be_zero_one(backend):
    mask = torch.ones(B, NK, dtype=torch.long)
    mask[1, 0] = 2
    with pytest.raises(ValueError, match="integer key_padding_mask must hold only 0 and 1"):
        act_attention(*qkv(), key_padding_mask=mask, backend=backend)


def test_integer_key_padding_mask_means_the_bool_one(backend):
    """Transformers' attention masks are 0/1 integers: they must act like the bool mask."""
    q, k, v = qkv()
    mask = torch.ones(B, NK, dtype=torch.bool)
    mask[1, :3] = False
    want = act_attention(q, k, v, heads=[0, 3], key_padding_mask=mask, backend=backend)
    got = act_attention(q, k, v, heads=[0, 3], key_padding_mask=mask.long(), backend=backend)
    assert torch.equal(got, want)
    assert not torch.equal(want, act_attention(q, k, v, heads=[0, 3], backend=backend))


def test_key_padding_mask_on_another_device(backend):
    with pytest.raises(ValueError, match="key_padding_mask is on meta but q is on cpu"):
        act_attention(*qkv(), key_padding_mask=torch.ones(B, NK, dtype=torch.bool, device="meta"),
                      backend=backend)


# ----------------------------------------------------------------------------------------------
# backend
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cuda", "Eager", "", "flash", None, 1])
def test_unknown_backend(name):
    with pytest.raises(ValueError, match=re.escape(f"unknown backend {name!r}; choose one of")):
        act_attention(*qkv(), backend=name)


def test_validation_happens_before_the_backend_runs():
    """A bad argument is reported as itself even with a backend that could not run here."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="tau must be > 0"):
        act_attention(q, k, v, tau=0.0, backend="triton")
    with pytest.raises(ValueError, match="head index 7 out of range"):
        act_attention(q, k, v, heads=[7], backend="triton")


# ----------------------------------------------------------------------------------------------
# the steady-state fast path (a layer's repeated call skips the checks it passed before)
# ----------------------------------------------------------------------------------------------

def test_steady_calls_skip_the_full_checks_but_still_refuse_bad_arguments(backend, monkeypatch):
    """After one valid call, a call with the same shapes, parameters and mask takes the fast
    path (no full validation); each bad argument of the same call is still refused by name."""
    from act_kernels import op

    q, k, v = qkv()
    heads = torch.tensor([True, False, False, True])
    want = act_attention(q, k, v, heads=heads, backend=backend)

    def full_path(*args, **kwargs):
        raise AssertionError("the steady call ran the full validation")
    with monkeypatch.context() as patch:
        patch.setattr(op, "_check_tensors", full_path)
        patch.setattr(op, "normalize_heads", full_path)
        assert torch.equal(act_attention(q, k, v, heads=heads, backend=backend), want)
    bad = [(dict(beta=1.5), ValueError, "beta must be in"),
           (dict(beta=math.nan), ValueError, "beta must be in"),
           (dict(tau=-0.1), ValueError, "tau must be > 0"),
           (dict(tau=math.nan), ValueError, "tau must be > 0"),
           (dict(scale=math.inf), ValueError, "scale must be finite"),
           (dict(scale=0.0), ValueError, "scale must be finite and non-zero"),
           (dict(window=0), ValueError, "window must be >= 1"),
           (dict(window=True), TypeError, "window must be None or a positive integer"),
           (dict(backend="Torch"), ValueError, "unknown backend"),
           (dict(heads=torch.ones(HQ + 1, dtype=torch.bool)), ValueError,
            "bool heads must have"),
           (dict(heads=torch.ones(HQ)), TypeError, "heads must be a bool mask"),
           (dict(heads=torch.tensor([0, HQ])), ValueError, f"head index {HQ} out of range")]
    for change, error, message in bad:
        args = {"heads": heads, "backend": backend, **change}
        for _ in range(2):                # a refused call is never remembered as valid
            with pytest.raises(error, match=message):
                act_attention(q, k, v, **args)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        act_attention(q, k, v[:, :, :-1], heads=heads, backend=backend)


def test_steady_heads_follow_in_place_edits_and_are_not_kept_alive(backend):
    """The fast path's answer for a mask follows the mask's edits (its version), and the cache
    holds no reference to the mask."""
    import gc
    import weakref

    q, k, v = make_planted()
    heads = torch.tensor([True, False, False, False])
    first = act_attention(q, k, v, heads=heads, tau=0.05, backend=backend)
    heads[0], heads[3] = False, True
    moved = act_attention(q, k, v, heads=heads, tau=0.05, backend=backend)
    assert torch.equal(moved, act_attention(q, k, v, heads=[3], tau=0.05, backend=backend))
    assert not torch.equal(moved, first)
    heads.zero_()                                  # calibrates nothing: the plain output
    assert torch.equal(act_attention(q, k, v, heads=heads, tau=0.05, backend=backend),
                       act_attention(q, k, v, tau=0.05, backend=backend))
    gone = weakref.ref(heads)
    del heads
    gc.collect()
    assert gone() is None


def make_planted():
    """qkv() with key 2 made a sink of every row (so calibrating a head changes it)."""
    q, k, v = qkv()
    k[:, :, 2] = q.mean(2).mean(1, keepdim=True) * 4
    return q, k, v


@pytest.mark.parametrize("heads", ["12", b"12", 1.5, {1, 2}])
def test_heads_are_read_alike_inside_torch_compile(backend, heads):
    """Compiled and eager calls read ``heads`` by the same rule: a string is not a list of head
    indices (the compiled path once iterated it, calibrating heads {1, 2})."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match="heads must be None, a bool tensor") as eager:
        act_attention(q, k, v, heads=heads, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: act_attention(q, k, v, heads=heads, backend=backend),
                             fullgraph=True)
    with pytest.raises(Exception, match=re.escape(str(eager.value))):
        compiled(q)


def test_compiled_heads_lists_give_the_eager_output(backend):
    q, k, v = make_planted()
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: act_attention(q, k, v, heads=[3, "0", 3], tau=0.05,
                                                     backend=backend), fullgraph=True)
    want = act_attention(q, k, v, heads=[0, 3], tau=0.05, backend=backend)
    assert torch.equal(compiled(q), want)
    assert not torch.equal(want, act_attention(q, k, v, tau=0.05, backend=backend))
