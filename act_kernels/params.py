"""The op's parameters: their defaults and the one check of each (beta, tau, backend, heads).

Every layer of the package (the op, profiles, the Transformers integration, the search, the
CLIs) takes its defaults and validation from here, so a rule is written once. Errors name the
caller (``who``) and the offending value.
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Iterable, Optional, Sequence

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


def head_indices(indices: Iterable, num_heads: int, *, who: str,
                 layer: Optional[int] = None) -> tuple:
    """The distinct query heads ``indices`` lists, sorted: the one check of a head index.

    Each index must be an integer in ``0 .. num_heads - 1``; the error names the head (and the
    layer, when given) that is out of range.
    """
    where = "" if layer is None else f" of layer {layer}"
    return tuple(sorted(set(_indices_in_range(
        indices, num_heads, f"head indices{where}", who,
        lambda head: f"{who}: head index {head}{where} out of range: there are {num_heads} "
                     f"query heads (valid indices 0..{num_heads - 1})"))))


def _indices_in_range(values: Iterable, upper: int, what: str, who: str, out_of_range) -> list:
    """The one loop that reads indices (:func:`as_index`) and checks ``0 <= v < upper``;
    ``out_of_range(v)`` is the message of the ``ValueError`` for the first one outside."""
    out = []
    for value in values:
        v = as_index(value, what, who, plural=True)
        if not 0 <= v < upper:
            raise ValueError(out_of_range(v))
        out.append(v)
    return out


def head_mask(indices: Iterable, num_heads: int, *, who: str, layer: Optional[int] = None,
              device=None) -> torch.Tensor:
    """Bool ``[num_heads]`` selecting the query heads ``indices`` (checked by
    :func:`head_indices`)."""
    mask = torch.zeros(num_heads, dtype=torch.bool)
    for head in head_indices(indices, num_heads, who=who, layer=layer):
        mask[head] = True
    return mask if device is None else mask.to(device)


# ---------------------------------------------------------------------------------------------
# Defaults of the pipeline (``act search``, ``act eval``, ``act demo``, ``act inspect``) and the
# parsing of layer / head selections they share
# ---------------------------------------------------------------------------------------------

DEFAULT_BACKEND = "auto"
"""The backend every pipeline setting starts from (CLI flags and the config dataclasses alike);
:func:`resolve_backend` turns it into ``"triton"`` or ``"torch"`` for the model's device."""

DEFAULT_TASKS = ("sst2", "arc_easy")
"""Tasks of ``act search`` / ``act eval`` when none are given (``--tasks sst2,arc_easy``)."""

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The name profiles and reports give the default model (what ``load_model(None)`` loads)."""

DEFAULT_BATCH_SIZE = 8
"""Prompts per forward in the search's and the evaluation's plain passes."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
"""Weight dtypes by the names the command lines accept (``--dtype``)."""


def check_range(values: Iterable[int], upper: int, what: str, who: str = "act") -> list[int]:
    """``values`` as a list, each checked to lie in ``0 .. upper - 1`` (``ValueError`` names the
    first one that does not: ``"layer 40 is out of range: the model has 30 layers"``)."""
    return _indices_in_range(values, upper, f"{what} indices", who,
                             lambda v: f"{what} {v} is out of range: the model has {upper} "
                                       f"{what}s (valid 0..{upper - 1})")


def parse_index_list(spec, upper: int, what: str) -> Optional[list[int]]:
    """``None``/``"all"`` -> None; ``"2:28"`` (inclusive), ``"3,5,9"``, ``"-1"`` (counted from
    the end), or a list of ints -> sorted unique indices in ``0 .. upper-1`` (``ValueError``
    names a bad one). ``what`` (``"layer"``, ``"head"``) names the indices in errors."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        if isinstance(item, str) and ":" in item:
            a, b = item.split(":", 1)
            lo = int(a) if a.strip() else 0
            hi = int(b) if b.strip() else upper - 1
            lo, hi = (lo + upper if lo < 0 else lo), (hi + upper if hi < 0 else hi)
            if lo > hi:
                raise ValueError(f"empty {what} range {item!r}")
            rng = range(lo, hi + 1)
        else:
            v = int(item)
            rng = [v + upper if v < 0 else v]
        out.update(check_range(rng, upper, what))
    if not out:
        raise ValueError(f"no {what} selected by {spec!r}")
    return sorted(out)


def check_heads(heads, bsz: int, hq: int, who: str = "act_attention"):
    """The one reading of ``act_attention``'s ``heads`` argument; reads no device value.

    Returns ``None`` (nothing named), a bool tensor ``[Hq]`` / ``[B, Hq]`` (its shape checked,
    its values unread), an integer tensor of head indices (unread: the caller reads it on the
    host, or refuses it where it cannot) or a sorted tuple of distinct head indices in range
    (``()`` for an empty list). Anything else raises one ``TypeError`` / ``ValueError``; a
    string is not a list of indices.
    """
    if heads is None:
        return None
    if isinstance(heads, torch.Tensor):
        if heads.dtype == torch.bool:
            if tuple(heads.shape) not in ((hq,), (bsz, hq)):
                raise ValueError(f"{who}: bool heads must have shape [Hq]=[{hq}] or "
                                 f"[B, Hq]=[{bsz}, {hq}], got {tuple(heads.shape)}")
            return heads
        if heads.is_floating_point() or heads.is_complex() or heads.dim() > 1:
            raise TypeError(f"{who}: heads must be a bool mask [Hq] / [B, Hq] or a 1-D list "
                            f"of head indices, got a {heads.dtype} tensor of shape "
                            f"{tuple(heads.shape)}")
        return heads
    if isinstance(heads, Integral) and not isinstance(heads, bool):
        heads = (heads,)
    elif isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence):
        raise TypeError(f"{who}: heads must be None, a bool tensor [Hq] or [B, Hq], or a "
                        f"sequence of head indices; got {type(heads).__name__}")
    return head_indices(heads, hq, who=who)


def check_key_padding_mask(mask, bsz: int, nk: int, device, who: str = "act_attention"):
    """The checks of a ``key_padding_mask`` that read no device value: ``None`` or a bool /
    integer tensor ``[B, Nk]`` on ``device`` (True or 1 = real token), returned as it is.
    Whether an integer mask holds only 0 and 1 is left to the caller (it reads the values)."""
    if mask is None:
        return None
    _check_per_key(mask, "key_padding_mask", "a bool tensor", bsz, nk, device, who)
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"{who}: key_padding_mask must be bool (True = real token), "
                        f"got {mask.dtype}")
    return mask


def _check_per_key(t, name: str, kind: str, bsz: int, nk: int, device, who: str) -> None:
    """The checks every per-key tensor argument shares: a tensor, shape ``[B, Nk]``, on q's
    device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be {kind} [B, Nk], got {type(t).__name__}")
    if tuple(t.shape) != (bsz, nk):
        raise ValueError(f"{who}: {name} must have shape [B, Nk]=[{bsz}, {nk}], "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device} but q is on {device}")


