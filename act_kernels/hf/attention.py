"""ACT as a Transformers attention implementation: ``"act_torch"`` and ``"act_triton"``.

Each name is registered with ``transformers.AttentionInterface`` (the attention function below)
and ``transformers.AttentionMaskInterface`` (``masks.act_sdpa_mask``: Transformers' sdpa mask
builder, which gives a boolean ``[B, 1, Lq, Lk]`` mask, or ``None`` when plain causal attention
needs none, plus a host record of what it built the mask from, so that steady-state calls read
nothing from the device; without a mask builder Transformers would pass no mask to a custom
implementation and left padding would be ignored).

One call: check what the op cannot do (refused with a clear error) -> the layer's heads, beta
and tau from the model's :class:`~act_kernels.hf.state.ACTModelState` -> the mask as the op's
arguments (:func:`~act_kernels.hf.masks.mask_plan`: key padding, packed-sequence and image-block
ids, or the dense ``attn_mask``) -> :func:`act_kernels.op.act_attention` (with statistics when
recorders listen).
"""
from __future__ import annotations

import contextvars
import types
from typing import Optional, Tuple

import torch

from ..gradients import autograd_inside_an_op, needs_gradients, reference_gradients
from ..op import DecodeCall, act_attention, normalize_heads
from ..params import default_scale
from ..reference import act_attention_reference
from ..tensor_cache import TensorCache
from .masks import MaskPlan, act_sdpa_mask, dense_mask, keys_dropped, mask_plan, warn_dense
from .state import STATE_ATTR, state_of_module

ACT_ATTENTION_BACKENDS = types.MappingProxyType({"act_torch": "torch", "act_triton": "triton"})
"""Registered attention implementation name -> ``act_attention`` backend."""

_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "sliding_window_size")
# softcap: Gemma 2's logit soft-capping (tanh on the scores) is not in the op; refused.

# Recorders of the deprecated model-less ``recording(recorder)`` form: context-local (each
# thread / task sees its own), immutable tuples; the per-model form lives in the model's state.
GLOBAL_RECORDERS: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "act_kernels_global_recorders", default=())


@torch.compiler.assume_constant_result
def _global_recording() -> bool:
    """Is a deprecated model-less ``recording`` active (read once when a graph is traced)?"""
    return bool(GLOBAL_RECORDERS.get())


def _refuse_unsupported(name: str, dropout: float, kwargs) -> None:
    for arg in _UNSUPPORTED_KWARGS:
        if kwargs.get(arg) is not None:
            raise NotImplementedError(f"{name} attention does not support `{arg}`; use "
                                      "attn_implementation='eager' for this model")
    if kwargs.get("cache") is not None:
        raise NotImplementedError(f"{name} attention does not support paged caches")
    if dropout:
        raise NotImplementedError(f"{name} attention is inference-only: attention dropout "
                                  f"{dropout} (call model.eval())")


def _eager_with_probs(query, key, value, heads, beta, tau, scaling, structure, kv_len, front):
    """``output_attentions=True``: the eager reference, which also returns the calibrated
    probabilities (a stand-in first key dropped, padded back to the static cache's length)."""
    cal = normalize_heads(heads, query.shape[0], query.shape[1], query.device)
    out, probs, _ = act_attention_reference(query, key, value, heads=cal, beta=beta, tau=tau,
                                            scale=scaling, **structure)
    probs = probs[..., front:]
    if probs.shape[-1] < kv_len:
        probs = torch.nn.functional.pad(probs, (0, kv_len - probs.shape[-1]))
    return out, probs.to(query.dtype)


def _visible_keys(query, key, value, attention_mask, cache=None, window=None,
                  position_ids=None, causal: bool = True):
    """``(key, value, structure, front, dense)``: the mask checked and turned into the op's keyword
    arguments (``structure``: ``key_padding_mask``, ``window`` and, where they apply,
    ``segment_ids`` / ``block_ids`` / ``attn_mask``), k/v cut to the keys the queries can see (a
    static cache's unfilled slots dropped); ``front`` is 1 where a stand-in first key was put in
    front (see below), else 0; ``dense``: what the mask does where it takes the op's dense path,
    else None. A layer that is not ``causal`` without a mask sees every key: the dense path with
    an all-True mask."""
    if not causal and attention_mask is None:
        every = torch.ones(1, 1, 1, dtype=torch.bool, device=query.device).expand(
            1, query.shape[2], key.shape[2])
        structure = {"key_padding_mask": None, "window": None, "attn_mask": every}
        return key, value, structure, 0, "a layer that is not causal sees every key"
    plan = mask_plan(attention_mask, query.shape[0], query.shape[2], key.shape[2], cache=cache,
                     window=window)
    if plan.dense is not None:       # the mask is the visibility: no window, no cut
        structure = {"key_padding_mask": plan.key_padding, "window": None,
                     "attn_mask": dense_mask(attention_mask)}
        return key, value, structure, 0, plan.dense
    if plan.keys_used < key.shape[2]:
        key, value = key[:, :, :plan.keys_used], value[:, :, :plan.keys_used]
    used = key.shape[2]
    if window is not None:
        key, value, plan = _mark_dropped_start(key, value, plan, position_ids,
                                               keys_dropped(attention_mask), cache)
    structure = {"key_padding_mask": plan.key_padding, "window": window}
    if plan.segment_ids is not None:
        structure["segment_ids"] = plan.segment_ids
    if plan.block_ids is not None:
        structure["block_ids"] = plan.block_ids
    return key, value, structure, key.shape[2] - used, None


