"""act-kernels: ACT (attention calibration of hidden attention sinks) inside fused attention.

Layers, top to bottom: the CLI (``act``); search, evaluation and inspection; the Transformers
integration (:mod:`act_kernels.hf`, which registers ``"act_torch"`` / ``"act_triton"``); the op
(:func:`act_attention`: validate + dispatch); at the ground the Triton kernels, the torch
backend, the eager reference, tasks, profiles and the model loader. The contract the op
implements is ``docs/spec.md``.
"""
from .op import ACTStats, act_attention
from .profiles import ACTProfile
from .hf import apply_profile, head_override, load_model, recording

__all__ = ["act_attention", "ACTStats", "ACTProfile", "apply_profile", "head_override",
           "load_model", "recording"]
__version__ = "0.1.0"
