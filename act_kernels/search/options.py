"""The search's log-likelihood objective (``--objective loglik``): each sample's options as rows
of their own.

Under option log-likelihood scoring (:data:`act_kernels.scoring.PROTOCOLS`) a sample is one
sequence per option, ``context + continuation``, and its outcome is decided by the options'
summed continuation log-probabilities. The candidate engine and the screen run on *option rows*
(:class:`OptionRows`: one :class:`~act_kernels.scoring.Sample` per option, whose item is an
:class:`OptionItem`), score each row by :func:`option_sums` (the logits of the row's last
``len(continuation) + 1`` positions), and put the rows of a sample back together with
:func:`~act_kernels.scoring.score_options` (:meth:`OptionRows.scored`): the decision margin is
then the gold option's (normalised) log-likelihood minus the best other option's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..scoring import Results, Sample, score_options
from ..tasks import continuation_logprobs


@dataclass(frozen=True)
class OptionItem:
    """The score item of an option row: the continuation's tokens (the row's last ones)."""

    cont: tuple[int, ...]

    @property
    def keep(self) -> int:
        """Positions of logits the row's score needs (the last one before the continuation on)."""
        return len(self.cont) + 1


def keep_of(item) -> int:
    """Positions of logits an item's score needs: 1 for the next-token protocol."""
    return item.keep if isinstance(item, OptionItem) else 1


def option_sums(tail_logits, hidden: torch.Tensor, items: Sequence[OptionItem]) -> torch.Tensor:
    """``[n]`` summed continuation log-probabilities of right-aligned option rows ``hidden
    [n, T, H]`` (``tail_logits(hidden, keep)``: the logits of the last ``keep`` positions),
    differentiable."""
    keep = max(it.keep for it in items)
    logits = tail_logits(hidden, keep)
    tail = torch.zeros(len(items), keep, dtype=torch.long, device=logits.device)
    for r, it in enumerate(items):
        tail[r, keep - len(it.cont):] = torch.as_tensor(it.cont, dtype=torch.long)
    n_cont = torch.as_tensor([len(it.cont) for it in items], dtype=torch.long)
    return continuation_logprobs(logits, tail, n_cont)[0]


def sums_scored(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """An option row's outcome for :meth:`~act_kernels.scoring.Results.put`: its summed
    continuation log-probability in ``margin`` and ``decision`` (no answer of its own)."""
    zero = torch.zeros_like(sums)
    return {"correct": zero, "pred": zero, "gold_logprob_margin": sums, "decision_margin": sums}


class OptionRows:
    """The options of ``samples`` as rows (numbered from 0), and the way back to the samples."""

    def __init__(self, samples: Sequence[Sample]):
        if any(not s.options for s in samples):
            raise ValueError("the log-likelihood objective needs samples encoded with "
                             "loglik=True")
        self.samples = list(samples)
        self.rows: list[Sample] = []
        self.where: list[tuple[int, int]] = []          # row -> (sample position, option)
        for i, s in enumerate(self.samples):
            for j, (ids, n_cont, _) in enumerate(s.options):
                self.rows.append(Sample(len(self.rows), s.task, f"{s.id}#{j}", tuple(ids),
                                        OptionItem(tuple(ids[len(ids) - n_cont:]))))
                self.where.append((i, j))
        self.k = max((len(s.options) for s in self.samples), default=1)
        self.tokens = torch.ones(len(self.samples), self.k)
        self.chars = torch.ones(len(self.samples), self.k)
        for i, s in enumerate(self.samples):
            for j, (_, n_cont, n_chars) in enumerate(s.options):
                self.tokens[i, j], self.chars[i, j] = float(n_cont), float(n_chars)
        self._rows_of = {}
        for r, (i, _) in enumerate(self.where):
            self._rows_of.setdefault(self.samples[i].index, []).append(r)

    @property
    def n(self) -> int:
        return len(self.rows)

    def rows_of(self, indices) -> set[int]:
        """The rows of the samples of global indices ``indices``."""
        return {r for i in indices for r in self._rows_of.get(i, ())}

    def table(self, sums: torch.Tensor) -> torch.Tensor:
        """Row values ``[n_rows]`` -> ``[len(samples), K]`` (``-inf`` where a sample has fewer
        options); differentiable."""
        out = sums.new_full((len(self.samples), self.k), -math.inf)
        i = torch.as_tensor([w[0] for w in self.where], dtype=torch.long, device=sums.device)
        j = torch.as_tensor([w[1] for w in self.where], dtype=torch.long, device=sums.device)
        return out.index_put((i, j), sums)

    def scored(self, sums: torch.Tensor, objective: str) -> dict[str, torch.Tensor]:
        """The samples' scores under the log-likelihood protocol ``objective`` from their option
        rows' sums ``[n_rows]``."""
        return score_options(self.table(sums), self.tokens.to(sums.device),
                             self.chars.to(sums.device), [s.gold for s in self.samples],
                             objective)

    def to_samples(self, rows: Results, n_total: int, objective: str) -> Results:
        """Per-sample :class:`Results` (over ``n_total`` global indices) of option-row results
        (sums in ``margin``); a sample ran if any of its rows did."""
        out = Results.empty(n_total)
        if not self.samples:
            return out
        index = torch.as_tensor([s.index for s in self.samples], dtype=torch.long)
        out.put(index, self.scored(rows.margin.float(), objective))
        ran = self.table(rows.ran.float()).clamp(min=0).amax(-1)
        out.ran[index] = ran.double()
        return out
