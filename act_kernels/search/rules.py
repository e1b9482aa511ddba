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


SIGN_FLIP_EXACT = 14
"""Up to this many samples the sign-flip distribution is enumerated exactly (2^n patterns)."""
SIGN_FLIP_DRAWS = 20000
"""Otherwise at least this many seeded random sign patterns (and 100 / level, so that the tail
beyond the critical value holds about 100 of them)."""


def _sign_flip_means(diff: torch.Tensor, level: float):
    """The means of ``diff`` under every sign pattern (``n <= SIGN_FLIP_EXACT``) or under
    seeded random ones; yields them by chunks (bounded memory). Returns (chunks, exact)."""
    n = diff.numel()
    if n <= SIGN_FLIP_EXACT:
        bits = torch.arange(2 ** n, dtype=torch.long)[:, None] >> torch.arange(n)
        return [((bits & 1) * 2 - 1).double() @ diff / n], True
    draws = max(SIGN_FLIP_DRAWS, int(math.ceil(100 / level)))
    gen = torch.Generator().manual_seed(0)
    chunks, chunk = [], max(1, (1 << 22) // n)
    for lo in range(0, draws, chunk):
        signs = torch.randint(0, 2, (min(chunk, draws - lo), n), generator=gen) * 2 - 1
        chunks.append(signs.double() @ diff / n)
    return chunks, False


def margin_evidence(diff: torch.Tensor, level: float) -> dict:
    """The evidence that calibration raises the decision margin: ``diff`` holds the paired
    per-sample changes (calibrated minus before, on the same samples).

    One-sided sign-flip (randomisation) test of their mean: if calibration did nothing
    systematic, each change would be as likely negative as positive, so the observed mean is
    compared with the means under random signs (every pattern up to
    :data:`SIGN_FLIP_EXACT` samples, else seeded draws). Exact at any sample size, with no
    normality assumed: a few samples cannot give evidence (six changes of one sign happen by
    chance one time in 64). Returns ``n``, ``mean``, ``p`` (the share of sign patterns whose
    mean reaches the observed one) and ``lower`` = mean minus the ``1 - level`` quantile of the
    sign-flip means, the one-sided lower bound: above zero exactly when the test rejects "no
    effect" at ``level`` (``None`` with no sample)."""
    diff = diff.double().flatten()
    n = int(diff.numel())
    if n == 0:
        return {"n": 0, "mean": 0.0, "lower": None, "p": 1.0, "level": level}
    mean = float(diff.mean())
    chunks, exact = _sign_flip_means(diff, level)
    means = torch.cat(chunks)
    reach = int((means >= mean - 1e-12 * max(1.0, abs(mean))).sum())
    p = reach / len(means) if exact else (reach + 1) / (len(means) + 1)
    critical = float(torch.quantile(means, 1 - level, interpolation="higher"))
    return {"n": n, "mean": mean, "lower": mean - critical, "p": p, "level": level}


def improves(trial: dict, current: dict, evidence: dict) -> bool:
    """The rule of the greedy step and of the final check (validation part): the decision
    margin rises with evidence (``evidence["lower"] > 0``: :func:`margin_evidence`'s one-sided
    sign-flip test of the paired changes rejects "no effect"), and neither accuracy nor
    class-balanced accuracy falls (``trial`` and ``current``:
    :func:`~act_kernels.scoring.metrics` of the same samples)."""
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
