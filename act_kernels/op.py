"""The public ACT attention op: validate the arguments once, then dispatch to a backend.

Backends receive normalised arguments and share one signature::

    backend(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
            window=None, block_ids=None, attn_mask=None) -> (out, stats_dict_or_None)

with ``heads`` either ``None`` (nothing calibrated) or a bool tensor ``[B, Hq]`` on q's device,
``scale`` a float, and ``key_padding_mask`` either ``None`` (no padding) or a bool ``[B, Nk]``.
The keyword arguments are passed only when given, and only to a backend whose
``SUPPORTS_WINDOW`` / ``SUPPORTS_BLOCKS`` / ``SUPPORTS_ATTN_MASK`` attribute is true:
``window`` an int ``1 <= W < Nk``, ``block_ids`` a long ``[B, Nk]`` (contiguous, some block with
at least two members), ``attn_mask`` a bool ``[B, Nq, Nk]`` (possibly an expanded view).
``segment_ids`` never reach a backend: the op splits the call (:mod:`act_kernels.segments`).
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from . import segments, torch_backend
from .gradients import (autograd_inside_an_op, differentiable_call, needs_gradients,
                        reference_gradients)
from .params import (BACKENDS, DEFAULT_BETA, DEFAULT_TAU, as_real, check_attn_mask, check_beta,
                     check_heads, check_key_padding_mask, check_mask_combination,
                     check_mask_values, check_position_ids, check_tau, check_window,
                     default_scale, head_indices, head_mask, resolve_backend)
from .tensor_cache import TensorCache, data_owner

__all__ = ["ACTStats", "BACKENDS", "DecodeCall", "act_attention", "normalize_heads",
           "normalize_key_padding_mask", "resolve_backend"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class ACTStats:
    """What the calibration saw, per key and per row, for every (batch row, head).

    ``scores`` and ``sinks`` are filled for every head (the sinks a calibration *would* use), so
    one call with ``heads=None`` shows the sinks of a whole layer; ``calibrated`` lists the
    (batch row, head) pairs ``heads`` requested (also those where no row had a sink, which are
    unchanged), in a fresh tensor that shares no memory with ``heads``.
    """

    scores: torch.Tensor      # [B, Hq, Nk] float32: mean attention each key receives (0 if unseen)
    sinks: torch.Tensor       # [B, Hq, Nk] bool: score > tau, first valid key excluded
    sink_mass: torch.Tensor   # [B, Hq, Nq] float32: m_i, each row's attention on the sinks
    calibrated: torch.Tensor  # [B, Hq] bool: the requested pairs

    @classmethod
    def from_dict(cls, stats: dict) -> "ACTStats":
        return cls(stats["scores"], stats["sinks"], stats["sink_mass"], stats["calibrated"])


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"act_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"act_attention: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"act_attention: {name} has dtype {t.dtype}; expected one of "
                            "float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"act_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"act_attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"act_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    bsz, hq, nq, dim = q.shape
    _, hkv, nk, dk = k.shape
    if k.shape[0] != bsz:
        raise ValueError(f"act_attention: batch sizes differ: q has {bsz}, k/v have {k.shape[0]}")
    if dk != dim:
        raise ValueError(f"act_attention: head dims differ: q has D={dim}, k/v have D={dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"act_attention: Hq={hq} query heads is not a multiple of Hkv={hkv} kv heads")
    if nq == 0 or nk == 0 or dim == 0 or bsz == 0:
        raise ValueError(f"act_attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if nq > nk:
        raise ValueError(f"act_attention: Nq={nq} queries exceed Nk={nk} keys; the queries are the "
                         "last Nq positions of the keys")


def normalize_heads(heads, bsz: int, hq: int, device) -> Optional[torch.Tensor]:
    """``None`` | bool ``[Hq]`` / ``[B, Hq]`` | head indices  ->  ``None`` or bool ``[B, Hq]``
    (the argument read by :func:`~act_kernels.params.check_heads`, its one home)."""
    heads = check_heads(heads, bsz, hq)
    if isinstance(heads, torch.Tensor) and heads.dtype != torch.bool:
        heads = head_indices(heads.reshape(-1).tolist(), hq, who="act_attention")
    if heads is None:
        return None
    if isinstance(heads, tuple):
        if not heads:
            return None
        mask = _index_row(heads, hq, torch.device(device))[None, :].expand(bsz, hq)
    else:
        mask = (heads[None, :].expand(bsz, hq) if heads.dim() == 1 else heads).to(device)
    # whether anything is calibrated: read from the device once per mask (TensorCache), so
    # steady-state calls with a layer's mask never synchronise; the mask is returned as the
    # view it is, so that the backends' caches keyed on it hit too
    if not _CALIBRATES_ANY.get(mask, lambda m: bool(m.any())):
        return None
    return mask


# facts about masks that need their values on the host, computed once per mask
_CALIBRATES_ANY = TensorCache()
_ALL_REAL = TensorCache()
_ZERO_ONE = TensorCache()


@functools.lru_cache(maxsize=256)
def _index_row(indices: tuple, hq: int, device: torch.device) -> torch.Tensor:
    """Bool ``[Hq]`` of checked head indices, the same tensor for the same indices."""
    return head_mask(indices, hq, who="act_attention", device=device)


def normalize_key_padding_mask(mask, bsz: int, nk: int, device) -> Optional[torch.Tensor]:
    """``None`` | bool/0-1 integer ``[B, Nk]`` (True = real token)  ->  ``None`` or bool ``[B, Nk]``."""
    if mask is None or check_key_padding_mask(mask, bsz, nk, device) is None:
        return None
    if mask.dtype != torch.bool and \
            not _ZERO_ONE.get(mask, lambda m: bool(((m == 0) | (m == 1)).all())):
        raise ValueError("act_attention: an integer key_padding_mask must hold only 0 and 1")
    # no padding at all: read once per mask (TensorCache), not on every call
    if _ALL_REAL.get(mask, lambda m: bool((m != 0).all())):
        return None
    return (mask != 0 if mask.dtype != torch.bool else mask).contiguous()


def _eager(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats, window=None,
           block_ids=None, attn_mask=None):
    from .reference import act_attention_reference

    out, _, stats = act_attention_reference(q, k, v, heads=heads, beta=beta, tau=tau,
                                            scale=scale, key_padding_mask=key_padding_mask,
                                            window=window, block_ids=block_ids,
                                            attn_mask=attn_mask)
    return out, (stats if return_stats else None)


_eager.SUPPORTS_WINDOW = True
_eager.SUPPORTS_BLOCKS = True
_eager.SUPPORTS_ATTN_MASK = True


def _backend_fn(name: str):
    """The backend function; each takes ``(q, k, v, heads, beta, tau, scale, key_padding_mask,
    return_stats)`` and, where its ``SUPPORTS_WINDOW`` / ``SUPPORTS_BLOCKS`` /
    ``SUPPORTS_ATTN_MASK`` attribute is true, ``window=`` / ``block_ids=`` / ``attn_mask=``.

    Read from its module on every call (tests and benchmarks swap it there)."""
    if name == "eager":
        return _eager
    if name == "torch":
        return torch_backend.act_attention_torch
    # importing the Triton backend raises a clear error if it cannot run
    return _backend_module("triton_backend").act_attention_triton


@functools.lru_cache(maxsize=None)
def _backend_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


# ---------------------------------------------------------------------------------------------
# the steady-state call: the same shapes, parameters and masks as an earlier, validated call
# ---------------------------------------------------------------------------------------------
# A decode step costs SDPA 0.1-0.2 ms on the CPU, so the op's Python checks (tens of us) matter.
# Layers call the op with the same shapes, dtypes, devices, parameters and mask tensors step
# after step: _steady_args recognises such a call from facts it reads in a few attribute
# lookups (no isinstance chain, no ABC check) and reuses what the full validation of an earlier
# call established. Anything else (an argument of another type, a first sight) returns None and
# takes the full path, which raises the one clear error for bad input.

_VALID_TENSORS = set()          # (shapes, dtypes, devices) of q, k, v that passed _check_tensors
_VALID_LIMIT = 4096
_BACKEND_NAMES = {}             # (backend, device type) -> resolved backend name
# normalize_heads' answer per heads tensor object (and its version) and call shape: the answer
# itself, or _ITSELF / _EXPANDED when that is the mask itself or its expand to [B, Hq], rebuilt
# per call so that the cache holds no reference to the mask
_STEADY_HEADS = TensorCache(views=False)
_ITSELF, _EXPANDED = object(), object()


def _tensor_facts(q, k, v):
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)


def _steady_heads(heads, bsz: int, hq: int, device):
    """:func:`normalize_heads` of a heads tensor, computed once per tensor, version and call
    shape (an in-place edit of the mask bumps its version and is seen)."""
    def answer_of(heads):
        mask = normalize_heads(heads, bsz, hq, device)      # raises for a bad mask
        if mask is not None and data_owner(mask) is data_owner(heads):
            return _ITSELF if mask is heads else _EXPANDED
        return mask

    answer = _STEADY_HEADS.get(heads, answer_of, (bsz, hq, device))
    if answer is _ITSELF:
        return heads
    return heads.expand(bsz, hq) if answer is _EXPANDED else answer


def _steady_args(q, k, v, heads, beta, tau, scale, backend, window):
    """``(calibrated, beta, tau, scale, name, window)`` for a call whose arguments are of the
    plain types a layer passes and were all seen valid before, else None (full validation)."""
    tensor = torch.Tensor
    if (type(q) is not tensor or type(k) is not tensor or type(v) is not tensor
            or type(beta) is not float or type(tau) is not float or type(backend) is not str
            or not (scale is None or type(scale) is float)
            or not (window is None or type(window) is int)
            or not (heads is None or type(heads) is tensor)):
        return None
    facts = _tensor_facts(q, k, v)
    name = _BACKEND_NAMES.get((backend, facts[6].type))
    if (facts not in _VALID_TENSORS or name is None or not 0.0 <= beta <= 1.0
            or not tau > 0.0 or (window is not None and window < 1)):
        return None
    if scale is None:
        scale = default_scale(facts[0][3])
    elif not (math.isfinite(scale) and scale != 0.0):
        return None
    if window is not None and window >= facts[1][2]:
        window = None
    calibrated = None if heads is None else _steady_heads(heads, facts[0][0], facts[0][1],
                                                          facts[6])
    return calibrated, beta, tau, scale, name, window


def _remember_valid(q, k, v, backend, name) -> None:
    if len(_VALID_TENSORS) >= _VALID_LIMIT:
        _VALID_TENSORS.clear()
    _VALID_TENSORS.add(_tensor_facts(q, k, v))
    _BACKEND_NAMES[(backend, q.device.type)] = name


def _validated_args(q, k, v, heads, beta, tau, scale, key_padding_mask, backend, window):
    """The full validation of :func:`act_attention`'s arguments: one clear error for bad input,
    else ``(calibrated, key_padding_mask, beta, tau, scale, name, window)``, normalised."""
    _check_tensors(q, k, v)
    bsz, hq, nq, dim = q.shape
    beta = check_beta(beta)
    tau = check_tau(tau)
    if scale is None:
        scale = default_scale(dim)
    else:
        scale = as_real(scale, "scale", "act_attention")
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"act_attention: scale must be finite and non-zero, got {scale}")
    calibrated = (_steady_heads(heads, bsz, hq, q.device) if type(heads) is torch.Tensor
                  else normalize_heads(heads, bsz, hq, q.device))
    kpm = normalize_key_padding_mask(key_padding_mask, bsz, k.shape[2], q.device)
    window = check_window(window)
    if window is not None and window >= k.shape[2]:
        window = None                              # every row sees all its causal keys
    name = resolve_backend(backend, q.device)
    _remember_valid(q, k, v, backend, name)
    return calibrated, kpm, beta, tau, scale, name, window


class DecodeCall:
    """A decode step (``Nq == 1``, no mask, no window, no statistics, no gradients) validated once,
    for a caller that repeats it step after step (a layer of a generating model): calling it on
    q, k, v of the same batch, heads, head dim, dtype and device as the call it was made from,
    with any number of keys, runs the backend directly. The caller checks those facts
    (:meth:`fits`); the heads mask is read as it is on every call, and whether it calibrates
    anything was read from the device once, so an in-place edit of it needs a new DecodeCall
    (its ``_version`` changes: :attr:`heads_version`)."""

    __slots__ = ("calibrated", "beta", "tau", "scale", "name", "facts", "q_shape", "heads",
                 "heads_version")

    def __init__(self, q, k, v, heads, beta, tau, scale, backend):
        if q.shape[2] != 1:
            raise ValueError(f"DecodeCall: one query row per head, got Nq={q.shape[2]}")
        self.calibrated, _, self.beta, self.tau, self.scale, self.name, _ = _validated_args(
            q, k, v, heads, beta, tau, scale, None, backend, None)
        self.facts = (q.shape[0], k.shape[1], q.shape[3], q.dtype, q.device)
        self.q_shape = q.shape
        self.heads = heads
        self.heads_version = heads._version if isinstance(heads, torch.Tensor) else None

    def fits(self, q, k, v) -> bool:
        """Are q, k, v a decode step this call was validated for (plain tensors, no gradients)?"""
        # few bytecodes: this runs for every layer of every decode step, cold after the linears
        b, hkv, dim, dtype, device = self.facts
        ks = k.shape
        return (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
                and q.shape == self.q_shape
                and ks[0] == b and ks[1] == hkv and ks[2] > 0 and ks[3] == dim and v.shape == ks
                and q.dtype is dtype and k.dtype is dtype and v.dtype is dtype
                and q.device == device and k.device == device and v.device == device
                and (self.heads_version is None or self.heads._version == self.heads_version)
                and not (torch.is_grad_enabled()          # needs_gradients, written out
                         and (q.requires_grad or k.requires_grad or v.requires_grad)))

    def __call__(self, q, k, v):
        return _backend_fn(self.name)(q, k, v, self.calibrated, self.beta, self.tau, self.scale,
                                      None, False)[0]


# facts about segment_ids / block_ids read on the host once per pair of tensors (and Nq): their
# values checked, whether some block has two members, the split of the call (segments.plan)
_MASK_FACTS = TensorCache()


def _validated_masks(q, k, segment_ids, block_ids, attn_mask, window):
    """The checks of the general masks (``docs/spec.md`` section 3a; the rules:
    :mod:`act_kernels.params`): ``(groups, block_ids, attn_mask)`` with ``groups`` the split of
    the call by segments (``None``: no split), ``block_ids`` long ``[B, Nk]`` or ``None`` when no
    block has two members, ``attn_mask`` bool ``[B, Nq, Nk]`` or ``None``."""
    bsz, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    segment_ids = check_position_ids(segment_ids, "segment_ids", bsz, nk, q.device)
    block_ids = check_position_ids(block_ids, "block_ids", bsz, nk, q.device)
    attn_mask = check_attn_mask(attn_mask, bsz, nq, nk, q.device)
    check_mask_combination(window, segment_ids, block_ids, attn_mask)
    groups = None
    if segment_ids is not None or block_ids is not None:
        def facts(pair):
            seg, blk = pair
            has_blocks = check_mask_values(seg, blk)
            return has_blocks, (None if seg is None else segments.plan(seg, nq))

        has_blocks, groups = _MASK_FACTS.get((segment_ids, block_ids), facts, nq)
        block_ids = block_ids.to(torch.long).contiguous() if has_blocks else None
    return groups, block_ids, attn_mask


def _backend_extra(fn, name: str, window, block_ids, attn_mask) -> dict:
    """The keyword arguments for backend ``fn``; ``NotImplementedError`` for one it does not
    take (no silent fallback)."""
    extra = {}
    for arg, value, flag, what, instead in (
            ("window", window, "SUPPORTS_WINDOW", "sliding-window attention", "'eager'"),
            ("block_ids", block_ids, "SUPPORTS_BLOCKS", "bidirectional blocks",
             "'torch' or 'eager'"),
            ("attn_mask", attn_mask, "SUPPORTS_ATTN_MASK", "a general boolean mask",
             "'torch' (its exact blocked path) or 'eager'")):
        if value is None:
            continue
        if not getattr(fn, flag, False):
            raise NotImplementedError(f"act_attention: the {name!r} backend does not support "
                                      f"{arg}= ({what}); use backend={instead}")
        extra[arg] = value
    return extra


def act_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  heads: Union[None, torch.Tensor, Sequence[int]] = None,
                  beta: float = DEFAULT_BETA, tau: float = DEFAULT_TAU, scale: Optional[float] = None,
                  key_padding_mask: Optional[torch.Tensor] = None,
                  backend: str = "auto", return_stats: bool = False,
                  window: Optional[int] = None, segment_ids: Optional[torch.Tensor] = None,
                  block_ids: Optional[torch.Tensor] = None,
                  attn_mask: Optional[torch.Tensor] = None):
    """Causal attention with ACT calibration of the chosen heads (the contract: ``docs/spec.md``).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (may be non-contiguous), ``Hq % Hkv == 0``,
            ``Nq <= Nk``; the queries are the last ``Nq`` positions (bottom-right causal).
        heads: ``None`` (plain attention), a bool tensor ``[Hq]`` or ``[B, Hq]``, or head indices.
        beta: fraction of the sink attention that calibrated rows keep, in ``[0, 1]``.
        tau: sink threshold on the mean attention a key receives, ``> 0``.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: bool ``[B, Nk]``, True for real tokens (left padding).
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"torch"``, ``"triton"``, ``"eager"``.
        return_stats: also return an :class:`ACTStats`.
        window: ``None`` or ``W >= 1``: the row at position ``p`` sees only keys
            ``p - W < j <= p`` (a sliding-window layer); ``W >= Nk`` is plain causal.
        segment_ids: integer ``[B, Nk]``, non-decreasing: packed sequences; a row sees only
            keys of its own segment (the op splits the call, every backend).
        block_ids: integer ``[B, Nk]``, negative = no block: a row in a block also sees the
            later keys of its block (one contiguous run inside one segment).
        attn_mask: bool ``[B or 1, Nq, Nk]`` / ``[B or 1, 1, Nq, Nk]``, True = the row sees the
            key: the whole visibility (no causal rule added), ANDed with the key padding; not
            combined with window / segment_ids / block_ids. Exact, slower (eager, torch).

    Returns:
        ``[B, Hq, Nq, D]`` in q's dtype, or ``(out, ACTStats)`` with ``return_stats=True``.
    """
    if torch.compiler.is_compiling():
        return _compiled_call(q, k, v, heads, beta, tau, scale, key_padding_mask, backend,
                              return_stats, window, segment_ids, block_ids, attn_mask)
    masks = segment_ids is not None or block_ids is not None or attn_mask is not None
    given_window, given_masks = window, (segment_ids, block_ids, attn_mask)
    steady = None if masks else _steady_args(q, k, v, heads, beta, tau, scale, backend, window)
    groups = None
    if steady is not None:
        calibrated, beta, tau, scale, name, window = steady
        kpm = normalize_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
    else:
        calibrated, kpm, beta, tau, scale, name, window = _validated_args(
            q, k, v, heads, beta, tau, scale, key_padding_mask, backend, window)
        if masks:
            groups, block_ids, attn_mask = _validated_masks(q, k, segment_ids, block_ids,
                                                            attn_mask, given_window)
    fn = _backend_fn(name)
    extra = {} if window is None and not masks else _backend_extra(fn, name, window, block_ids,
                                                                   attn_mask)

    if name != "eager" and needs_gradients(q, k, v):
        # the fast forward, the eager reference's backward (act_kernels.gradients)
        args = dict(heads=heads, beta=beta, tau=tau, scale=scale, key_padding_mask=key_padding_mask,
                    window=given_window, segment_ids=given_masks[0], block_ids=given_masks[1],
                    attn_mask=given_masks[2])
        kept = {}

        def fast(q, k, v):
            got = act_attention(q, k, v, backend=backend, return_stats=return_stats, **args)
            if return_stats:
                got, kept["stats"] = got
            return got

        out = differentiable_call(q, k, v, fast, functools.partial(act_attention, backend="eager",
                                                                   **args), name)
        return (out, kept["stats"]) if return_stats else out
    if groups is not None:
        out, stats = segments.split(groups, functools.partial(
            _sub_call, fn, beta, tau, scale, bool(return_stats), extra), q, k, v, calibrated,
            kpm, block_ids, bool(return_stats))
    else:
        out, stats = fn(q, k, v, calibrated, beta, tau, scale, kpm, bool(return_stats), **extra)
    if return_stats:
        return out, ACTStats.from_dict(stats)
    return out


def _sub_call(fn, beta, tau, scale, return_stats, extra, q, k, v, heads, kpm, block_ids):
    """One batched sub-call of a call split by segments (:func:`segments.split`): the call's
    keyword arguments, the window dropped where it covers the sub-call's keys, its blocks."""
    extra = dict(extra)
    if extra.get("window") is not None and extra["window"] >= k.shape[2]:
        del extra["window"]
    extra.pop("block_ids", None)
    if block_ids is not None:
        extra["block_ids"] = block_ids
    return fn(q, k, v, heads, beta, tau, scale, kpm, return_stats, **extra)