def _mark_dropped_start(key, value, plan: MaskPlan, position_ids,
                        dropped_any: Optional[bool] = None, cache=None):
    """Sliding-window caches drop the keys before the window, the sequence's first key among
    them. The contract never makes the *sequence's* first valid key a sink, not the first key
    of the call: where the call's keys cannot hold the whole sequence (the last query's
    position, which counts at most every earlier token, is past the number of keys), one zero
    key, real but outside every row's window (and outside every image block), is put in front to
    stand for the dropped start. Rows whose sequence is whole get it as padding. ``dropped_any``:
    whether the cache dropped any key, when the mask's record says so on the host
    (``masks.keys_dropped``); else the position ids are read. The new key-padding mask is made
    once per forward (``cache``). Packed sequences come without a cache: nothing is dropped."""
    kpm = plan.key_padding
    if position_ids is None or position_ids.dim() != 2 or dropped_any is False \
            or plan.segment_ids is not None:
        return key, value, plan
    bsz, nk = key.shape[0], key.shape[2]

    def marked():
        dropped = (position_ids[:, -1].to(key.device) + 1 > nk).expand(bsz)          # [B]
        if dropped_any is None and not bool(dropped.any()):
            return None
        real = kpm if kpm is not None else torch.ones(bsz, nk, dtype=torch.bool,
                                                      device=key.device)
        return torch.cat([dropped[:, None], real], dim=1)

    marked_kpm = marked() if cache is None else \
        cache.get((kpm, position_ids), lambda _: marked(),
                  ("dropped start", bsz, nk, dropped_any))
    if marked_kpm is None:
        return key, value, plan
    pad = key.new_zeros(key.shape[0], key.shape[1], 1, key.shape[3])
    blocks = plan.block_ids
    if blocks is not None:
        blocks = torch.nn.functional.pad(blocks, (1, 0), value=-1)
    return torch.cat([pad, key], dim=2), torch.cat([pad, value], dim=2), \
        plan._replace(key_padding=marked_kpm, block_ids=blocks)


# Inside torch.compile the whole call, mask check included (it reads the mask's values and cuts
# k/v to a data-dependent length), is one registered op: the compiler sees its output shape
# (the fake below) and the eager code runs when the graph executes. That eager code is not
# replayable from a CUDA graph (its host reads and the cut length belong to one call), so the op
# is tagged cudagraph_unsafe: mode="reduce-overhead" leaves it out of any captured graph.
# Every layer of a compiled forward gets the same mask tensor object (one graph buffer, a new
# one each run): its check is cached per tensor object and version (_OPAQUE_MASKS; by object, not
# by storage, since a captured graph may rewrite the storage of an earlier run's mask without a
# version bump), so one layer per forward pays it.
@torch.library.custom_op("act_kernels::hf_attention", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def hf_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], heads: Optional[torch.Tensor],
                    beta: float, tau: float, scale: float, backend: str,
                    window: Optional[int] = None,
                    position_ids: Optional[torch.Tensor] = None,
                    causal: bool = True) -> torch.Tensor:
    return _opaque_call(query, key, value, attention_mask, heads, beta, tau, scale, backend,
                        window, position_ids, causal)


def _opaque_call(query, key, value, attention_mask, heads, beta, tau, scale, backend, window,
                 position_ids, causal):
    key, value, structure, _, dense = _visible_keys(query, key, value, attention_mask,
                                                    _OPAQUE_MASKS, window, position_ids, causal)
    if dense is not None:            # no model state here: Python shows a repeated text once
        warn_dense(dense)
    return act_attention(query, key, value, heads=heads, beta=beta, tau=tau, scale=scale,
                         backend=backend, **structure).contiguous()


