"""The rules of the greedy head selection, shared by the search's steps and its report: the
order candidates are tried in, when a head is kept, when a final set beats the uncalibrated
model, and the evidence both decisions rest on (:func:`margin_evidence`)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

EPS = 1e-12

EVIDENCE_LEVEL = 0.05
"""Default ``--evidence-level``: the final check's one-sided level, and the greedy step's
family-wise level (split evenly over the heads it tries, Bonferroni)."""


def rank_key(row: dict) -> tuple:
    """Best first: accuracy gain, class-balanced accuracy gain, margin gain, layer, head."""
    return (-row["d_acc"], -row["d_bal_acc"], -row["d_margin"], row["layer"], row["head"])


def t_upper_tail(t: float, df: int) -> float:
    """``P(T > t)`` for Student's t with ``df >= 1`` (integer) degrees of freedom, ``t >= 0``,
    from the closed form for integer ``df`` (a finite series in ``cos`` of
    ``theta = atan(t / sqrt(df))``)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:                       # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:                            # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return max(0.0, (1.0 - inside) / 2)


def t_quantile(p: float, df: int) -> float:
    """The ``t >= 0`` with ``P(T > t) = p`` (``0 < p <= 1/2``) for Student's t, by bisection."""
    if not 0 < p <= 0.5 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p <= 1/2 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_upper_tail(hi, df) > p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_upper_tail(mid, df) > p else (lo, mid)
        if hi - lo <= 1e-10 * hi:
            break
    return hi


def margin_evidence(diff: torch.Tensor, level: float) -> dict:
    """The evidence that calibration raises the decision margin: ``diff`` holds the paired
    per-sample changes (calibrated minus before, on the same samples). Returns ``n``, their
    ``mean``, and ``lower``, the one-sided ``1 - level`` Student-t lower confidence bound of the
    mean (``mean - t(level, n - 1) * sd / sqrt(n)``; ``None``, no evidence, with fewer than 2
    samples)."""
    diff = diff.double().flatten()
    n = int(diff.numel())
    if n == 0:
        return {"n": 0, "mean": 0.0, "lower": None, "level": level}
    mean = float(diff.mean())
    if n < 2:
        return {"n": n, "mean": mean, "lower": None, "level": level}
    sd = float(diff.std(unbiased=True))
    return {"n": n, "mean": mean, "lower": mean - t_quantile(level, n - 1) * sd / math.sqrt(n),
            "level": level}


def improves(trial: dict, current: dict, evidence: dict) -> bool:
    """The rule of the greedy step and of the final check (validation part): the decision
    margin rises with evidence (``evidence["lower"] > 0``, :func:`margin_evidence` of the paired
    changes), and neither accuracy nor class-balanced accuracy falls (``trial`` and ``current``:
    :func:`~act_kernels.search.scoring.metrics` of the same samples)."""
    if trial["acc"] < current["acc"] - EPS or trial["bal_acc"] < current["bal_acc"] - EPS:
        return False
    return evidence["lower"] is not None and evidence["lower"] > 0


def beats(final: dict, base: dict, evidence: dict) -> bool:
    """The final check: does the final set beat the uncalibrated model on the validation part?
    The rule of :func:`improves`, with the evidence of every validation sample."""
    return improves(final, base, evidence)


def step_level(level: float, tried: int) -> float:
    """The greedy step's level per head: ``level`` split over the ``tried`` heads (Bonferroni),
    so that on data where no head helps, the chance that any is kept is at most ``level``."""
    return level / max(1, tried)


def as_heads(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``[(layer, head), ...]`` -> ``{layer: sorted heads}``."""
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(int(layer), []).append(int(head))
    return {l: sorted(h) for l, h in sorted(out.items())}
