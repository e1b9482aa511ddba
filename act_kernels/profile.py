"""Calibration profiles: which heads of which layers ACT calibrates, with ``beta`` and ``tau``.

A profile is the result of the offline head search (``ACT_SPEC.md``, "Head search")::

    profile = ACTProfile(heads={3: [1, 5], 7: [0]}, beta=0.4, tau=0.1,
                         model_name="SmolLM2-135M-Instruct", num_layers=30, num_heads=9,
                         provenance={"tasks": ["sst2"], "samples": 900, "seed": 0})
    profile.save("smollm2.json")
    model = apply_profile(model, ACTProfile.load("smollm2.json"))    # backend "auto"

:func:`apply_profile` stores the profile in ``model.config.act_profile`` as a plain dict, so
``save_pretrained`` / ``from_pretrained(..., attn_implementation="act_torch")`` round-trip it,
and switches the model to the ``act_torch`` / ``act_triton`` attention implementation. Another
profile can be applied at any time, without reloading the model.

:func:`head_override` temporarily replaces the profile, e.g. to try one head per batch row
during the head search.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

PROFILE_FORMAT = 1


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"ACTProfile: {what} must be an integer, got {value!r}")
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise TypeError(f"ACTProfile: {what} must be an integer, got {value!r}")


@dataclass
class ACTProfile:
    """Heads to calibrate, per layer: ``heads = {layer_index: [query_head_index, ...]}``.

    ``beta`` is the fraction of the sink attention kept, ``tau`` the sink threshold.
    ``model_name``, ``num_layers`` and ``num_heads`` (query heads per layer) describe the model
    the profile was made for; when set, :meth:`validate` and :func:`apply_profile` check them.
    ``provenance`` is free-form (tasks, samples, seed, date, ...). Layer keys are always ints,
    also after :meth:`load` from JSON.
    """

    heads: Dict[int, List[int]] = field(default_factory=dict)
    beta: float = 0.4
    tau: float = 0.1
    model_name: Optional[str] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.heads is None:
            self.heads = {}
        if not isinstance(self.heads, Mapping):
            raise TypeError("ACTProfile: heads must be a mapping {layer: [head, ...]}, got "
                            f"{type(self.heads).__name__}")
        heads: Dict[int, List[int]] = {}
        for layer, idx in self.heads.items():
            layer = _as_int(layer, "a layer index")
            if isinstance(idx, (Integral, str)) and not isinstance(idx, bool):
                idx = [idx]
            if isinstance(idx, torch.Tensor):
                idx = idx.nonzero().flatten().tolist() if idx.dtype == torch.bool else idx.tolist()
            if not isinstance(idx, Sequence):
                raise TypeError(f"ACTProfile: heads of layer {layer} must be a list of head "
                                f"indices, got {type(idx).__name__}")
            values = sorted({_as_int(h, f"a head index (layer {layer})") for h in idx})
            if layer in heads:
                values = sorted(set(heads[layer]) | set(values))
            heads[layer] = values
        self.heads = {layer: heads[layer] for layer in sorted(heads) if heads[layer]}
        for name in ("beta", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"ACTProfile: {name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ACTProfile: beta must be in [0, 1], got {self.beta}")
        if not self.tau > 0.0:
            raise ValueError(f"ACTProfile: tau must be > 0, got {self.tau}")
        for name in ("num_layers", "num_heads"):
            value = getattr(self, name)
            if value is not None:
                value = _as_int(value, name)
                if value <= 0:
                    raise ValueError(f"ACTProfile: {name} must be positive, got {value}")
                setattr(self, name, value)
        self.provenance = dict(self.provenance or {})
        self.validate()

    # -- queries --------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        """No head is calibrated: the model runs plain attention."""
        return not self.heads

    def num_calibrated(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def head_mask(self, layer: int, num_heads: Optional[int] = None, device=None
                  ) -> Optional[torch.Tensor]:
        """Bool ``[num_heads]`` of the calibrated heads of ``layer``, or ``None`` if none."""
        num_heads = num_heads or self.num_heads
        if num_heads is None:
            raise ValueError("ACTProfile.head_mask: num_heads is unknown; pass it")
        indices = self.heads.get(int(layer))
        if not indices:
            return None
        self.validate(num_heads=num_heads)
        mask = torch.zeros(num_heads, dtype=torch.bool)
        mask[torch.tensor(indices, dtype=torch.long)] = True
        return mask if device is None else mask.to(device)

    # -- validation -----------------------------------------------------------------------

    def validate(self, num_layers: Optional[int] = None, num_heads: Optional[int] = None,
                 model_name: Optional[str] = None) -> "ACTProfile":
        """Check every layer / head index against a model's shape; ``ValueError`` names the
        first one out of range. Without arguments, checks against the profile's own fields."""
        if num_layers is not None and self.num_layers is not None and num_layers != self.num_layers:
            raise ValueError(f"ACTProfile: made for a model with {self.num_layers} layers"
                             f"{' (' + self.model_name + ')' if self.model_name else ''}, "
                             f"but this model has {num_layers}")
        if num_heads is not None and self.num_heads is not None and num_heads != self.num_heads:
            raise ValueError(f"ACTProfile: made for a model with {self.num_heads} query heads "
                             f"per layer, but this model has {num_heads}")
        num_layers = num_layers if num_layers is not None else self.num_layers
        num_heads = num_heads if num_heads is not None else self.num_heads
        for layer, idx in self.heads.items():
            if layer < 0 or (num_layers is not None and layer >= num_layers):
                valid = f" (valid 0..{num_layers - 1})" if num_layers is not None else ""
                raise ValueError(f"ACTProfile: layer {layer} is out of range: the model has "
                                 f"{num_layers} layers{valid}")
            for head in idx:
                if head < 0 or (num_heads is not None and head >= num_heads):
                    valid = f" (valid 0..{num_heads - 1})" if num_heads is not None else ""
                    raise ValueError(f"ACTProfile: head {head} of layer {layer} is out of range: "
                                     f"the model has {num_heads} query heads per layer{valid}")
        return self

    def validate_for_model(self, model) -> "ACTProfile":
        """:meth:`validate` against ``model.config`` (layers and query heads)."""
        config = _text_config(model)
        return self.validate(getattr(config, "num_hidden_layers", None),
                             getattr(config, "num_attention_heads", None))

    # -- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-ready dict (layer keys as strings, as JSON stores them)."""
        return {
            "format": PROFILE_FORMAT,
            "heads": {str(layer): list(idx) for layer, idx in self.heads.items()},
            "beta": self.beta,
            "tau": self.tau,
            "model_name": self.model_name,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "provenance": json.loads(json.dumps(self.provenance, default=str)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ACTProfile":
        if isinstance(data, ACTProfile):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"ACTProfile.from_dict: expected a dict, got {type(data).__name__}")
        fmt = data.get("format", PROFILE_FORMAT)
        if fmt != PROFILE_FORMAT:
            raise ValueError(f"ACTProfile: unsupported profile format {fmt!r} "
                             f"(this version reads format {PROFILE_FORMAT})")
        known = {"heads", "beta", "tau", "model_name", "num_layers", "num_heads", "provenance"}
        unknown = set(data) - known - {"format"}
        if unknown:
            raise ValueError(f"ACTProfile: unknown profile fields {sorted(unknown)}")
        return cls(**{k: data[k] for k in known if data.get(k) is not None})

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the profile as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ACTProfile":
        """Read a profile written by :meth:`save` (layer keys become ints)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def for_model(cls, model, heads: Optional[Mapping[int, Sequence[int]]] = None,
                  **kwargs) -> "ACTProfile":
        """A profile with ``model_name`` / ``num_layers`` / ``num_heads`` filled from ``model``."""
        config = _text_config(model)
        kwargs.setdefault("model_name", getattr(config, "_name_or_path", None) or None)
        kwargs.setdefault("num_layers", getattr(config, "num_hidden_layers", None))
        kwargs.setdefault("num_heads", getattr(config, "num_attention_heads", None))
        return cls(heads=dict(heads or {}), **kwargs)


ProfileLike = Union[None, ACTProfile, Mapping[str, Any], str, os.PathLike]


def as_profile(profile: ProfileLike) -> ACTProfile:
    """``None`` (empty), an :class:`ACTProfile`, its dict, or a JSON path -> :class:`ACTProfile`."""
    if profile is None:
        return ACTProfile()
    if isinstance(profile, ACTProfile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return ACTProfile.load(profile)
    if isinstance(profile, Mapping):
        if "heads" in profile or "format" in profile:
            return ACTProfile.from_dict(profile)
        return ACTProfile(heads=dict(profile))   # a bare {layer: [heads]} mapping
    raise TypeError(f"expected an ACTProfile, a dict or a path, got {type(profile).__name__}")


def _text_config(model):
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _attention_configs(model) -> List[Any]:
    """The configs the attention modules read (``model.config`` and, for composite models, the
    sub-configs of their attention layers); each once."""
    configs, seen = [model.config], {id(model.config)}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "layer_idx") and config is not None and id(config) not in seen:
            configs.append(config)
            seen.add(id(config))
    return configs


def _set_attn_implementation(model, name: str) -> None:
    if getattr(model.config, "_attn_implementation", None) == name:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.config._attn_implementation = name


def apply_profile(model, profile: ProfileLike, backend: str = "auto"):
    """Attach ``profile`` to ``model`` and switch it to ACT attention; returns ``model``.

    Args:
        model: a Transformers model whose attention goes through ``AttentionInterface``.
        profile: an :class:`ACTProfile`, its dict, the path of its JSON file, or ``None`` /
            an empty profile (ACT attention that calibrates nothing: plain attention).
        backend: ``"torch"`` (``attn_implementation="act_torch"``), ``"triton"``
            (``"act_triton"``), or ``"auto"`` (Triton when the model is on CUDA, else torch).

    The profile is stored as a plain dict in ``model.config.act_profile`` (it survives
    ``save_pretrained`` / ``from_pretrained``); it is checked against the model's number of
    layers and query heads first (``ValueError`` naming the offending layer/head). Applying
    another profile later takes effect at the next forward call.
    """
    from .integration import attn_implementation_for

    profile = as_profile(profile)
    profile.validate_for_model(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    name = attn_implementation_for(backend, device)
    stored = profile.to_dict()
    for config in _attention_configs(model):
        config.act_profile = stored
    _set_attn_implementation(model, name)
    return model


def get_profile(model) -> Optional[ACTProfile]:
    """The profile attached to ``model`` (``None`` if there is none)."""
    raw = getattr(model.config, "act_profile", None)
    return None if raw is None else ACTProfile.from_dict(raw)


def remove_profile(model, attn_implementation: str = "sdpa"):
    """Detach the profile and go back to ``attn_implementation``; returns ``model``."""
    for config in _attention_configs(model):
        if hasattr(config, "act_profile"):
            delattr(config, "act_profile")
    _set_attn_implementation(model, attn_implementation)
    return model


def _override_mask(layer: int, heads, num_heads: int) -> torch.Tensor:
    if isinstance(heads, torch.Tensor) and heads.dtype == torch.bool:
        if heads.dim() not in (1, 2) or heads.shape[-1] != num_heads:
            raise ValueError(f"head_override: the mask of layer {layer} must have shape [Hq] or "
                             f"[B, Hq] with Hq={num_heads}, got {tuple(heads.shape)}")
        return heads.detach()
    if isinstance(heads, torch.Tensor):
        heads = heads.flatten().tolist()
    if isinstance(heads, (Integral,)) and not isinstance(heads, bool):
        heads = [heads]
    mask = torch.zeros(num_heads, dtype=torch.bool)
    for h in heads:
        h = _as_int(h, f"a head index (layer {layer})")
        if not 0 <= h < num_heads:
            raise ValueError(f"head_override: head {h} of layer {layer} is out of range: the "
                             f"model has {num_heads} query heads per layer "
                             f"(valid 0..{num_heads - 1})")
        mask[h] = True
    return mask


@contextlib.contextmanager
def head_override(model, heads: Mapping[int, Any], beta: Optional[float] = None,
                  tau: Optional[float] = None, backend: str = "auto") -> Iterator[Any]:
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
    afterwards. Overrides nest (the innermost wins) and are per model config. Yields ``model``.
    """
    from .integration import ACT_ATTENTION_BACKENDS, _OVERRIDES, _Override, attn_implementation_for

    config = _text_config(model)
    num_layers = getattr(config, "num_hidden_layers", None)
    num_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, Mapping):
        raise TypeError(f"head_override: heads must be a mapping {{layer: heads}}, got "
                        f"{type(heads).__name__}")
    masks = {}
    for layer, sel in heads.items():
        layer = _as_int(layer, "a layer index")
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            raise ValueError(f"head_override: layer {layer} is out of range: the model has "
                             f"{num_layers} layers (valid 0..{num_layers - 1})")
        masks[layer] = _override_mask(layer, sel, num_heads)
    if beta is not None and not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"head_override: beta must be in [0, 1], got {beta}")
    if tau is not None and not float(tau) > 0.0:
        raise ValueError(f"head_override: tau must be > 0, got {tau}")
    override = _Override(masks, None if beta is None else float(beta),
                         None if tau is None else float(tau))

    previous = getattr(model.config, "_attn_implementation", None)
    switched = previous not in ACT_ATTENTION_BACKENDS
    if switched:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        _set_attn_implementation(model, attn_implementation_for(backend, device))
    configs = _attention_configs(model)
    for cfg in configs:
        _OVERRIDES.setdefault(id(cfg), []).append(override)
    try:
        yield model
    finally:
        for cfg in configs:
            stack = _OVERRIDES.get(id(cfg))
            if stack and override in stack:
                stack.remove(override)
            if not stack:
                _OVERRIDES.pop(id(cfg), None)
        if switched:
            _set_attn_implementation(model, previous)
