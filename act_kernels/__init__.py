"""act-kernels: ACT (attention calibration of hidden attention sinks) inside fused attention."""
from .op import ACTStats, act_attention
from . import integration  # noqa: F401  (registers "act_torch" / "act_triton" with Transformers)
from .model_loader import load_model
from .profile import ACTProfile, apply_profile, head_override

__all__ = ["act_attention", "ACTStats", "ACTProfile", "apply_profile", "head_override",
           "load_model"]
__version__ = "0.1.0"
