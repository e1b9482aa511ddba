"""Small, seeded input generators for the ACT tests.

* :func:`make_qkv`: random q/k/v, optionally with *planted sinks* (keys every query aligns with,
  so they draw a large share of every row's attention wherever they sit) and in the transposed
  ``[B, N, H, D] -> [B, H, N, D]`` views that Transformers passes.
* :func:`integer_qkv`: q/k/v with small integer entries, so that ``q k^T`` is exact in float32
  and a backend's logits equal the brute force's even when they are huge.
* :func:`left_padding`, :func:`random_pads`: left-padding masks (True = real token).
* :func:`random_head_mask`: a different set of calibrated heads in each batch row.

Inputs in float16/bfloat16 are drawn in float32 and rounded once; the brute force then reads the
rounded values, so it sees exactly what the backend sees.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` is ``[B, H, N, D]``; ``"bnhd"`` returns the same values as a transposed view of a
    contiguous ``[B, N, H, D]`` tensor (non-contiguous, like Transformers' q/k/v)."""
    if layout == "bhnd":
        return x.contiguous()
    if layout == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}")


def make_qkv(bsz: int, hq: int, hkv: int, nq: int, nk: int, dim: int, *, seed: int,
             dtype: torch.dtype = torch.float32, planted: Sequence[int] = (),
             sink_logit: float = 6.0, q_scale: float = 1.0, layout: str = "bhnd",
             scale: Optional[float] = None):
    """Random ``q [B, Hq, Nq, D]``, ``k``, ``v`` ``[B, Hkv, Nk, D]`` in ``dtype``.

    ``planted`` lists key positions that become sinks: every query gets a common direction ``u``
    and the planted keys point along it, which adds about ``sink_logit`` to their logits (for
    the softmax ``scale``, default ``D ** -0.5``) in every row and head. ``q_scale`` multiplies q
    at the end (huge logits).
    """
    gen = _generator(seed)
    scale = dim ** -0.5 if scale is None else scale
    q = torch.randn(bsz, hq, nq, dim, generator=gen)
    k = torch.randn(bsz, hkv, nk, dim, generator=gen)
    v = torch.randn(bsz, hkv, nk, dim, generator=gen)
    if planted:
        u = torch.randn(dim, generator=gen)
        u = u / u.norm()
        amp = (sink_logit / scale) ** 0.5
        q = q + amp * u
        for j in planted:
            k[:, :, j] = amp * u + 0.3 * torch.randn(bsz, hkv, dim, generator=gen)
    q = q * q_scale
    return tuple(_layout(t.to(dtype), layout) for t in (q, k, v))


def integer_qkv(bsz: int, hq: int, hkv: int, nq: int, nk: int, dim: int, *, seed: int,
                q_scale: int = 1000, dtype: torch.dtype = torch.float32):
    """q/k entries in ``{-2..2}`` (q times the integer ``q_scale``), v standard normal.

    Every product and partial sum of ``q k^T`` is an integer below ``2**24``, so float32 computes
    the logits exactly (times a power-of-two scale, e.g. ``D = 64``)."""
    gen = _generator(seed)
    q = torch.randint(-2, 3, (bsz, hq, nq, dim), generator=gen).float() * q_scale
    k = torch.randint(-2, 3, (bsz, hkv, nk, dim), generator=gen).float()
    v = torch.randn(bsz, hkv, nk, dim, generator=gen)
    assert 4 * dim * q_scale < 2 ** 24
    return q.to(dtype), k.to(dtype), v.to(dtype)


def left_padding(nk: int, pads: Sequence[int]) -> torch.Tensor:
    """Bool ``[B, Nk]``, True for real tokens, with ``pads[b]`` padded positions on the left."""
    mask = torch.ones(len(pads), nk, dtype=torch.bool)
    for b, p in enumerate(pads):
        assert 0 <= p <= nk
        mask[b, :p] = False
    return mask


def random_pads(bsz: int, nk: int, *, seed: int, max_frac: float = 0.5) -> list:
    """Different left-padding amounts per row; row 0 is never padded."""
    rng = random.Random(seed)
    top = max(0, int(nk * max_frac))
    return [0] + [rng.randint(0, top) for _ in range(bsz - 1)]


def random_head_mask(bsz: int, hq: int, *, seed: int) -> torch.Tensor:
    """Bool ``[B, Hq]``: a different, non-empty set of calibrated heads per batch row.

    With more than one head, every row also leaves at least one head uncalibrated, and row ``b``
    always calibrates head ``b % Hq``, so neighbouring rows differ.
    """
    gen = _generator(seed)
    mask = torch.rand(bsz, hq, generator=gen) < 0.5
    for b in range(bsz):
        mask[b, b % hq] = True
        if hq > 1:
            mask[b, (b + 1) % hq] = False
    return mask


def backend_name(backend: str) -> str:
    """The op's name of a test's backend parameter: ``"torch-pruned"`` is the torch backend run
    with its dense path for short prefills turned off (``conftest.py`` turns it off)."""
    return "torch" if backend == "torch-pruned" else backend
