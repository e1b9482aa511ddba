"""Calibration profiles: which heads of which layers ACT calibrates, with ``beta`` and ``tau``.

A profile is the result of the offline head search (``docs/spec.md``, "Head search")::

    profile = ACTProfile(heads={3: [1, 5], 7: [0]}, beta=0.4, tau=0.1,
                         model_name="SmolLM2-135M-Instruct", num_layers=30, num_heads=9,
                         provenance={"tasks": ["sst2"], "samples": 900, "seed": 0})
    profile.save("smollm2.json")
    profile = ACTProfile.load("smollm2.json")

This module is plain data: the profile, its validation against a model's shape, and its JSON
and config-dict round trip. Attaching a profile to a Transformers model is the job of
:mod:`act_kernels.hf` (``apply_profile``, ``head_override``), which imports this module and
never the other way round.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .modelinfo import text_config
from .params import DEFAULT_BETA, DEFAULT_TAU, as_index, check_beta, check_tau, head_mask

PROFILE_FORMAT = 1
_WHO = "ACTProfile"


def _as_int(value, what: str) -> int:
    return as_index(value, what, _WHO)


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
    beta: float = DEFAULT_BETA
    tau: float = DEFAULT_TAU
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
        self.beta = check_beta(self.beta, _WHO)
        self.tau = check_tau(self.tau, _WHO)
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
        return head_mask(indices, num_heads, who=_WHO, layer=int(layer), device=device)

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
        config = text_config(model)
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
        config = text_config(model)
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
