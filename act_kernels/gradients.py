"""Gradients through the forward-only backends: their own forward, the eager reference's backward.

The torch and Triton backends compute ACT without the ``N x N`` map and have no backward of their
own (the kernels stay autograd-free). When a call needs gradients (grad mode on and q, k or v
requiring grad: a training step, or simply a model's forward outside ``torch.no_grad()``), the op
wraps the call in :class:`ACTFunction`: the forward is the fast backend's, unchanged; the
backward recomputes the same call with the eager reference (``act_kernels.reference``, the
contract written out on the full map) and differentiates that. The sink set is a discrete choice
and is held fixed, as in the reference; everything else (the softmax, the sink mass, the
recalibrated rows, the output) is differentiated exactly.

The backward is the slower named path: it holds the ``[B, Hq, Nq, Nk]`` map of the call in the
working precision, once, while it runs. It warns the first time it runs.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch


def needs_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Does a call on ``q, k, v`` build an autograd graph (grad mode on, one of them requires
    grad)?"""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


_WARNED = set()


def _warn_once(backend: str) -> None:
    if backend in _WARNED:
        return
    _WARNED.add(backend)
    warnings.warn(
        f"act_attention: backward through the {backend!r} backend recomputes the call with the "
        "eager reference (exact, differentiable, but it holds the full [B, Hq, Nq, Nk] attention "
        "map while the backward runs); the forward stays the fused one", stacklevel=3)


class ACTFunction(torch.autograd.Function):
    """``forward(q, k, v, fast, exact, backend)``: ``fast(q, k, v)`` (no grad) is the output;
    its gradient is that of ``exact(q, k, v)``, the eager reference of the same call."""

    @staticmethod
    def forward(ctx, q, k, v, fast: Callable, exact: Callable, backend: str):
        ctx.save_for_backward(q, k, v)
        ctx.exact, ctx.backend = exact, backend
        with torch.no_grad():
            return fast(q, k, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads = reference_gradients(ctx.exact, *ctx.saved_tensors, grad_out,
                                    ctx.needs_input_grad[:3], ctx.backend)
        return (*grads, None, None, None)


def reference_gradients(exact: Callable, q, k, v, grad_out, wanted, backend: str):
    """The gradients of ``exact(q, k, v)`` (the eager reference of a call) against ``grad_out``
    for the inputs ``wanted`` says (a zero tensor for one that does not reach the output, None
    for one not wanted); the one backward of the fast backends, eager and compiled alike."""
    _warn_once(backend)
    inputs = [t.detach().requires_grad_(bool(w)) for t, w in zip((q, k, v), wanted)]
    asked = [t for t, w in zip(inputs, wanted) if w]
    with torch.enable_grad():
        out = exact(*inputs)
        got = iter(torch.autograd.grad(out, asked, grad_out, allow_unused=True))
    grads = [next(got) if w else None for w in wanted]
    return [torch.zeros_like(t) if g is None and w else g
            for g, w, t in zip(grads, wanted, (q, k, v))]


def autograd_inside_an_op():
    """A context that records autograd again inside a ``torch.library`` op's body, where the
    dispatcher excludes the autograd keys (the compiled op's backward differentiates the
    reference there); the other exclusions (autocast) stay."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    return torch._C._ForceDispatchKeyGuard(
        torch._C._dispatch_tls_local_include_set(),
        excluded.remove(torch._C.DispatchKey.AutogradFunctionality))


def differentiable_call(q, k, v, fast: Callable, exact: Callable, backend: str):
    """``fast(q, k, v)``, with the gradients of ``exact(q, k, v)``."""
    return ACTFunction.apply(q, k, v, fast, exact, backend)
