"""Attach ACT to a Transformers model: profiles, head overrides, recording.

::

    model = apply_profile(model, "profile.json")          # ACT attention, the profile's heads
    with head_override(model, {5: [0, 3]}):               # try other heads for a while
        ...
    with recording(model, callback, layers=[5]):          # the op's statistics of layer 5
        ...
    with using_profile(model, other):                     # apply for a block, restore after
        ...

All state is per model (:class:`~act_kernels.hf.state.ACTModelState`): two models can carry
different profiles, overrides and recorders at the same time.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, List, Mapping, Optional

import torch

from ..modelinfo import model_device, text_config
from ..params import (DEFAULT_BACKEND, as_index, check_beta, check_tau, head_mask,
                      resolve_backend)
from ..profiles import ACTProfile, ProfileLike, as_profile
from .attention import ACT_ATTENTION_BACKENDS, GLOBAL_RECORDERS
from .state import Override, RecorderEntry, attention_modules, state_of


def attn_implementation_for(backend: str = DEFAULT_BACKEND, device=None) -> str:
    """The registered implementation name for an op backend: ``"torch"`` -> ``"act_torch"``,
    ``"triton"`` -> ``"act_triton"``, ``"auto"`` -> Triton on CUDA, torch elsewhere (an
    implementation name is returned as it is)."""
    if backend in ACT_ATTENTION_BACKENDS:
        return backend
    if backend == "eager":
        raise ValueError("the 'eager' ACT backend is the op's reference, not an attention "
                         "implementation; choose 'auto', 'torch' or 'triton'")
    name = resolve_backend(backend, "cpu" if device is None else device, who="act_kernels.hf")
    return {b: impl for impl, b in ACT_ATTENTION_BACKENDS.items()}[name]


def current_implementation(model) -> Optional[str]:
    """The attention implementation of the model's text decoder."""
    return getattr(text_config(model), "_attn_implementation", None)


def _backend_of(model) -> str:
    """The op backend of the model's current ACT implementation, ``"auto"`` if none."""
    return ACT_ATTENTION_BACKENDS.get(current_implementation(model), DEFAULT_BACKEND)


def _attention_configs(model) -> List[Any]:
    """The configs the attention modules read (``model.config`` and, for composite models, the
    sub-configs of their attention layers); each once."""
    configs, seen = [model.config], {id(model.config)}
    for module in attention_modules(model):
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            configs.append(config)
            seen.add(id(config))
    return configs


def _text_request(config, text, name: str):
    """``name`` for a plain model; for a composite one (a vision-language model), the nested
    ``{sub_config_key: ...}`` request that reaches its text decoder only (other towers keep
    their attention). ``None`` if the text config is not among the sub-configs."""
    if config is text:
        return name
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            found = _text_request(sub, text, name)
            if found is not None:
                return {key: found}
    return None


def _set_attn_implementation(model, name: str) -> None:
    """Switch the model's text decoder to the attention implementation ``name``."""
    text = text_config(model)
    if getattr(text, "_attn_implementation", None) == name:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(_text_request(model.config, text, name) or name)
    if getattr(text, "_attn_implementation", None) != name:
        text._attn_implementation = name


def _store_profile(model, stored: Optional[dict]) -> None:
    for config in _attention_configs(model):
        if stored is None:
            if hasattr(config, "act_profile"):
                delattr(config, "act_profile")
        else:
            config.act_profile = stored


def apply_profile(model, profile: ProfileLike, backend: str = DEFAULT_BACKEND):
    """Attach ``profile`` to ``model`` and switch it to ACT attention; returns ``model``.

    Args:
        model: a Transformers model whose attention goes through ``AttentionInterface``.
        profile: an :class:`~act_kernels.profiles.ACTProfile`, its dict, the path of its JSON
            file, or ``None`` / an empty profile (ACT attention that calibrates nothing).
        backend: ``"torch"`` (``attn_implementation="act_torch"``), ``"triton"``
            (``"act_triton"``), or ``"auto"`` (Triton when the model is on CUDA, else torch).

    The profile is stored as a plain dict in ``model.config.act_profile`` (it survives
    ``save_pretrained`` / ``from_pretrained``); it is checked against the model's number of
    layers and query heads first (``ValueError`` naming the offending layer/head). Applying
    another profile later takes effect at the next forward call.
    """
    profile = as_profile(profile)
    profile.validate_for_model(model)
    name = attn_implementation_for(backend, model_device(model))
    state_of(model)
    _store_profile(model, profile.to_dict())
    _set_attn_implementation(model, name)
    return model


def get_profile(model) -> Optional[ACTProfile]:
    """The profile attached to ``model`` (``None`` if there is none)."""
    raw = getattr(model.config, "act_profile", None)
    return None if raw is None else ACTProfile.from_dict(raw)


def remove_profile(model, attn_implementation: str = "sdpa"):
    """Detach the profile and go back to ``attn_implementation``; returns ``model``."""
    _store_profile(model, None)
    _set_attn_implementation(model, attn_implementation)
    return model


