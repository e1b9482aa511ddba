"""Gradients through the forward-only backends (issue 21 section 3): the fused forward, the
eager reference's backward (``act_kernels.gradients``), checked by ``gradcheck`` and against
the reference's own gradients; a Transformers model trains through ``act_torch`` as through the
reference."""
from __future__ import annotations

import warnings

import pytest
import torch

from act_kernels import ACTProfile, act_attention, apply_profile, gradients
import act_kernels.hf.attention as hf_attention
from helpers.models import tiny_llama


def planted(b=2, hq=4, hkv=2, nq=7, nk=9, d=5, dtype=torch.float64, seed=0):
    """Odd sizes; key 2 pulled towards the queries so that it is a sink of most rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    k[:, :, 2] = q.mean(2).reshape(b, hkv, -1, d).mean(2) * 3
    return q, k, v


def _gradcheck_torch_backend(q, k, v, args) -> bool:
    """``gradcheck`` of the torch backend's output (its backward: the eager reference's) in
    float64, against finite differences of its own forward."""
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.autograd.gradcheck(
            lambda q, k, v: act_attention(q, k, v, backend="torch", **args), inputs,
            eps=1e-6, atol=1e-6, rtol=1e-5)


def _sinks_found(q, k, v, **kw):
    _, stats = act_attention(q, k, v, backend="eager", return_stats=True, **kw)
    return bool(stats.sinks.any())


@pytest.mark.parametrize("kw", [dict(), dict(window=4), dict(key_padding_mask="left")],
                         ids=["causal", "window", "padding"])
def test_gradcheck_of_the_torch_backend(kw):
    q, k, v = planted(b=2, hq=2, hkv=1, nq=5, nk=7, d=3)
    if kw.get("key_padding_mask") == "left":
        kpm = torch.ones(2, 7, dtype=torch.bool)
        kpm[1, :2] = False
        kw = dict(key_padding_mask=kpm)
    args = dict(heads=[1], tau=0.08, **kw)
    assert _sinks_found(q, k, v, **args)            # the calibration is on the path checked
    assert _gradcheck_torch_backend(q, k, v, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_the_references(dtype):
    q, k, v = planted(dtype=dtype, nq=9)
    grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    got, want = [], []
    for backend, into in (("torch", got), ("eager", want)):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = act_attention(*inputs, heads=[1, 2], tau=0.08, backend=backend)
        out.backward(grad)
        into.extend(t.grad for t in inputs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)        # the backward *is* the reference's


def test_only_the_inputs_that_require_grad_get_one_and_the_forward_is_the_fused_one(
        monkeypatch):
    monkeypatch.setattr(gradients, "_WARNED", set())
    q, k, v = planted(dtype=torch.float32)
    k = k.clone().requires_grad_(True)
    out = act_attention(q, k, v, heads=[0], tau=0.08, backend="torch")
    with torch.no_grad():
        fused = act_attention(q, k, v, heads=[0], tau=0.08, backend="torch")
    assert out.requires_grad and torch.equal(out.detach(), fused)
    with pytest.warns(UserWarning, match="recomputes the call with the eager reference"):
        out.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0
    assert q.grad is None and v.grad is None


def test_stats_come_with_a_differentiable_output():
    q, k, v = planted(dtype=torch.float32)
    q = q.clone().requires_grad_(True)
    out, stats = act_attention(q, k, v, heads=[0], tau=0.08, backend="torch", return_stats=True)
    with torch.no_grad():
        _, want = act_attention(q, k, v, heads=[0], tau=0.08, backend="torch",
                                return_stats=True)
    assert torch.equal(stats.sinks, want.sinks) and out.requires_grad


def _train_step(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_a_model_trains_through_act_torch_as_through_the_reference(monkeypatch):
    """One training step of a profiled tiny Llama: ``act_torch`` gives the gradients of the
    same model whose attention calls the op with the differentiable eager reference (the q/k/v
    projections included: they once got none), and differs from the uncalibrated model's."""
    profile = ACTProfile(heads={1: [0, 2], 2: [1]}, tau=0.05)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("torch", "eager"):
        if backend == "eager":
            monkeypatch.setattr(hf_attention, "act_attention",
                                lambda *a, **kw: act_attention(*a, **{**kw, "backend": "eager"}))
        model = apply_profile(tiny_llama(0), profile, backend="torch").train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[backend] = _train_step(model, ids)
    loss, grads = results["torch"]
    want_loss, want = results["eager"]
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert "model.layers.1.self_attn.q_proj.weight" in grads
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)
    plain = tiny_llama(0).train()
    _, plain_grads = _train_step(plain, ids)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(plain_grads[name], grads[name], atol=1e-5)


def _step_and_variant(seed, variant):
    """One training step of a tiny Llama calibrating layer 1's heads 0 and 2, then the same step
    of ``variant(model)`` (a model changed or wrapped): ``(loss, grads), (loss, grads)``."""
    profile = ACTProfile(heads={1: [0, 2]}, tau=0.05)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(seed))
    model = apply_profile(tiny_llama(0), profile, backend="torch").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _train_step(model, ids)
        return first, _train_step(variant(model), ids)


def _checkpointed(model):
    model.gradient_checkpointing_enable()
    return model


def test_gradient_checkpointing_trains_through_act_torch():
    (loss, grads), (loss_ckpt, grads_ckpt) = _step_and_variant(2, _checkpointed)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask", ["segments", "blocks", "attn_mask"])
def test_gradcheck_under_the_general_masks(mask):
    q, k, v = planted(b=1, hq=2, hkv=1, nq=7, nk=7, d=3)
    kw = {"segments": dict(segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1, 1]])),
          "blocks": dict(block_ids=torch.tensor([[-1, -1, 0, 0, 0, -1, -1]])),
          "attn_mask": dict(attn_mask=torch.rand(1, 7, 7, generator=torch.Generator()
                                                 .manual_seed(3)) < 0.6)}[mask]
    args = dict(heads=[0], tau=0.08, **kw)
    assert _gradcheck_torch_backend(q, k, v, args)


def test_gradients_through_the_compiled_op():
    q, k, v = planted(dtype=torch.float32, nq=9)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: act_attention(q, k, v, heads=[1, 2], tau=0.08,
                                                           backend="torch"), fullgraph=True)
    got, want = [], []
    for fn, into in ((compiled, got), (lambda q, k, v: act_attention(
            q, k, v, heads=[1, 2], tau=0.08, backend="eager"), want)):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(*inputs).backward(grad)
        into.extend(t.grad for t in inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_compiled_model_trains_through_act_torch():
    """A training step of a compiled (AOTAutograd) profiled model: the opaque attention op's
    registered backward gives the eager model's gradients."""
    def compiled(model):
        torch._dynamo.reset()
        return torch.compile(model, backend="aot_eager")

    (loss, grads), (loss_c, grads_c) = _step_and_variant(5, compiled)
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    grads_c = {name.removeprefix("_orig_mod."): g for name, g in grads_c.items()}
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, atol=1e-5, rtol=1e-4)
