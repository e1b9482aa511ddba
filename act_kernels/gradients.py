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
        _warn_once(ctx.backend)
        saved = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        inputs = [t.detach().requires_grad_(w) for t, w in zip(saved, wanted)]
        with torch.enable_grad():
            out = ctx.exact(*inputs)
            asked = [t for t, w in zip(inputs, wanted) if w]
            got = iter(torch.autograd.grad(out, asked, grad_out, allow_unused=True))
        grads = [next(got) if w else None for w in wanted]
        grads = [g if g is not None or not w else torch.zeros_like(t)
                 for g, w, t in zip(grads, wanted, saved)]
        return (*grads, None, None, None)


def differentiable_call(q, k, v, fast: Callable, exact: Callable, backend: str):
    """``fast(q, k, v)``, with the gradients of ``exact(q, k, v)``."""
    return ACTFunction.apply(q, k, v, fast, exact, backend)