# ---------------------------------------------------------------------------------------------
# torch.library: the op as one opaque node for torch.compile / CUDA graphs
# ---------------------------------------------------------------------------------------------
# Validation and dispatch read tensor values (``bool(mask.any())``, the backend's sink
# selection), which a compiler cannot trace. Inside a compiled region ``act_attention`` calls
# this custom op instead: the compiler sees a node with a known output (the fake
# implementation: q's shape and dtype) and runs the eager op, validation included, when the
# graph executes.

# Its eager body reads device values on the host (sink selection), so a CUDA graph cannot replay
# it: tagged cudagraph_unsafe, mode="reduce-overhead" keeps it out of captured graphs. (With
# backend="triton" the compiled path is the registered Triton op instead, whose graph can be
# captured: see act_kernels.triton_backend.)
@torch.library.custom_op("act_kernels::act_attention", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def act_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     heads: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                     beta: float, tau: float, scale: float, backend: str,
                     window: Optional[int] = None, segment_ids: Optional[torch.Tensor] = None,
                     block_ids: Optional[torch.Tensor] = None,
                     attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act_attention`` as a registered op (``torch.ops.act_kernels.act_attention``)."""
    return act_attention(q, k, v, heads=heads, beta=beta, tau=tau, scale=scale,
                         key_padding_mask=key_padding_mask, backend=backend,
                         window=window, segment_ids=segment_ids, block_ids=block_ids,
                         attn_mask=attn_mask).contiguous()


@act_attention_op.register_fake
def _act_attention_fake(q, k, v, heads, key_padding_mask, beta, tau, scale, backend,
                        window=None, segment_ids=None, block_ids=None, attn_mask=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# Gradients through the compiled op: the eager reference's backward (act_kernels.gradients), as
# an opaque op of its own, so that the compiler sees three outputs shaped like q, k and v.
@torch.library.custom_op("act_kernels::act_attention_backward", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def act_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, heads: Optional[torch.Tensor],
                              key_padding_mask: Optional[torch.Tensor], beta: float, tau: float,
                              scale: float, backend: str, window: Optional[int] = None,
                              segment_ids: Optional[torch.Tensor] = None,
                              block_ids: Optional[torch.Tensor] = None,
                              attn_mask: Optional[torch.Tensor] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    exact = functools.partial(act_attention, heads=heads, beta=beta, tau=tau, scale=scale,
                              key_padding_mask=key_padding_mask, backend="eager", window=window,
                              segment_ids=segment_ids, block_ids=block_ids, attn_mask=attn_mask)
    with autograd_inside_an_op():
        return tuple(reference_gradients(exact, q, k, v, grad, (True, True, True), backend))


@act_attention_backward_op.register_fake
def _act_attention_backward_fake(grad, q, k, v, *args, **kwargs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *inputs[10:])
    ctx.params = inputs[5:10]


def _op_backward(ctx, grad):
    q, k, v, heads, kpm, segment_ids, block_ids, attn_mask = ctx.saved_tensors
    beta, tau, scale, backend, window = ctx.params
    dq, dk, dv = act_attention_backward_op(grad, q, k, v, heads, kpm, beta, tau, scale, backend,
                                           window, segment_ids, block_ids, attn_mask)
    return (dq, dk, dv) + (None,) * 10


act_attention_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _traced_decode(q, k, v, heads, key_padding_mask, beta, tau, scale, attn_mask):
    """A torch-backend decode step inside a compiled graph, traced as the ordinary tensor ops of
    ``torch_backend.decode`` (which read nothing on the host there: a calibrated row without a
    sink gets a zero shift, chosen by a select), so that the compiler fuses them instead of
    calling an opaque op per layer. The checks here read shapes, dtypes and devices only."""
    _check_tensors(q, k, v)
    bsz, hq = q.shape[:2]
    nk = k.shape[2]
    if heads is not None:
        heads = (heads[None].expand(bsz, hq) if heads.dim() == 1 else heads).to(q.device)
    kpm = check_key_padding_mask(key_padding_mask, bsz, nk, q.device)
    if kpm is not None and kpm.dtype != torch.bool:
        kpm = kpm != 0
    attn_mask = check_attn_mask(attn_mask, bsz, 1, nk, q.device)
    extra = {} if attn_mask is None else {"attn_mask": attn_mask}
    return torch_backend.act_attention_torch(q, k, v, heads, beta, tau, scale, kpm, False,
                                             **extra)[0]


def _compiled_call(q, k, v, heads, beta, tau, scale, key_padding_mask, backend, return_stats,
                   window, segment_ids=None, block_ids=None, attn_mask=None):
    if return_stats:
        raise NotImplementedError("act_attention: return_stats is not supported inside "
                                  "torch.compile (call it eagerly)")
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    masks = segment_ids is not None or block_ids is not None or attn_mask is not None
    if resolve_backend(backend, q.device) == "triton" and not masks:
        # the kernels as graph nodes (a triton_op); heads as given: index lists keep exact pairs
        _check_tensors(q, k, v)
        from .triton_backend import compiled_call
        return compiled_call(q, k, v, heads, key_padding_mask, check_beta(beta), check_tau(tau),
                             scale, check_window(window))
    heads = check_heads(heads, q.shape[0], q.shape[1])
    if isinstance(heads, tuple):   # a constant row; an index tensor is read by the op's body
        heads = head_mask(heads, q.shape[1], who="act_attention", device=q.device) if heads \
            else None
    given_window, window = window, check_window(window)
    if window is not None and window >= k.shape[2]:
        window = None
    if (resolve_backend(backend, q.device) == "torch" and q.shape[2] == 1 and window is None
            and segment_ids is None and block_ids is None and not needs_gradients(q, k, v)
            and (heads is None or heads.dtype == torch.bool)):
        check_mask_combination(given_window, segment_ids, block_ids, attn_mask)
        return _traced_decode(q, k, v, heads, key_padding_mask, check_beta(beta),
                              check_tau(tau), scale, attn_mask)
    return act_attention_op(q, k, v, heads, key_padding_mask, check_beta(beta), check_tau(tau),
                            scale, backend, check_window(window), segment_ids, block_ids,
                            attn_mask)
