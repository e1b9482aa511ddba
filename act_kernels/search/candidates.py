"""The search's candidate engine: one candidate head per batch row, hidden states entering a
layer reused by every candidate of that layer (:class:`Scorer`), and the naive loop it is
checked against (a full forward per candidate per sample, :func:`naive_candidates`).

The plain passes (the uncalibrated model, a fixed set of heads) are the shared
:class:`~act_kernels.scoring.PlainScorer`'s, run here through the layer-by-layer forward."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Container, Mapping, Optional, Sequence

import torch

from ..hf import head_override
from ..params import DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_BETA, DEFAULT_TAU
from ..runtime import Dist
from ..scoring import (NEXT_TOKEN, PlainScorer, Results, Sample, check_protocol, make_batches,
                       pad_batch)
from ..tasks import score_last_logits
from .layerwise import (Context, KVRecorder, LayerRunner, RowPrefixKV, one_hot_heads,
                        pack_suffixes, run_layer_with_probe)
from .options import OptionItem, OptionRows, keep_of, option_sums, sums_scored


class Scorer(PlainScorer):
    """The plain scorer run layer by layer (:class:`~.layerwise.LayerRunner`), plus the
    candidate passes (:meth:`candidates`) that reuse its hidden states. ``batch_tokens``: rows
    x positions per forward through the layers after a candidate's. ``objective``: the scoring
    protocol the search works on (:data:`~act_kernels.scoring.PROTOCOLS`): the next-token
    protocol, or option log-likelihood, whose candidates run on option rows
    (:mod:`.options`)."""

    def __init__(self, model, tokenizer, *, beta: float = DEFAULT_BETA,
                 tau: float = DEFAULT_TAU, backend: str = DEFAULT_BACKEND,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_rows: int = 64,
                 batch_tokens: int = 4096, dist: Optional[Dist] = None,
                 skip_sinkless: bool = True, reuse_prefix: bool = True,
                 objective: str = NEXT_TOKEN):
        self.runner = LayerRunner(model)
        self.objective = check_protocol(objective)
        self._plain_options: dict[int, torch.Tensor] = {}   # sample index -> plain option sums
        super().__init__(model, tokenizer, beta=beta, tau=tau, backend=backend,
                         batch_size=batch_size, dist=dist)
        self.max_rows = int(max_rows)
        self.batch_tokens = int(batch_tokens)
        self.skip_sinkless = skip_sinkless
        self.reuse_prefix = reuse_prefix
        self.device = self.runner.device

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    def last_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next-token protocol's forward, layer by layer (what the candidates reuse)."""
        return self.runner.forward_last(ids, mask)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """The log-likelihood protocols' forward, layer by layer too (what the candidates'
        option rows are compared with)."""
        hidden, ctx = self.runner.context(ids, mask)
        return self.runner.tail_logits(self.runner.run_layers(hidden, ctx, 0, self.num_layers),
                                       keep)

    def plain(self, n_total: int, samples: Sequence[Sample], heads=None, progress=None,
              protocol: Optional[str] = None) -> Results:
        """:meth:`PlainScorer.plain` under the search's objective unless told otherwise."""
        return super().plain(n_total, samples, heads, progress, protocol or self.objective)

    def my_groups(self, samples: Sequence[Sample]) -> list[list[list[Sample]]]:
        """Consecutive batches grouped until a group holds ``2 * batch_size`` samples; this
        process's share. The candidate pass batches rows across the batches of a group only,
        so every group computes the same numbers whatever the number of processes."""
        groups: list[list[list[Sample]]] = []
        size = 0
        for batch in make_batches(samples, self.batch_size):
            if not groups or size >= 2 * self.batch_size:
                groups.append([])
                size = 0
            groups[-1].append(batch)
            size += len(batch)
        return groups[self.dist.rank::self.dist.world]

    @torch.no_grad()
    def check(self, samples: Sequence[Sample]) -> None:
        """Compare the layer-by-layer forward with the model's own forward on a few samples."""
        batch = make_batches(samples[:2], 2)[0]
        ids, mask = pad_batch(batch, self.tokenizer, self.device)
        with self.override():
            self.runner.check(ids, mask)
            if self.reuse_prefix:
                err = self.runner.check_suffix(ids, mask, ids.shape[1] // 2)
                if not err <= 1e-3:
                    warnings.warn(f"act search: a suffix pass with cached prefix keys/values "
                                  f"differs from a full pass by {err:.3g} on "
                                  f"{type(self.model).__name__}; prefix reuse is turned off (the "
                                  "search is exact but slower)", RuntimeWarning, stacklevel=2)
                    self.reuse_prefix = False

    @torch.no_grad()
    def candidates(self, n_total: int, samples: Sequence[Sample], baseline: Results,
                   todo: Mapping[int, Sequence[int]],
                   on_layer: Callable[[int, dict[int, Results]], None],
                   progress: Optional[Callable[[int], None]] = None,
                   only: Optional[Mapping[tuple[int, int], Container[int]]] = None) -> None:
        """Score every candidate ``(layer, head)`` of ``todo`` alone, layer by layer, under the
        search's objective (see :meth:`_candidate_rows`; the log-likelihood objective runs the
        samples' option rows and puts each sample's rows back together)."""
        if self.objective == NEXT_TOKEN:
            return self._candidate_rows(n_total, samples, baseline, todo, on_layer, progress,
                                        only)
        view = OptionRows(samples)
        todo = {int(l): list(h) for l, h in todo.items() if h}
        rows_only = (None if only is None else
                     {key: view.rows_of(only[key]) for l, hs in todo.items()
                      for key in ((l, h) for h in hs)})

        def per_sample(layer: int, results: dict[int, Results]) -> None:
            on_layer(layer, {h: view.to_samples(r, n_total, self.objective).fill_from(baseline)
                             for h, r in results.items()})
            if progress:
                progress(len(samples) * len(results))

        self._candidate_rows(view.n, view.rows, self._plain_rows(view), todo, per_sample, None,
                             rows_only)

    def _plain_rows(self, view: OptionRows) -> Results:
        """The uncalibrated model's option-row results (sums in ``margin``), each sample's
        options computed once per scorer."""
        todo = [s for s in view.samples if s.index not in self._plain_options]
        with self.override():
            for batch in make_batches(todo, self.batch_size):
                sums = self._option_logprobs(batch)[0]
                for i, s in enumerate(batch):
                    self._plain_options[s.index] = sums[i, :len(s.options)]
        out = Results.empty(view.n)
        sums = torch.stack([self._plain_options[view.samples[i].index][j]
                            for i, j in view.where]) if view.n else torch.zeros(0)
        out.put(torch.arange(view.n), sums_scored(sums))
        return out

    def _candidate_rows(self, n_total: int, samples: Sequence[Sample], baseline: Results,
                        todo: Mapping[int, Sequence[int]],
                        on_layer: Callable[[int, dict[int, Results]], None],
                        progress: Optional[Callable[[int], None]] = None,
                        only: Optional[Mapping[tuple[int, int], Container[int]]] = None
                        ) -> None:
        """Score every candidate ``(layer, head)`` of ``todo`` alone on rows ``samples`` (the
        samples, or the option rows of the log-likelihood objective), layer by layer.

        * Hidden states entering each layer are computed once per sample (plain) and reused
          for every candidate of that layer; a batch row is one (sample, head) pair.
        * Rows whose head has no sink on that sample are not run: calibration leaves them
          unchanged, so they get the baseline's outcome.
        * With ``reuse_prefix``, the positions before a row's first sink are not recomputed
          after the candidate's layer either (they are unchanged: no query before the first
          sink sees a sink), so the later layers run on the suffix only, with the prefix's keys
          and values recorded from one plain pass. Suffixes of similar length, from every
          batch of a group (:meth:`my_groups`), share a forward (:meth:`_run_suffixes`).

        * ``only`` (optional): ``{(layer, head): global sample indices}``; a candidate runs on
          those samples only and keeps the baseline's outcome on the others. The plain pass that
          records the prefix keys/values then also probes the sinks and keeps the hidden states
          entering each candidate layer for those samples only, so no second plain pass runs
          (:meth:`_plain_pass`).

        ``on_layer(layer, {head: Results})`` receives each finished layer, reduced over ranks
        and completed from ``baseline``.
        """
        todo = {int(l): list(h) for l, h in todo.items() if h}
        if not todo:
            return
        last = max(todo)
        one_pass = only is not None and self.reuse_prefix
        groups: list[list[_State]] = []
        with self.override():
            for batches in self.my_groups(samples):
                groups.append([])
                for batch in batches:
                    groups[-1].append(self._plain_pass(batch, todo, only if one_pass else None))
            for layer in range(last + 1):
                heads = todo.get(layer, [])
                results = {h: Results.empty(n_total) for h in heads}
                for states in groups:
                    rows: list[_Row] = []
                    for st in states:
                        st.kv.pop(layer, None)            # later layers never need it again
                        if one_pass:
                            batch_rows, hidden, first_sink = st.entering.pop(
                                layer, ([], None, None))
                        elif heads:
                            batch_rows, hidden = list(range(len(st.batch))), st.hidden
                            st.hidden, first_sink = run_layer_with_probe(
                                self.runner, layer, hidden, st.ctx)
                        else:
                            st.hidden = self.runner.run_layers(st.hidden, st.ctx, layer,
                                                               layer + 1)
                            continue
                        total = st.ctx.key_mask.shape[1]
                        first = [] if first_sink is None else first_sink.tolist()
                        mine = [_Row(st, r, h, min(first[k][h], total - keep_of(
                                     st.batch[r].item)) if self.reuse_prefix else 0)
                                for k, r in enumerate(batch_rows) for h in heads
                                if (not self.skip_sinkless or first[k][h] < total)
                                and (only is None or st.batch[r].index in only[(layer, h)])]
                        self._run_candidate_layer(layer, st, mine, hidden, batch_rows)
                        rows += mine
                        if progress and len(st.batch) * len(heads) > len(mine):
                            progress(len(st.batch) * len(heads) - len(mine))
                    if rows:
                        self._run_suffixes(layer, rows, results, progress)
                if heads:
                    done = {h: r.reduce(self.dist).fill_from(baseline) for h, r in results.items()}
                    on_layer(layer, done)

    def _plain_pass(self, batch, todo: Mapping[int, Sequence[int]],
                    only: Optional[Mapping[tuple[int, int], Container[int]]]) -> "_State":
        """One batch's plain pass before the candidates run: with ``reuse_prefix`` it records
        every layer's keys/values (the suffix passes read their prefixes from them). With
        ``only`` it also probes, at each candidate layer, the sinks of the batch rows some
        candidate of that layer must run, and keeps those rows' hidden states entering the layer
        (``_State.entering``): the candidates then need no second plain pass."""
        ids, mask = pad_batch(batch, self.tokenizer, self.device)
        hidden, ctx = self.runner.context(ids, mask)
        index = torch.as_tensor([s.index for s in batch], dtype=torch.long)
        st = _State(batch, ctx, hidden, index, {})
        if not self.reuse_prefix:
            return st
        recorder = KVRecorder()
        if only is None:
            self.runner.run_layers(hidden, ctx, 0, self.num_layers, recorder)
        else:
            for layer in range(self.num_layers):
                rows = [r for r, s in enumerate(batch)
                        if any(s.index in only[(layer, h)] for h in todo.get(layer, []))]
                if not rows:
                    hidden = self.runner.run_layers(hidden, ctx, layer, layer + 1, recorder)
                    continue
                sel = torch.as_tensor(rows, dtype=torch.long, device=hidden.device)
                out, first_sink = run_layer_with_probe(self.runner, layer, hidden, ctx, recorder)
                st.entering[layer] = (rows, hidden.index_select(0, sel),
                                      first_sink.index_select(0, sel))
                hidden = out
        keep_from = min(todo) + 1
        st.kv = {l: t for l, t in recorder.kv.items() if l >= keep_from}
        return st

    def _run_candidate_layer(self, layer: int, st: "_State", rows: list["_Row"],
                             hidden: Optional[torch.Tensor], batch_rows: Sequence[int]) -> None:
        """The candidate's own layer over every position of its sample (its sinks come from
        all rows), by chunks of ``max_rows``; keeps each row's positions from its start on.
        ``hidden [len(batch_rows), T, H]``: the states entering the layer of batch rows
        ``batch_rows``."""
        at = {r: k for k, r in enumerate(batch_rows)}
        for lo in range(0, len(rows), self.max_rows):
            chunk = rows[lo:lo + self.max_rows]
            sel = torch.as_tensor([r.row for r in chunk], dtype=torch.long,
                                  device=hidden.device)
            local = torch.as_tensor([at[r.row] for r in chunk], dtype=torch.long,
                                    device=hidden.device)
            masks = {layer: one_hot_heads([r.head for r in chunk], self.num_heads, self.device)}
            with self.override(masks):
                out = self.runner.run_layers(hidden.index_select(0, local), st.ctx.take(sel),
                                             layer, layer + 1)
            for k, r in enumerate(chunk):
                r.suffix = out[k, r.start:]

    def _run_suffixes(self, layer: int, rows: list["_Row"], results: dict,
                      progress: Optional[Callable[[int], None]]) -> None:
        """Layers ``layer + 1 ..`` for every row's suffix, rows of similar suffix length (from
        any batch) sharing a forward: suffixes left-padded to the longest, prefixes (cached
        keys/values) before them, each row packed as a left-padded sequence
        (:func:`~.layerwise.pack_suffixes`), a causal (windowed where the layer has a window) +
        key-padding mask over both."""
        rows = sorted(rows, key=lambda r: (-r.suffix.shape[0], r.st.index[r.row].item(), r.head))
        lengths = [r.suffix.shape[0] for r in rows]
        for lo, hi in partition_rows(lengths, self.batch_tokens, CALL_COST_TOKENS):
            chunk = rows[lo:hi]
            width_q = lengths[lo]
            width_p = max(r.start for r in chunk)
            first = chunk[0]
            hidden = first.suffix.new_zeros(len(chunk), width_q, first.suffix.shape[-1])
            for k, r in enumerate(chunk):
                hidden[k, width_q - r.suffix.shape[0]:] = r.suffix
            if layer + 1 < self.num_layers:
                ctx = pack_suffixes([(r.st.ctx, r.row, r.start) for r in chunk], width_q)
                cache = RowPrefixKV([(r.st.kv, r.row, r.start) for r in chunk], width_p,
                                    [r.suffix.shape[0] for r in chunk])
                with self.override():
                    hidden = self.runner.run_layers(hidden, ctx, layer + 1, self.num_layers,
                                                    cache)
            scored = self._score_rows(hidden, [r.st.batch[r.row].item for r in chunk])
            heads = [r.head for r in chunk]
            for head in set(heads):
                pick = [k for k, h in enumerate(heads) if h == head]
                part = {key: val[pick] for key, val in scored.items()}
                results[head].put(torch.stack([chunk[k].st.index[chunk[k].row] for k in pick]),
                                  part)
            for r in chunk:
                r.suffix = None
            if progress:
                progress(len(chunk))


    def _score_rows(self, hidden: torch.Tensor, items) -> dict[str, torch.Tensor]:
        """Scores of right-aligned rows ``hidden [n, T, H]``: the next-token protocol's, or an
        option row's continuation sum (:func:`~.options.option_sums`)."""
        if items and isinstance(items[0], OptionItem):
            return sums_scored(option_sums(self.runner.tail_logits, hidden, items))
        return score_last_logits(self.runner.last_logits(hidden), items)


# One decoder-layer call costs about as much as this many extra tokens on top of its tokens
# (reading the weights, Python and kernel launches: measured ~2.5 ms against ~55 us a token
# for SmolLM2 on 2 CPU cores); it decides how rows of different suffix lengths are grouped.
CALL_COST_TOKENS = 48


def partition_rows(lengths: Sequence[int], batch_tokens: int, call_cost: float
                   ) -> list[tuple[int, int]]:
    """Cut rows sorted by decreasing length into contiguous chunks ``[lo, hi)`` minimising
    ``sum(call_cost + rows * longest)`` (each chunk is padded to its first row's length) with
    ``rows * longest <= batch_tokens`` (a single row may exceed it). Exact dynamic program."""
    n = len(lengths)
    if n == 0:
        return []
    q = torch.as_tensor(lengths, dtype=torch.float64)
    best = torch.full((n + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    cut = [0] * (n + 1)
    for hi in range(1, n + 1):
        # a chunk [lo, hi) costs call_cost + (hi - lo) * q[lo]
        lo = torch.arange(hi, dtype=torch.long)
        size = (hi - lo).double()
        cost = best[:hi] + call_cost + size * q[:hi]
        cost = torch.where((size * q[:hi] <= batch_tokens) | (size == 1), cost,
                           torch.full_like(cost, float("inf")))
        k = int(torch.argmin(cost))
        best[hi], cut[hi] = cost[k], k
    out, hi = [], n
    while hi > 0:
        out.append((cut[hi], hi))
        hi = cut[hi]
    return out[::-1]


@dataclass
class _State:
    """One batch of samples during the candidate pass."""

    batch: list
    ctx: Context
    hidden: torch.Tensor          # entering the current layer, [B, T, H]
    index: torch.Tensor           # global sample index of each row
    kv: dict                      # layer -> recorded plain (key, value), later layers only
    # layer -> (batch rows, their hidden entering it, their first sinks there), from the plain
    # pass when only some samples run (``only``)
    entering: dict = field(default_factory=dict)


@dataclass(eq=False)
class _Row:
    """One (sample, head) candidate run: batch row ``row`` of ``st``, recomputed from
    position ``start`` on after the candidate's layer."""

    st: _State
    row: int
    head: int
    start: int
    suffix: Optional[torch.Tensor] = None   # hidden after the candidate's layer, [T - start, H]


@torch.no_grad()
def naive_candidates(model, tokenizer, n_total: int, samples: Sequence[Sample],
                     todo: Mapping[int, Sequence[int]], *, beta: float = DEFAULT_BETA,
                     tau: float = DEFAULT_TAU,
                     backend: str = DEFAULT_BACKEND) -> dict[tuple[int, int], Results]:
    """The naive search: for every candidate and every sample, one full forward of the model
    (batch of one, all logits), with that single head calibrated."""
    device = next(model.parameters()).device
    num_heads = LayerRunner(model).num_heads
    out = {}
    for layer, heads in sorted(todo.items()):
        for head in heads:
            res = Results.empty(n_total)
            mask = one_hot_heads([head], num_heads, device)[0]
            with head_override(model, {layer: mask}, beta=beta, tau=tau, backend=backend):
                for s in samples:
                    ids = torch.as_tensor([s.ids], dtype=torch.long, device=device)
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                    res.put(torch.as_tensor([s.index]), score_last_logits(logits[:, -1], [s.item]))
            out[(layer, head)] = res
    return out
