"""Scoring engines: the uncalibrated model / a fixed profile, one candidate head per batch row
(fast, layer reuse), and the naive loop (a full forward per candidate per sample)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..tasks import score_last_logits
from .data import Sample, make_batches, pad_batch
from .runner import (LayerRunner, act_mode, one_hot_heads, profile_masks,
                     run_layer_with_probe)


# ---------------------------------------------------------------------------------------------
# Processes: torch.distributed when launched by torchrun, else a single process
# ---------------------------------------------------------------------------------------------

class Dist:
    """Rank / world size and a SUM all-reduce (no-op on one process)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend=backend)
                self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        backend = dist.get_backend()
        work = t.cuda() if backend == "nccl" else t.cpu()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(t.device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


# ---------------------------------------------------------------------------------------------
# Per-sample results
# ---------------------------------------------------------------------------------------------

@dataclass
class Results:
    """Per-sample outcomes over the global sample index: ``correct`` (0/1), ``margin`` (gold
    log-probability margin), ``pred`` (predicted option, -1 = none) as float64 tensors ``[N]``;
    ``ran`` marks the samples actually computed (the others are filled from the baseline)."""

    correct: torch.Tensor
    margin: torch.Tensor
    pred: torch.Tensor
    ran: torch.Tensor

    @classmethod
    def empty(cls, n: int) -> "Results":
        z = lambda: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), z())

    def put(self, index: torch.Tensor, scored: Mapping[str, torch.Tensor]) -> None:
        self.correct[index] = scored["correct"].double().cpu()
        self.margin[index] = scored["gold_logprob_margin"].double().cpu()
        self.pred[index] = scored["pred"].double().cpu()
        self.ran[index] = 1.0

    def reduce(self, dist: Dist) -> "Results":
        stacked = dist.all_reduce(torch.stack([self.correct, self.margin, self.pred, self.ran]))
        return Results(*stacked.unbind(0))

    def fill_from(self, baseline: "Results") -> "Results":
        keep = self.ran > 0
        return Results(torch.where(keep, self.correct, baseline.correct),
                       torch.where(keep, self.margin, baseline.margin),
                       torch.where(keep, self.pred, baseline.pred), self.ran.clone())

    def to_record(self) -> dict:
        return {"correct": "".join("1" if c > 0.5 else "0" for c in self.correct.tolist()),
                "margin": [float(m) for m in self.margin.tolist()],
                "pred": [int(p) for p in self.pred.tolist()],
                "ran": "".join("1" if r > 0.5 else "0" for r in self.ran.tolist())}

    @classmethod
    def from_record(cls, rec: Mapping) -> "Results":
        f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        return cls(f64([c == "1" for c in rec["correct"]]), f64(rec["margin"]),
                   f64(rec["pred"]), f64([r == "1" for r in rec["ran"]]))


def metrics(res: Results, samples: Sequence[Sample]) -> dict:
    """Accuracy, class-balanced accuracy (mean over the (task, gold option) groups of their
    accuracy) and mean gold log-probability margin over ``samples``."""
    if not samples:
        return {"n": 0, "acc": float("nan"), "bal_acc": float("nan"), "margin": float("nan")}
    idx = torch.as_tensor([s.index for s in samples], dtype=torch.long)
    correct = res.correct[idx]
    groups: dict[tuple, list[int]] = {}
    for k, s in enumerate(samples):
        groups.setdefault((s.task, s.gold), []).append(k)
    per_group = [float(correct[torch.as_tensor(v)].mean()) for v in groups.values()]
    return {"n": len(samples), "acc": float(correct.mean()),
            "bal_acc": sum(per_group) / len(per_group), "margin": float(res.margin[idx].mean())}


# ---------------------------------------------------------------------------------------------
# The engines
# ---------------------------------------------------------------------------------------------

