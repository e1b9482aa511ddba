"""The statistics dict the torch backend returns with ``return_stats`` (``docs/spec.md`` §6)."""
from __future__ import annotations

import torch


def calibrated_heads(heads, bsz: int, hq: int, device) -> torch.Tensor:
    """``[B, Hq]`` bool: the calibrated pairs, a new tensor (never the caller's mask)."""
    if heads is None:
        return torch.zeros(bsz, hq, dtype=torch.bool, device=device)
    return heads.clone()


def prefill_stats(scores, sinks, mass, heads, q_shape, nk: int) -> dict:
    """The statistics of a prefill call from the per-pair tensors (every (b, h) pair)."""
    bsz, hq, nq, _ = q_shape
    return {"scores": scores.reshape(bsz, hq, nk), "sinks": sinks.reshape(bsz, hq, nk),
            "sink_mass": mass.reshape(bsz, hq, nq),
            "calibrated": calibrated_heads(heads, bsz, hq, scores.device)}
