"""The op's parameters: their defaults and the one check of each (beta, tau, backend, heads).

Every layer of the package (the op, profiles, the Transformers integration, the search, the
CLIs) takes its defaults and validation from here, so a rule is written once. Errors name the
caller (``who``) and the offending value.
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Iterable, Optional

import torch

DEFAULT_BETA = 0.4
"""Fraction of the sink attention a calibrated row keeps (paper and reference code)."""

DEFAULT_TAU = 0.1
"""Sink threshold on the mean attention a key receives (reference code)."""

BACKENDS = ("auto", "eager", "torch", "triton")
"""``act_attention`` backends; ``"auto"`` is Triton on CUDA, torch elsewhere."""


def default_scale(dim: int) -> float:
    """The logit scale when none is given: ``D ** -0.5`` for head dimension ``D``."""
    return dim ** -0.5


def as_real(value, name: str, who: str) -> float:
    """``value`` as a float (a one-element tensor is read once); ``TypeError`` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_beta(beta, who: str = "act_attention") -> float:
    beta = as_real(beta, "beta", who)
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"{who}: beta must be in [0, 1], got {beta}")
    return beta


def check_tau(tau, who: str = "act_attention") -> float:
    tau = as_real(tau, "tau", who)
    if not tau > 0.0:  # also rejects NaN
        raise ValueError(f"{who}: tau must be > 0, got {tau}")
    return tau


def check_window(window, who: str = "act_attention") -> Optional[int]:
    """``None`` (no window) or the window size ``W >= 1`` (a row at position ``p`` sees keys
    ``p - W < j <= p``)."""
    if window is None:
        return None
    if isinstance(window, torch.Tensor) and window.numel() == 1:
        window = window.item()
    if isinstance(window, bool) or not isinstance(window, Integral):
        raise TypeError(f"{who}: window must be None or a positive integer, got {window!r}")
    if window < 1:
        raise ValueError(f"{who}: window must be >= 1 (or None for no window), got {window}")
    return int(window)


def resolve_backend(backend: str, device, who: str = "act_attention") -> str:
    """``"auto"`` -> ``"triton"`` on CUDA, ``"torch"`` elsewhere; other names are checked."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{who}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return backend


def as_index(value, what: str, who: str, plural: bool = False) -> int:
    """An integer index (``bool`` refused; digit strings, as JSON keys are, accepted)."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    must = "must be integers" if plural else "must be an integer"
    raise TypeError(f"{who}: {what} {must}, got {value!r}")


def head_mask(indices: Iterable, num_heads: int, *, who: str, layer: Optional[int] = None,
              device=None) -> torch.Tensor:
    """Bool ``[num_heads]`` selecting the query heads ``indices``.

    Each index must be an integer in ``0 .. num_heads - 1``; the error names the head (and the
    layer, when given) that is out of range.
    """
    where = "" if layer is None else f" of layer {layer}"
    mask = torch.zeros(num_heads, dtype=torch.bool)
    for value in indices:
        head = as_index(value, f"head indices{where}", who, plural=True)
        if not 0 <= head < num_heads:
            raise ValueError(f"{who}: head index {head}{where} out of range: there are "
                             f"{num_heads} query heads (valid indices 0..{num_heads - 1})")
        mask[head] = True
    return mask if device is None else mask.to(device)