class Scorer:
    """Runs samples through ``model`` with ACT attention on every layer (plain where nothing is
    calibrated), batched with left padding, scoring the last position only."""

    def __init__(self, model, tokenizer, *, beta: float = 0.4, tau: float = 0.1,
                 backend: str = "torch", batch_size: int = 8, max_rows: int = 64,
                 dist: Optional[Dist] = None, skip_sinkless: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.runner = LayerRunner(model)
        self.beta, self.tau, self.backend = float(beta), float(tau), backend
        self.batch_size = int(batch_size)
        self.max_rows = int(max_rows)
        self.dist = dist or Dist()
        self.skip_sinkless = skip_sinkless
        self.device = self.runner.device

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    @property
    def num_heads(self) -> int:
        return self.runner.num_heads

    def my_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        return make_batches(samples, self.batch_size)[self.dist.rank::self.dist.world]

    def _items(self, batch):
        return [s.item for s in batch]

    @torch.no_grad()
    def check(self, samples: Sequence[Sample]) -> None:
        """Compare the layer-by-layer forward with the model's own forward on a few samples."""
        batch = make_batches(samples[:2], 2)[0]
        ids, mask = pad_batch(batch, self.tokenizer, self.device)
        with act_mode(self.model, beta=self.beta, tau=self.tau, backend=self.backend):
            self.runner.check(ids, mask)

    @torch.no_grad()
    def plain(self, n_total: int, samples: Sequence[Sample],
              heads: Optional[Mapping[int, Sequence[int]]] = None,
              progress: Optional[Callable[[int], None]] = None) -> Results:
        """Results of the model with the heads ``{layer: [heads]}`` calibrated (none: the
        uncalibrated model), all ranks reduced."""
        res = Results.empty(n_total)
        masks = profile_masks(heads or {}, self.num_heads, self.device)
        with act_mode(self.model, masks, beta=self.beta, tau=self.tau, backend=self.backend):
            for batch in self.my_batches(samples):
                ids, mask = pad_batch(batch, self.tokenizer, self.device)
                logits = self.runner.forward_last(ids, mask)
                index = torch.as_tensor([s.index for s in batch], dtype=torch.long)
                res.put(index, score_last_logits(logits, self._items(batch)))
                if progress:
                    progress(len(batch))
        return res.reduce(self.dist)

    @torch.no_grad()
    def candidates(self, n_total: int, samples: Sequence[Sample], baseline: Results,
                   todo: Mapping[int, Sequence[int]],
                   on_layer: Callable[[int, dict[int, Results]], None],
                   progress: Optional[Callable[[int], None]] = None) -> None:
        """Score every candidate ``(layer, head)`` of ``todo`` alone, layer by layer.

        Hidden states entering each layer are computed once per sample (plain) and reused for
        every candidate of that layer; a batch row is one (sample, head) pair; rows whose head
        has no sink on that sample are not run (calibration leaves them unchanged: they get the
        baseline's outcome). ``on_layer(layer, {head: Results})`` receives each finished layer,
        reduced over ranks and completed from ``baseline``.
        """
        todo = {int(l): list(h) for l, h in todo.items() if h}
        if not todo:
            return
        last = max(todo)
        states = []
        with act_mode(self.model, beta=self.beta, tau=self.tau, backend=self.backend):
            for batch in self.my_batches(samples):
                ids, mask = pad_batch(batch, self.tokenizer, self.device)
                hidden, ctx = self.runner.context(ids, mask)
                index = torch.as_tensor([s.index for s in batch], dtype=torch.long)
                states.append([batch, ctx, hidden, index])
            for layer in range(last + 1):
                heads = todo.get(layer, [])
                results = {h: Results.empty(n_total) for h in heads}
                for st in states:
                    batch, ctx, hidden, index = st
                    if not heads:
                        st[2] = self.runner.run_layers(hidden, ctx, layer, layer + 1)
                        continue
                    out, has_sinks = run_layer_with_probe(self.runner, layer, hidden, ctx,
                                                          beta=self.beta, tau=self.tau,
                                                          backend=self.backend)
                    st[2] = out
                    rows = [(r, h) for r in range(len(batch)) for h in heads
                            if not self.skip_sinkless or bool(has_sinks[r, h])]
                    self._run_rows(layer, rows, batch, ctx, hidden, index, results)
                    if progress:
                        progress(len(batch) * len(heads))
                if heads:
                    done = {h: r.reduce(self.dist).fill_from(baseline) for h, r in results.items()}
                    on_layer(layer, done)

    def _run_rows(self, layer, rows, batch, ctx, hidden, index, results) -> None:
        for start in range(0, len(rows), self.max_rows):
            chunk = rows[start:start + self.max_rows]
            sel = torch.as_tensor([r for r, _ in chunk], dtype=torch.long, device=hidden.device)
            head_of_row = [h for _, h in chunk]
            masks = {layer: one_hot_heads(head_of_row, self.num_heads, self.device)}
            with act_mode(self.model, masks, beta=self.beta, tau=self.tau, backend=self.backend):
                out = self.runner.run_layers(hidden.index_select(0, sel), ctx.take(sel), layer,
                                             self.num_layers)
                logits = self.runner.last_logits(out)
            scored = score_last_logits(logits, [batch[r].item for r, _ in chunk])
            for head in set(head_of_row):
                pick = [k for k, h in enumerate(head_of_row) if h == head]
                sub = {key: val[pick] for key, val in scored.items()}
                results[head].put(index[sel[pick].cpu()], sub)


@torch.no_grad()
def naive_candidates(model, tokenizer, n_total: int, samples: Sequence[Sample],
                     todo: Mapping[int, Sequence[int]], *, beta: float = 0.4, tau: float = 0.1,
                     backend: str = "torch") -> dict[tuple[int, int], Results]:
    """The naive search: for every candidate and every sample, one full forward of the model
    (batch of one, all logits), with that single head calibrated."""
    device = next(model.parameters()).device
    num_heads = LayerRunner(model).num_heads
    out = {}
    for layer, heads in sorted(todo.items()):
        for head in heads:
            res = Results.empty(n_total)
            mask = one_hot_heads([head], num_heads, device)[0]
            with act_mode(model, {layer: mask}, beta=beta, tau=tau, backend=backend):
                for s in samples:
                    ids = torch.as_tensor([s.ids], dtype=torch.long, device=device)
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                    res.put(torch.as_tensor([s.index]), score_last_logits(logits[:, -1], [s.item]))
            out[(layer, head)] = res
    return out
