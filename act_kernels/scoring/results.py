"""Per-sample outcomes (:class:`Results`), their metrics, and the paired bootstrap interval."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..runtime import Dist
from ..tasks import balanced_accuracy
from .samples import Sample


@dataclass
class Results:
    """Per-sample outcomes over the global sample index: ``correct`` (0/1), ``margin`` (gold
    log-probability margin), ``pred`` (predicted option, -1 = none), ``decision`` (the margin
    whose sign is ``correct``, see :func:`~act_kernels.tasks.score_last_logits`) as float64
    tensors ``[N]``; ``ran`` marks the samples actually computed (the others are filled from
    the baseline)."""

    correct: torch.Tensor
    margin: torch.Tensor
    pred: torch.Tensor
    ran: torch.Tensor
    decision: torch.Tensor

    FIELDS = ("correct", "margin", "pred", "ran", "decision")

    @classmethod
    def empty(cls, n: int) -> "Results":
        return cls(*(torch.zeros(n, dtype=torch.float64) for _ in cls.FIELDS))

    def put(self, index: torch.Tensor, scored: Mapping[str, torch.Tensor]) -> None:
        self.correct[index] = scored["correct"].double().cpu()
        self.margin[index] = scored["gold_logprob_margin"].double().cpu()
        self.pred[index] = scored["pred"].double().cpu()
        self.decision[index] = scored["decision_margin"].double().cpu()
        self.ran[index] = 1.0

    def reduce(self, dist: Dist) -> "Results":
        stacked = dist.all_reduce(torch.stack([getattr(self, f) for f in self.FIELDS]))
        return Results(*stacked.unbind(0))

    def fill_from(self, baseline: "Results") -> "Results":
        keep = self.ran > 0
        return Results(*(self.ran.clone() if f == "ran" else
                         torch.where(keep, getattr(self, f), getattr(baseline, f))
                         for f in self.FIELDS))

    def to_record(self) -> dict:
        return {"correct": "".join("1" if c > 0.5 else "0" for c in self.correct.tolist()),
                "margin": [float(m) for m in self.margin.tolist()],
                "pred": [int(p) for p in self.pred.tolist()],
                "ran": "".join("1" if r > 0.5 else "0" for r in self.ran.tolist()),
                "decision": [float(m) for m in self.decision.tolist()]}

    @classmethod
    def from_record(cls, rec: Mapping) -> "Results":
        f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        # records written before the decision margin existed: the margin stands in for it
        return cls(f64([c == "1" for c in rec["correct"]]), f64(rec["margin"]),
                   f64(rec["pred"]), f64([r == "1" for r in rec["ran"]]),
                   f64(rec.get("decision", rec["margin"])))


def metrics(res: Results, samples: Sequence[Sample]) -> dict:
    """Accuracy, class-balanced accuracy (mean over the (task, gold option) groups of their
    accuracy) and mean gold log-probability margin over ``samples``."""
    if not samples:
        return {"n": 0, "acc": float("nan"), "bal_acc": float("nan"), "margin": float("nan")}
    idx = torch.as_tensor([s.index for s in samples], dtype=torch.long)
    correct = res.correct[idx]
    groups: dict[tuple, int] = {}
    group = [groups.setdefault((s.task, s.gold), len(groups)) for s in samples]
    return {"n": len(samples), "acc": float(correct.mean()),
            "bal_acc": balanced_accuracy(correct, group), "margin": float(res.margin[idx].mean())}


def paired_bootstrap(diffs: Sequence[torch.Tensor], reps: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean over groups of ``mean(diff)``, each group's paired differences
    resampled independently (``reps`` resamples; NaNs when ``reps`` is 0 or no group)."""
    if reps <= 0 or not diffs:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(reps, dtype=torch.float64)
    for diff in diffs:
        diff = diff.double()
        idx = torch.randint(len(diff), (reps, len(diff)), generator=gen)
        total += diff[idx].mean(-1)
    total /= len(diffs)
    lo, hi = torch.quantile(total, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi
