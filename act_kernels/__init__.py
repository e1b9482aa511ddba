"""act-kernels: ACT (attention calibration of hidden attention sinks) inside fused attention."""
from .op import ACTStats, act_attention

__all__ = ["act_attention", "ACTStats"]
__version__ = "0.1.0"