_OPAQUE_MASKS = TensorCache(views=False)


@hf_attention_op.register_fake
def _hf_attention_fake(query, key, value, attention_mask, heads, beta, tau, scale, backend,
                       window=None, position_ids=None, causal=True):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


# Training through a compiled model: the backward of the opaque call is the eager reference's
# on the same call (act_kernels.gradients), an opaque op of its own.
@torch.library.custom_op("act_kernels::hf_attention_backward", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def hf_attention_backward_op(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             heads: Optional[torch.Tensor], beta: float, tau: float, scale: float,
                             backend: str, window: Optional[int] = None,
                             position_ids: Optional[torch.Tensor] = None, causal: bool = True
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def exact(q, k, v):
        return _opaque_call(q, k, v, attention_mask, heads, beta, tau, scale, "eager", window,
                            position_ids, causal)

    with autograd_inside_an_op():
        return tuple(reference_gradients(exact, query, key, value, grad, (True, True, True),
                                         backend))


@hf_attention_backward_op.register_fake
def _hf_attention_backward_fake(grad, query, key, value, *args, **kwargs):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _hf_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[10])
    ctx.params = (inputs[5], inputs[6], inputs[7], inputs[8], inputs[9], inputs[11])


def _hf_backward(ctx, grad):
    query, key, value, mask, heads, position_ids = ctx.saved_tensors
    beta, tau, scale, backend, window, causal = ctx.params
    grads = hf_attention_backward_op(grad, query, key, value, mask, heads, beta, tau, scale,
                                     backend, window, position_ids, causal)
    return (*grads,) + (None,) * 9


hf_attention_op.register_autograd(_hf_backward, setup_context=_hf_setup_context)


# The steady decode step. A generating model calls each layer once per token with the same
# settings, shapes (but one more key), dtype and device, and, where nothing is padded, no mask.
# After one such call has passed every check, the layer keeps what it established (a
# _SteadyDecode in the module's __dict__: state that belongs to the layer) and its next calls,
# after a few comparisons, run the op's validated decode call (op.DecodeCall) directly: at decode
# sizes on a CPU every Python call and tensor op skipped is a visible part of the step.
_STEADY_ATTR = "_act_steady_decode"
_WATCHED_KWARGS = frozenset(_UNSUPPORTED_KWARGS) | {"cache", "output_attentions",
                                                    "sliding_window"}


class _SteadyDecode:
    """A layer's checked decode step. It fits a later call while the model's state, the config's
    profile and the layer's settings are those it was made with, no recorder listens, the call
    brings the same keyword arguments (the watched ones unset) and no mask, and q, k, v fit its
    :class:`~act_kernels.op.DecodeCall`."""

    __slots__ = ("state", "config_vars", "raw", "epoch", "scaling", "keys", "watched", "call")

    def __init__(self, state, module, settings, scaling, kwargs, call: DecodeCall):
        # the settings were made in this epoch of the state's cache: while no profile or
        # override change drops that cache, they are the layer's settings still
        self.state, self.epoch = state, state.settings_epoch
        self.scaling, self.call = scaling, call
        # the config's instance dict, read directly (a config's attribute lookup is Python
        # code); a profile that is not an instance attribute never matches: no steady step
        config = getattr(module, "config", None)
        self.config_vars = getattr(config, "__dict__", {})
        self.raw = getattr(config, "act_profile", None)
        self.keys = frozenset(kwargs)
        self.watched = tuple(self.keys & _WATCHED_KWARGS)

    def fits(self, module, query, key, value, dropout, scaling, kwargs) -> bool:
        state = self.state
        if (dropout or scaling != self.scaling or kwargs.keys() != self.keys
                or module.__dict__.get(STATE_ATTR) is not state or state.recorders
                or GLOBAL_RECORDERS.get()
                or self.config_vars.get("act_profile") is not self.raw
                or state.settings_epoch != self.epoch):
            return False
        for name in self.watched:
            if _is_set(kwargs[name]):
                return False
        return self.call.fits(query, key, value)


def _is_set(value) -> bool:
    """Is a watched keyword argument given (anything but ``None`` and ``False``)?"""
    return value is not None and value is not False


def _keep_steady(module, state, settings, backend, query, key, value, scaling, kwargs,
                 structure, front, dense) -> None:
    """After a full call: keep a :class:`_SteadyDecode` on ``module`` when the call was a steady
    decode step (one query row, no mask, window, padding or stand-in key, no recorder, no
    gradients)."""
    if (query.shape[2] == 1 and dense is None and front == 0 and len(structure) == 2
            and structure["window"] is None and structure["key_padding_mask"] is None
            and not state.recorders and not GLOBAL_RECORDERS.get()
            and not any(_is_set(kwargs.get(name)) for name in _WATCHED_KWARGS)
            and not needs_gradients(query, key, value)):
        call = DecodeCall(query, key, value, settings[0], settings[1], settings[2], scaling,
                          backend)
        module.__dict__[_STEADY_ATTR] = _SteadyDecode(state, module, settings, scaling, kwargs,
                                                      call)


def _traceable_decode(query, key, value, attention_mask, backend, window) -> bool:
    """Inside a compiled forward: is this call a torch-backend decode step (no window, no
    gradients) whose mask, if any, is a boolean ``[B or 1, 1, 1, Nk]`` row? Then the op traces
    it into the graph with the mask as its visibility (a static cache's unfilled slots are
    keys the row does not see), instead of the opaque op's host reads and cut."""
    return (backend == "torch" and window is None and query.shape[2] == 1
            and not needs_gradients(query, key, value)
            and (attention_mask is None or (attention_mask.dtype == torch.bool
                                            and attention_mask.dim() == 4
                                            and attention_mask.shape[1] == 1
                                            and attention_mask.shape[2] == 1)))


def _make_attention_forward(name: str):
    backend = ACT_ATTENTION_BACKENDS[name]

    def act_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs
                              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        compiling = torch.compiler.is_compiling()
        if not compiling and attention_mask is None:
            steady = module.__dict__.get(_STEADY_ATTR)
            if steady is not None and steady.fits(module, query, key, value, dropout, scaling,
                                                  kwargs):
                return steady.call(query, key, value).transpose(1, 2).contiguous(), None
        _refuse_unsupported(name, dropout, kwargs)
        state = state_of_module(module)
        settings = state.layer_settings(module, query.device)
        heads, beta, tau = settings
        window = kwargs.get("sliding_window")
        position_ids = kwargs.get("position_ids")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if compiling:
            if kwargs.get("output_attentions", False) or state.recorders or \
                    _global_recording():
                raise NotImplementedError(f"{name} attention: output_attentions and recording() "
                                          "need eager execution, not torch.compile")
            scale = default_scale(query.shape[-1]) if scaling is None else float(scaling)
            if _traceable_decode(query, key, value, attention_mask, backend, window):
                # traced into the graph (op._traced_decode): the mask row is the visibility
                out = act_attention(query, key, value, heads=heads, beta=beta, tau=tau,
                                    scale=scale, backend=backend, attn_mask=attention_mask)
            else:
                out = hf_attention_op(query, key, value, attention_mask, heads, beta, tau,
                                      scale, backend, window, position_ids, causal)
            return out.transpose(1, 2).contiguous(), None

        kv_len = key.shape[2]
        key, value, structure, front, dense = _visible_keys(
            query, key, value, attention_mask, state.mask_cache, window, position_ids, causal)
        if dense is not None and not state.dense_warned:
            state.dense_warned = True
            warn_dense(dense)
        if kwargs.get("output_attentions", False):
            out, probs = _eager_with_probs(query, key, value, heads, beta, tau, scaling,
                                           structure, kv_len, front)
            return out.transpose(1, 2).contiguous(), probs

        recorders = state.recorders_for(getattr(module, "layer_idx", None),
                                        GLOBAL_RECORDERS.get())
        args = dict(heads=heads, beta=beta, tau=tau, scale=scaling, backend=backend,
                    **structure)
        if recorders:
            out, stats = act_attention(query, key, value, return_stats=True, **args)
            for recorder in recorders:
                recorder(module, stats, query, key, value, structure["key_padding_mask"])
        else:
            out = act_attention(query, key, value, **args)
            if attention_mask is None:
                _keep_steady(module, state, settings, backend, query, key, value, scaling,
                             kwargs, structure, front, dense)
        return out.transpose(1, 2).contiguous(), None

    act_attention_forward.__name__ = f"{name}_attention_forward"
    act_attention_forward.__qualname__ = act_attention_forward.__name__
    return act_attention_forward


act_torch_attention_forward = _make_attention_forward("act_torch")
act_triton_attention_forward = _make_attention_forward("act_triton")


def register() -> None:
    """Register ``act_torch`` and ``act_triton`` with Transformers (done on import of
    :mod:`act_kernels.hf`; registering again is harmless)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    for impl, forward in (("act_torch", act_torch_attention_forward),
                          ("act_triton", act_triton_attention_forward)):
        AttentionInterface.register(impl, forward)
        AttentionMaskInterface.register(impl, act_sdpa_mask)
