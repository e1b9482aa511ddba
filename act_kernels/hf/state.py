"""The ACT state of one model: its profile, its head-override stack and its recorders.

One :class:`ACTModelState` per model, stored in the ``__dict__`` of the model and of each of its
attention modules (so it is neither a submodule nor saved with the weights, and it dies with the
model). The attention function reaches it through the module it is called with; the public
functions of :mod:`act_kernels.hf.api` reach it through the model. A model loaded with an
``act_profile`` in its config and never passed to those functions gets a state per attention
module on its first call, built from the profile in the module's config.

The profile itself lives in ``config.act_profile`` as a plain dict (so ``save_pretrained``
round-trips it); the state parses it once per dict and caches, per layer and device, the tensor
of calibrated heads that the op receives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..modelinfo import text_config
from ..params import DEFAULT_BETA, DEFAULT_TAU
from ..profiles import ACTProfile
from ..tensor_cache import TensorCache

STATE_ATTR = "_act_state"

Recorder = Callable[..., None]
"""``recorder(module, stats, query, key, value, key_padding_mask)``."""


@dataclass
class Override:
    """What one ``head_override`` block installs: bool masks per layer (``[Hq]`` or ``[B, Hq]``),
    and optionally its own ``beta`` / ``tau``."""

    heads: Dict[int, torch.Tensor]
    beta: Optional[float] = None
    tau: Optional[float] = None


@dataclass
class RecorderEntry:
    callback: Recorder
    layers: Optional[frozenset] = None     # None: every layer

    def wants(self, layer: Optional[int]) -> bool:
        return self.layers is None or layer in self.layers


@dataclass
class ACTModelState:
    overrides: List[Override] = field(default_factory=list)
    recorders: List[RecorderEntry] = field(default_factory=list)
    # the attention masks checked and the key-padding masks derived from them, per mask tensor:
    # every layer of a forward gets the same mask, so it is checked once per forward
    mask_cache: TensorCache = field(default_factory=TensorCache)
    # whether the model warned that a mask took the op's slower dense path (once per model)
    dense_warned: bool = False
    model_level: bool = True
    _raw: object = None
    _profile: Optional[ACTProfile] = None
    _settings: Dict[Tuple[int, str], tuple] = field(default_factory=dict)
    # bumped whenever the cached settings are dropped: a layer's steady decode step compares it
    # (one attribute) instead of looking its settings up again
    settings_epoch: int = 0

    # -- the profile and the override stack ---------------------------------------------------

    def profile(self, config) -> Optional[ACTProfile]:
        """The parsed ``config.act_profile`` (``None`` if there is none); parsed once per dict."""
        raw = getattr(config, "act_profile", None)
        if raw is not self._raw:
            self._raw = raw
            self._profile = None if raw is None else ACTProfile.from_dict(raw)
            self._drop_settings()
        return self._profile

    def push(self, override: Override) -> None:
        self.overrides.append(override)
        self._drop_settings()

    def pop(self, override: Override) -> None:
        if override in self.overrides:
            self.overrides.remove(override)
        self._drop_settings()

    def _drop_settings(self) -> None:
        self._settings.clear()
        self.settings_epoch += 1

    def layer_settings(self, module, device: torch.device
                       ) -> Tuple[Optional[torch.Tensor], float, float]:
        """``(heads, beta, tau)`` for the attention ``module``: ``heads`` a bool tensor on
        ``device`` (``[Hq]`` or ``[B, Hq]``) or ``None`` when the layer calibrates nothing. The
        same tensor object is returned on every call while the profile and overrides stay."""
        config = getattr(module, "config", None)
        profile = self.profile(config)
        layer = getattr(module, "layer_idx", None)
        cached = self._settings.get((layer, device))       # a device object hashes as its name
        if cached is not None:
            return cached
        key = (layer, device)
        beta = profile.beta if profile is not None else DEFAULT_BETA
        tau = profile.tau if profile is not None else DEFAULT_TAU
        heads = None
        if self.overrides:
            top = self.overrides[-1]
            beta = top.beta if top.beta is not None else beta
            tau = top.tau if top.tau is not None else tau
            if layer is not None and int(layer) in top.heads:
                heads = top.heads[int(layer)].to(device)
        elif profile is not None and layer is not None:
            num_heads = getattr(text_config(config), "num_attention_heads", None) \
                if config is not None else None
            heads = profile.head_mask(int(layer), num_heads or getattr(module, "num_heads", None),
                                      device=device)
        settings = (heads, beta, tau)
        self._settings[key] = settings
        return settings

    # -- recorders ----------------------------------------------------------------------------

    def recorders_for(self, layer: Optional[int], extra: Sequence[Recorder] = ()
                      ) -> List[Recorder]:
        found = [r.callback for r in self.recorders if r.wants(layer)]
        return found + list(extra) if extra else found


def attention_modules(model) -> List[torch.nn.Module]:
    """The modules of ``model`` that Transformers calls attention functions with (those with a
    ``layer_idx``)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx")]


def state_of(model) -> ACTModelState:
    """The model's state, created and attached to the model and its attention modules on first
    use."""
    state = model.__dict__.get(STATE_ATTR)
    if isinstance(state, ACTModelState):
        return state
    modules = attention_modules(model)
    for module in modules:
        found = module.__dict__.get(STATE_ATTR)
        if isinstance(found, ACTModelState) and found.model_level:
            state = found          # a state made through a submodel or the parent model
            break
    else:
        state = ACTModelState()
    model.__dict__[STATE_ATTR] = state
    for module in modules:
        module.__dict__[STATE_ATTR] = state
    return state


def state_of_module(module) -> ACTModelState:
    """The state of the model an attention ``module`` belongs to (a per-module one when the
    model was never passed to the public functions)."""
    state = module.__dict__.get(STATE_ATTR)
    if state is None:
        state = ACTModelState(model_level=False)
        module.__dict__[STATE_ATTR] = state
    return state