@contextlib.contextmanager
def using_profile(model, profile: ProfileLike, backend: Optional[str] = None) -> Iterator[Any]:
    """Run ``model`` with ``profile`` inside the block; afterwards its previous profile (or
    none) and attention implementation are back. ``backend``: the model's current ACT backend
    by default (``"auto"`` when it has none). Yields ``model``."""
    previous_impl = current_implementation(model)
    previous = getattr(model.config, "act_profile", None)
    apply_profile(model, profile, backend=backend or _backend_of(model))
    try:
        yield model
    finally:
        _store_profile(model, previous)
        _set_attn_implementation(model, previous_impl or "sdpa")


def _override_mask(layer: int, heads, num_heads: int) -> torch.Tensor:
    if isinstance(heads, torch.Tensor) and heads.dtype == torch.bool:
        if heads.dim() not in (1, 2) or heads.shape[-1] != num_heads:
            raise ValueError(f"head_override: the mask of layer {layer} must have shape [Hq] or "
                             f"[B, Hq] with Hq={num_heads}, got {tuple(heads.shape)}")
        return heads.detach()
    if isinstance(heads, torch.Tensor):
        heads = heads.flatten().tolist()
    if not isinstance(heads, Iterable) or isinstance(heads, (str, bytes)):
        heads = [heads]
    return head_mask(heads, num_heads, who="head_override", layer=layer)


@contextlib.contextmanager
def head_override(model, heads: Mapping[int, Any], beta: Optional[float] = None,
                  tau: Optional[float] = None, backend: str = DEFAULT_BACKEND) -> Iterator[Any]:
    """Temporarily replace the model's profile by an explicit choice of heads.

    Inside the ``with`` block, layer ``l`` in ``heads`` calibrates the query heads selected by
    ``heads[l]``; every other layer runs plain attention; the attached profile is ignored (its
    ``beta`` / ``tau`` still apply unless ``beta`` / ``tau`` are given here)::

        # one candidate head per batch row of layer 5: row r calibrates head r
        rows = torch.eye(9, dtype=torch.bool)            # [B=9, Hq=9]
        with head_override(model, {5: rows}):
            logits = model(**batch).logits               # batch of 9 copies of a prompt

    ``heads[l]`` is a bool tensor ``[Hq]`` (same heads for every batch row), a bool tensor
    ``[B, Hq]`` (row ``b`` of the batch calibrates the heads ``heads[l][b]``; ``B`` must be
    the batch size of every forward inside the block, including generation), or a list of head
    indices. Layers and heads are checked against the model (``ValueError``).

    If the model is not already using an ACT attention implementation, it is switched to
    one (``backend``: ``"auto"`` / ``"torch"`` / ``"triton"``) for the block and switched back
    afterwards. Overrides nest (the innermost wins) and are per model. Yields ``model``.
    """
    config = text_config(model)
    num_layers = getattr(config, "num_hidden_layers", None)
    num_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, Mapping):
        raise TypeError(f"head_override: heads must be a mapping {{layer: heads}}, got "
                        f"{type(heads).__name__}")
    masks = {}
    for layer, sel in heads.items():
        layer = as_index(layer, "a layer index", "head_override")
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            raise ValueError(f"head_override: layer {layer} is out of range: the model has "
                             f"{num_layers} layers (valid 0..{num_layers - 1})")
        masks[layer] = _override_mask(layer, sel, num_heads)
    override = Override(masks, None if beta is None else check_beta(beta, "head_override"),
                        None if tau is None else check_tau(tau, "head_override"))

    previous = current_implementation(model)
    switched = previous not in ACT_ATTENTION_BACKENDS
    if switched:
        _set_attn_implementation(model, attn_implementation_for(backend, model_device(model)))
    state = state_of(model)
    state.push(override)
    try:
        yield model
    finally:
        state.pop(override)
        if switched:
            _set_attn_implementation(model, previous)


@contextlib.contextmanager
def recording(*args, layers: Optional[Iterable[int]] = None):
    """``recording(model, recorder, layers=None)``: within the block, every ACT attention call of
    ``model`` in ``layers`` (all layers by default) also computes the op's
    :class:`~act_kernels.op.ACTStats` (every head), in the same op call, and hands them to
    ``recorder(module, stats, query, key, value, key_padding_mask)`` with the layer's module,
    its post-RoPE query / key / value and the key-padding mask. Yields ``recorder``.

    The model must run an ACT implementation (``apply_profile``, ``head_override``).
    ``recording(recorder)`` without a model (every model) is deprecated.
    """
    if len(args) == 1:
        warnings.warn("recording(recorder) without a model is deprecated; use "
                      "recording(model, recorder, layers=...)", DeprecationWarning, stacklevel=3)
        recorder = args[0]
        token = GLOBAL_RECORDERS.set(GLOBAL_RECORDERS.get() + (recorder,))
        try:
            yield recorder
        finally:
            GLOBAL_RECORDERS.reset(token)
        return
    if len(args) != 2:
        raise TypeError("recording(model, recorder, layers=None) takes a model and a callback")
    model, recorder = args
    wanted = None if layers is None else frozenset(
        as_index(layer, "a layer index", "recording") for layer in layers)
    entry = RecorderEntry(recorder, wanted)
    state = state_of(model)
    state.recorders.append(entry)
    try:
        yield recorder
    finally:
        state.recorders.remove(entry)