# ---------------------------------------------------------------------------------------------
# General masks (``docs/spec.md``, section 3a): segments, bidirectional blocks, a dense mask
# ---------------------------------------------------------------------------------------------

def check_position_ids(ids, name: str, bsz: int, nk: int, device, who: str = "act_attention"):
    """The checks of ``segment_ids`` / ``block_ids`` that read no value: ``None`` or an integer
    tensor ``[B, Nk]`` on ``device``, returned as it is."""
    if ids is None:
        return None
    _check_per_key(ids, name, "an integer tensor", bsz, nk, device, who)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{who}: {name} must be an integer tensor, got {ids.dtype}")
    return ids


def check_attn_mask(mask, bsz: int, nq: int, nk: int, device, who: str = "act_attention"):
    """``None`` or a bool ``[B or 1, Nq, Nk]`` / ``[B or 1, 1, Nq, Nk]`` mask on ``device``
    (True = the row sees the key), returned as a bool ``[B, Nq, Nk]`` view."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}: attn_mask must be a bool tensor [B, Nq, Nk], "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{who}: attn_mask must be bool (True = the row sees the key), got "
                        f"{mask.dtype}; an additive float mask is not accepted")
    shape = tuple(mask.shape)
    if mask.dim() == 4 and shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[0] not in (1, bsz) or tuple(mask.shape[1:]) != (nq, nk):
        raise ValueError(f"{who}: attn_mask must have shape [B or 1, Nq, Nk] or "
                         f"[B or 1, 1, Nq, Nk] with B={bsz}, Nq={nq}, Nk={nk}; got {shape}")
    if mask.device != device:
        raise ValueError(f"{who}: attn_mask is on {mask.device} but q is on {device}")
    return mask.expand(bsz, nq, nk)


def check_mask_combination(window, segment_ids, block_ids, attn_mask,
                           who: str = "act_attention") -> None:
    """``attn_mask`` is the whole visibility: it combines with no structured argument."""
    if attn_mask is None:
        return
    given = [name for name, value in (("window", window), ("segment_ids", segment_ids),
                                      ("block_ids", block_ids)) if value is not None]
    if given:
        raise ValueError(f"{who}: attn_mask cannot be combined with {', '.join(given)}: the mask "
                         "is the whole visibility; write them into the mask or pass them "
                         "without it")


def check_mask_values(segment_ids, block_ids, who: str = "act_attention") -> bool:
    """The rules on the values of ``segment_ids`` / ``block_ids`` (reads them on the host):
    segments non-decreasing along the keys; each block one contiguous run of positions inside
    one segment. Returns whether some block has at least two members (else blocks change
    nothing)."""
    if segment_ids is not None:
        seg = segment_ids.detach().to("cpu", torch.long)
        down = (seg[:, 1:] < seg[:, :-1]).nonzero()
        if down.numel():
            b, j = down[0].tolist()
            raise ValueError(f"{who}: segment_ids must be non-decreasing along the keys (packed "
                             f"sequences one after another): batch row {b} goes from "
                             f"{int(seg[b, j])} to {int(seg[b, j + 1])} at position {j + 1}")
    if block_ids is None:
        return False
    blk = block_ids.detach().to("cpu", torch.long)
    bsz, nk = blk.shape
    inside = blk >= 0
    # a run starts where a block id differs from the one before it
    starts = inside.clone()
    starts[:, 1:] &= blk[:, 1:] != blk[:, :-1]
    rows, cols = starts.nonzero(as_tuple=True)
    ids = blk[rows, cols]
    key = rows * (int(blk.max()) + 1) + ids
    unique, count = torch.unique(key, return_counts=True)
    if bool((count > 1).any()):
        bad = unique[count > 1][0]
        b, block = divmod(int(bad), int(blk.max()) + 1)
        where = cols[key == bad].tolist()
        raise ValueError(f"{who}: block_ids: block {block} of batch row {b} is not one contiguous "
                         f"run of positions (runs start at {where[:4]}); a block must be one run")
    same = inside[:, 1:] & (blk[:, 1:] == blk[:, :-1])
    if segment_ids is not None:
        split = (same & (seg[:, 1:] != seg[:, :-1])).nonzero()
        if split.numel():
            b, j = split[0].tolist()
            raise ValueError(f"{who}: block_ids: block {int(blk[b, j])} of batch row {b} spans two "
                             f"segments (positions {j} and {j + 1}); a block must lie inside one "
                             "segment")
    return bool(same.any())
