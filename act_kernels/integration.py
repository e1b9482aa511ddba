"""Hugging Face Transformers integration: ACT as an attention implementation.

Importing ``act_kernels`` registers two attention implementations with Transformers:

- ``"act_torch"``: the portable torch backend (``act_attention(..., backend="torch")``);
- ``"act_triton"``: the Triton backend (``backend="triton"``).

Each is registered with both ``transformers.AttentionInterface`` (the attention function) and
``transformers.AttentionMaskInterface`` (the mask builder: the sdpa one, which gives a boolean
``[B, 1, Lq, Lk]`` mask, or ``None`` when plain causal attention needs none). Without a mask
builder Transformers would pass no mask at all to a custom implementation and left padding
would silently be ignored.

Which heads are calibrated comes from the profile stored in ``model.config.act_profile`` (see
:mod:`act_kernels.profile`, :func:`~act_kernels.profile.apply_profile`), or, inside
:func:`~act_kernels.profile.head_override`, from the override.

The attention function accepts exactly the masks the op can express: bottom-right causal
attention plus key padding (left padding), optionally followed by a static cache's unfilled
slots. Every other mask (sliding windows that bite, chunked or bidirectional attention, custom
4D masks) is refused with a ``ValueError`` rather than computed wrongly.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import op as _op

ACT_ATTENTION_BACKENDS: Dict[str, str] = {"act_torch": "torch", "act_triton": "triton"}
"""Registered attention implementation name -> ``act_attention`` backend."""

_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "sliding_window_size")


class ACTMaskError(ValueError):
    """The attention mask is not bottom-right causal + key padding; ACT cannot run it exactly."""


# ---------------------------------------------------------------------------------------------
# Profile state: which heads each layer calibrates
# ---------------------------------------------------------------------------------------------

class _Override:
    """What :func:`act_kernels.profile.head_override` installs for one model config."""

    def __init__(self, heads: Dict[int, torch.Tensor], beta: Optional[float],
                 tau: Optional[float]):
        self.heads = heads
        self.beta = beta
        self.tau = tau
        self.on_device: Dict[Tuple[int, str], torch.Tensor] = {}

    def layer_heads(self, layer: int, device: torch.device) -> Optional[torch.Tensor]:
        mask = self.heads.get(layer)
        if mask is None:
            return None
        key = (layer, str(device))
        cached = self.on_device.get(key)
        if cached is None:
            cached = mask.to(device)
            self.on_device[key] = cached
        return cached


# id(config) -> stack of overrides (innermost last). The config is alive while its entry exists
# (the context manager holding the model removes the entry on exit), so ids are not reused.
_OVERRIDES: Dict[int, List[_Override]] = {}

# The last parsed profile dict, by identity: (dict, ACTProfile).
_parsed_profile: Tuple[Optional[dict], object] = (None, None)


def _profile_of(config):
    """The :class:`ACTProfile` of ``config.act_profile`` (parsed once per profile dict)."""
    global _parsed_profile
    raw = getattr(config, "act_profile", None)
    if raw is None:
        return None, None
    if _parsed_profile[0] is raw:
        return raw, _parsed_profile[1]
    from .profile import ACTProfile

    profile = raw if isinstance(raw, ACTProfile) else ACTProfile.from_dict(raw)
    _parsed_profile = (raw, profile)
    return raw, profile


def _layer_settings(module, config, device) -> Tuple[Optional[torch.Tensor], float, float]:
    """``(heads, beta, tau)`` for this attention module: heads a bool tensor or ``None``."""
    layer = getattr(module, "layer_idx", None)
    stack = _OVERRIDES.get(id(config))
    if stack:
        override = stack[-1]
        _, profile = _profile_of(config)
        beta = override.beta if override.beta is not None else (
            profile.beta if profile is not None else 0.4)
        tau = override.tau if override.tau is not None else (
            profile.tau if profile is not None else 0.1)
        heads = None if layer is None else override.layer_heads(int(layer), device)
        return heads, beta, tau

    raw = getattr(config, "act_profile", None)
    # Per-module cache of (heads mask, beta, tau), valid for this profile dict on this device:
    # the steady state is one dict lookup and two identity checks per call.
    cache = module.__dict__.get("_act_settings_cache")
    if cache is not None and cache[0] is raw and cache[1] == device:
        return cache[2]
    _, profile = _profile_of(config)
    if profile is None:
        settings = (None, 0.4, 0.1)
    else:
        indices = profile.heads.get(int(layer)) if layer is not None else None
        heads = None
        if indices:
            heads = torch.zeros(_num_query_heads(module, config), dtype=torch.bool)
            heads[torch.tensor(indices, dtype=torch.long)] = True
            heads = heads.to(device)
        settings = (heads, profile.beta, profile.tau)
    module.__dict__["_act_settings_cache"] = (raw, device, settings)
    return settings


def _num_query_heads(module, config) -> int:
    for obj, attr in ((config, "num_attention_heads"), (module, "num_heads"),
                      (module, "num_attention_heads")):
        value = getattr(obj, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError("act attention: cannot tell the number of query heads of this model")


# ---------------------------------------------------------------------------------------------
# Mask: check it is bottom-right causal + key padding, and turn it into the op's arguments
# ---------------------------------------------------------------------------------------------

# One-entry cache: every layer of a forward receives the same mask tensor.
_mask_cache: Tuple = (None, None, None, None)


def _refuse(reason: str):
    raise ACTMaskError(
        "act attention: unsupported attention mask: " + reason + ". ACT supports causal "
        "attention with key (left) padding only: no sliding window that is shorter than the "
        "sequence, no chunked, bidirectional or custom 4D masks. Use attn_implementation='sdpa' "
        "or 'eager' for this model/input.")


def mask_to_key_padding(attention_mask: Optional[torch.Tensor], batch: int, q_len: int,
                        kv_len: int) -> Tuple[Optional[torch.Tensor], int]:
    """Turn the mask Transformers passes into ``(key_padding_mask or None, keys_used)``.

    ``keys_used <= kv_len`` is how many leading keys the queries can see: a static cache has
    unfilled slots at the end, which are cut off k/v before the op is called. The queries are
    then the last ``q_len`` of ``keys_used`` positions (bottom-right causal).

    ``attention_mask`` is ``None`` (no padding; with ``q_len > 1`` and ``kv_len > q_len`` that is
    the prefill of an empty static cache, top-left aligned, as in Transformers' sdpa path) or a
    boolean (True = attend) / additive float (0 or -inf/min) ``[B or 1, 1, q_len, kv_len]`` mask.
    Raises :class:`ACTMaskError` for any mask that is not causal + key padding. Rows of padded
    queries may see nothing or (Transformers' convention) the real keys before them: their
    outputs are never read, and ACT counts them for nothing.
    """
    global _mask_cache
    if attention_mask is None:
        if q_len == 1 or q_len == kv_len:
            return None, kv_len
        return None, q_len
    if not isinstance(attention_mask, torch.Tensor):
        _refuse(f"got a {type(attention_mask).__name__} (only tensors or None are supported)")
    ref, version, shape, result = _mask_cache
    if (ref is not None and ref() is attention_mask and version == attention_mask._version
            and shape == (batch, q_len, kv_len)):
        return result
    result = _check_mask(attention_mask, batch, q_len, kv_len)
    try:
        _mask_cache = (weakref.ref(attention_mask), attention_mask._version,
                       (batch, q_len, kv_len), result)
    except TypeError:
        pass
    return result


def _check_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int):
    if mask.dim() != 4:
        _refuse(f"expected a 4D mask [B, 1, Lq, Lk], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] != q_len \
            or mask.shape[3] != kv_len:
        _refuse(f"expected shape [{batch}, 1, {q_len}, {kv_len}], got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    elif mask.is_floating_point():
        allowed = mask[:, 0] == 0
        blocked = mask[:, 0] <= torch.finfo(mask.dtype).min / 2
        if not bool((allowed | blocked).all()):
            _refuse("the float mask holds values other than 0 and -inf (an additive bias)")
    else:
        _refuse(f"mask dtype {mask.dtype} (expected bool or float)")
    allowed = allowed.expand(batch, q_len, kv_len)
    device = allowed.device

    seen = allowed.any(dim=1)                                   # [B, Lk]: key seen by some row
    row_any = allowed.any(dim=-1)                               # [B, Lq]
    if not bool(row_any.any()):
        _refuse("no query may attend to any key")
    # Query row i sits at position base + i and sees no key after it: base >= last_seen_i - i,
    # with equality for every real row (it sees itself). Keys past base + Lq are a static
    # cache's unfilled slots.
    last_seen = (kv_len - 1) - allowed.flip(-1).to(torch.uint8).argmax(dim=-1)   # [B, Lq]
    offsets = last_seen - torch.arange(q_len, device=device)
    base = max(int(torch.where(row_any, offsets, -1).amax()), 0)
    keys_used = base + q_len
    if keys_used > kv_len:
        _refuse(f"query row {q_len - 1} sees no key at its own position")
    cols = torch.arange(kv_len, device=device)
    if keys_used < kv_len and bool(allowed[:, :, keys_used:].any()):
        _refuse("a query sees a key after its own position")
    kpm = seen[:, :keys_used]                                   # [B, Nk] True = real token
    rows = torch.arange(keys_used - q_len, keys_used, device=device)
    causal = cols[None, :keys_used] <= rows[:, None]            # [Lq, Nk] bottom-right
    expected = causal[None] & kpm[:, None, :]                   # [B, Lq, Nk]
    got = allowed[:, :, :keys_used]
    rows_equal = (got == expected).all(dim=-1)                  # [B, Lq]
    query_real = kpm[:, keys_used - q_len:]
    rows_ok = torch.where(query_real, rows_equal, rows_equal | ~got.any(dim=-1))
    if not bool(rows_ok.all()):
        b, i = [int(x) for x in (~rows_ok).nonzero()[0]]
        _refuse(f"query row {i} of batch row {b} is not causal attention over the real keys "
                "(sliding window, chunked/bidirectional attention or a custom mask?)")
    if bool(kpm.all()):
        return None, keys_used
    return kpm.contiguous(), keys_used


# ---------------------------------------------------------------------------------------------
# The attention functions
# ---------------------------------------------------------------------------------------------

def _make_attention_forward(name: str):
    backend = ACT_ATTENTION_BACKENDS[name]

    def act_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs):
        for arg in _UNSUPPORTED_KWARGS:
            if kwargs.get(arg) is not None:
                raise NotImplementedError(f"{name} attention does not support `{arg}`; use "
                                          "attn_implementation='eager' for this model")
        if kwargs.get("cache") is not None:
            raise NotImplementedError(f"{name} attention does not support paged caches")
        if dropout:
            raise NotImplementedError(f"{name} attention is inference-only: attention dropout "
                                      f"{dropout} (call model.eval())")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal:
            _refuse("the layer is not causal (bidirectional attention)")

        bsz, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        config = getattr(module, "config", None)
        heads, beta, tau = _layer_settings(module, config, query.device)
        kpm, keys_used = mask_to_key_padding(attention_mask, bsz, q_len, kv_len)
        if keys_used < kv_len:
            key = key[:, :, :keys_used]
            value = value[:, :, :keys_used]

        if kwargs.get("output_attentions", False):
            from .reference import act_attention_reference

            head_mask = _op.normalize_heads(heads, bsz, query.shape[1], query.device)
            out, probs, _ = act_attention_reference(query, key, value, heads=head_mask,
                                                    beta=beta, tau=tau, scale=scaling,
                                                    key_padding_mask=kpm)
            if keys_used < kv_len:
                probs = torch.nn.functional.pad(probs, (0, kv_len - keys_used))
            return out.transpose(1, 2).contiguous(), probs.to(query.dtype)

        if _RECORDERS:
            out, stats = _op.act_attention(query, key, value, heads=heads, beta=beta, tau=tau,
                                           scale=scaling, key_padding_mask=kpm, backend=backend,
                                           return_stats=True)
            for recorder in _RECORDERS:
                recorder(module, stats, query, key, value, kpm)
        else:
            out = _op.act_attention(query, key, value, heads=heads, beta=beta, tau=tau,
                                    scale=scaling, key_padding_mask=kpm, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    act_attention_forward.__name__ = f"{name}_attention_forward"
    act_attention_forward.__qualname__ = act_attention_forward.__name__
    return act_attention_forward


act_torch_attention_forward = _make_attention_forward("act_torch")
act_triton_attention_forward = _make_attention_forward("act_triton")


# Callbacks ``recorder(module, stats, query, key, value, key_padding_mask)`` run after every ACT
# attention call while registered (see ``recording``); the op then also returns its statistics.
_RECORDERS: List[Callable] = []


@contextlib.contextmanager
def recording(recorder: Callable):
    """Within the block, every ``act_torch`` / ``act_triton`` attention call computes the op's
    :class:`~act_kernels.op.ACTStats` (every head) and hands them, with the layer module and its
    post-RoPE ``query`` / ``key`` / ``value`` and key-padding mask, to ``recorder``."""
    _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDERS.remove(recorder)


def attn_implementation_for(backend: str = "auto", device=None) -> str:
    """The registered implementation name for an op backend: ``"torch"`` -> ``"act_torch"``,
    ``"triton"`` -> ``"act_triton"``, ``"auto"`` -> Triton on CUDA, torch elsewhere."""
    if backend in ACT_ATTENTION_BACKENDS:
        return backend
    if backend == "auto":
        device = torch.device("cpu") if device is None else torch.device(device)
        backend = "triton" if device.type == "cuda" else "torch"
    for impl, name in ACT_ATTENTION_BACKENDS.items():
        if name == backend:
            return impl
    raise ValueError(f"unknown ACT backend {backend!r}; choose 'auto', 'torch' or 'triton'")


def register() -> None:
    """Register ``act_torch`` and ``act_triton`` with Transformers (done on import)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("act_torch", act_torch_attention_forward)
    AttentionInterface.register("act_triton", act_triton_attention_forward)
    AttentionMaskInterface.register("act_torch", sdpa_mask)
    AttentionMaskInterface.register("act_triton", sdpa_mask)


register()
