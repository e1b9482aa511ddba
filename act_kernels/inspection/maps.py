"""Attention maps of one head for a window of rows, before and after ACT
(:func:`attention_window`), from the queries / keys :func:`~.collect.collect_sinks` kept.

Memory ``rows x keys`` of the window, never ``N x N``. "After" is
:func:`~act_kernels.reference.calibrate_probs` applied to those rows with the head's sinks found on
the whole input: what ACT would do if that head were calibrated, whether or not the profile
calibrates it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..reference import calibrate_probs
from .collect import SinkReport, ranges_text


@dataclass
class AttentionWindow:
    """Attention of the rows ``rows[0] .. rows[1] - 1`` of one head over every key they see
    (keys ``0 .. rows[1] - 1``): ``before`` is plain attention ``P``, ``after`` the calibrated
    ``P'`` with the head's whole-input sinks. Both ``[rows, keys]`` float32; every row sums to 1
    (entries of keys after a row's position are 0)."""

    layer: int
    head: int
    rows: Tuple[int, int]
    before: np.ndarray
    after: np.ndarray
    sinks: List[int]            # sink positions < rows[1] (whole-input sinks of the head)
    sink_mass: np.ndarray       # [rows]: m_i of those rows (equals ACTStats.sink_mass there)
    beta: float

    def __iter__(self):          # before, after = attention_window(...)
        return iter((self.before, self.after))


def window_probs(q_rows: torch.Tensor, keys: torch.Tensor, first_row: int,
                 scale: float) -> torch.Tensor:
    """Causal softmax of the rows ``first_row ..`` of one head: ``q_rows [W, D]`` against
    ``keys [K, D]`` (keys ``0 .. K - 1``); returns ``[W, K]`` float32, a row's entries past its
    own position are 0. Memory ``W x K``, never ``N x N``."""
    logits = (q_rows.float() @ keys.float().T) * scale
    pos = torch.arange(first_row, first_row + q_rows.shape[0])[:, None]
    cols = torch.arange(keys.shape[0])[None, :]
    logits = logits.masked_fill(cols > pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_window(report: SinkReport, layer: int, head: int,
                     rows: Optional[Tuple[int, int]] = None) -> AttentionWindow:
    """Before / after attention of ``head`` of ``layer`` for the rows of the report's window
    (or the sub-range ``rows`` of it). "After" is ACT on this head with its sinks from the whole
    input (the op's statistics), computed by :func:`~act_kernels.reference.calibrate_probs`."""
    cap = report.captures.get(int(layer))
    if cap is None:
        raise ValueError(f"no queries/keys were kept for layer {layer}; collect with "
                         f"capture_layers including it (kept: "
                         f"{ranges_text(sorted(report.captures))})")
    if not 0 <= head < report.num_heads:
        raise ValueError(f"head {head} is out of range: the model has {report.num_heads} heads")
    w0, w1 = report.window
    r0, r1 = (w0, w1) if rows is None else (int(rows[0]), int(rows[1]))
    if not w0 <= r0 < r1 <= w1:
        raise ValueError(f"rows {(r0, r1)} are outside the collected window {(w0, w1)}; "
                         "collect again with window=(start, stop)")
    group = cap.q.shape[0] // cap.k.shape[0]
    q_rows = cap.q[head, r0 - w0:r1 - w0]
    keys = cap.k[head // group, :r1]
    before = window_probs(q_rows, keys, r0, cap.scale)
    li = report.layer_index(layer)
    head_sinks = torch.from_numpy(report.sinks[li, head, :r1].copy())
    after, m = calibrate_probs(before, head_sinks[None, :], report.beta)
    return AttentionWindow(layer=int(layer), head=int(head), rows=(r0, r1),
                           before=before.numpy(), after=after.numpy(),
                           sinks=[int(j) for j in np.flatnonzero(head_sinks.numpy())],
                           sink_mass=m[:, 0].numpy(), beta=report.beta)


def drawn_columns(rows: Tuple[int, int]) -> List[int]:
    """Key columns drawn for a window: ``0 .. stop - 1`` for a window at the start, else the
    first token followed by the window's own positions."""
    r0, r1 = rows
    return list(range(r1)) if r0 == 0 else [0] + list(range(r0, r1))
