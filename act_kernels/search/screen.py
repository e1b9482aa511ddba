"""First-order screen of every candidate head from one forward and one backward per sample.

Calibrating head ``h`` of layer ``l`` changes only that head's attention output at that layer,
by ``delta_o[l, h, i] = o_act - o_plain`` at each position ``i``. To first order the change of
the objective ``f`` is ``sum_i <df / do[l, h, i], delta_o[l, h, i]>``. The objective is one of:

* ``"decision"`` (default): the margin whose sign is the sample's correctness
  (:func:`~act_kernels.tasks.score_last_logits`'s ``decision_margin``: the gold label's
  log-probability margin for classification, the gold letter's best logit over every other
  token for greedy multiple choice), so the estimate also predicts which answers flip;
* ``"margin"``: the gold option's log-probability margin over the other options;
* ``"logprob"``: the gold option's log-probability.

Under the log-likelihood objective of the search (``--objective loglik``, the scorer's
``objective``) the same three are taken over the options' (normalised) summed continuation
log-probabilities: the decision margin is the gold option's minus the best other option's. The
forward then runs every option row of the batch's samples (:mod:`.options`), and a sample's
estimate is the sum over its rows.

:meth:`FirstOrderScreen.estimate` makes one plain differentiable forward (Transformers' SDPA,
wrapped so that each screened layer's query/key/value are kept) and one backward, for ``df/do``
of every layer and head at once (the input of each layer's ``o_proj`` is its heads' attention
outputs side by side); then, without gradients, two op calls per screened layer on the kept
query/key/value (every head calibrated, nothing calibrated) give every head's ``delta_o``.
A sample costs about three forwards whatever the number of candidates.

:func:`screen_candidates` averages the estimates over the scoring part and keeps each sample's
estimate and plain objective value, for :func:`screen_order` (predicted answers gained first)
and :func:`near_boundary` (which samples an exact check must run).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..runtime import progress
from ..scoring import NEXT_TOKEN, Results, Sample, pad_batch
from ..tasks import score_last_logits
from .options import OptionRows, option_sums

OBJECTIVES = ("decision", "margin", "logprob")
SCREEN_CHUNK = 64    # scoring samples per checkpoint record (fixed: results do not depend on it)
SCREEN_ATTENTION = "act_screen"   # SDPA that keeps the query/key/value of the screened layers
_KEEP = "_act_screen_inputs"      # attention module attribute holding the dict they go into


def objective_values(logits: torch.Tensor, items, objective: str = "decision") -> torch.Tensor:
    """Per row: the decision margin, the gold option's margin, or its log-probability (see the
    module doc), differentiable in ``logits [B, V]``. Rows are scored one by one so no row
    carries another's padded (-inf) options into the gradient."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown screen objective {objective!r}; choose one of {OBJECTIVES}")
    values = []
    for r, item in enumerate(items):
        scored = score_last_logits(logits[r:r + 1], [item])
        if objective == "decision":
            values.append(scored["decision_margin"][0])
        elif objective == "margin":
            values.append(scored["gold_logprob_margin"][0])
        else:
            values.append(scored["option_logprobs"][0, item.gold])
    return torch.stack(values)


def option_objective(scored: dict, gold: Sequence[int], objective: str = "decision"
                     ) -> torch.Tensor:
    """Per sample, the screen objective of log-likelihood scores
    (:func:`~act_kernels.scoring.score_options`' output): the decision margin (= the gold
    option's margin over the best other) or the gold option's score."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown screen objective {objective!r}; choose one of {OBJECTIVES}")
    if objective == "logprob":
        idx = torch.as_tensor(gold, dtype=torch.long, device=scored["option_scores"].device)
        return scored["option_scores"].gather(1, idx[:, None])[:, 0]
    return scored["decision_margin"]


def _screen_attention(module, query, key, value, attention_mask, **kwargs):
    """Transformers' SDPA attention; also keeps the inputs when the module asks for them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    keep = module.__dict__.get(_KEEP)
    if keep is not None:
        keep[module.layer_idx] = (query.detach(), key.detach(), value.detach(),
                                  kwargs.get("scaling"), kwargs.get("sliding_window"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_screen_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SCREEN_ATTENTION, _screen_attention)
    AttentionMaskInterface.register(SCREEN_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _attention(config, name: str):
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


class FirstOrderScreen:
    """The first-order estimate of every candidate's objective change (see the module doc);
    uses a :class:`~act_kernels.search.candidates.Scorer`'s model, runner and settings."""

    def __init__(self, scorer, objective: str = "decision"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown screen objective {objective!r}; choose one of "
                             f"{OBJECTIVES}")
        self.scorer = scorer
        self.runner = scorer.runner
        self.objective = objective
        for idx, layer in enumerate(self.runner.layers):
            if not hasattr(getattr(layer, "self_attn", None), "o_proj"):
                raise ValueError(f"act search --strategy screen: layer {idx} of "
                                 f"{type(scorer.model).__name__} has no self_attn.o_proj; use "
                                 "--strategy exhaustive")
        _register_screen_attention()

    @contextlib.contextmanager
    def _kept(self, layers: Sequence[int]):
        """Within the block, ``(outputs, inputs)``: ``{layer: input of its o_proj [B, T, Hq*D]}``
        (the attention output, in the graph) and ``{layer: (q, k, v, scaling, window)}``
        (detached) of every forward of the screened layers."""
        outputs: dict[int, torch.Tensor] = {}
        inputs: dict[int, tuple] = {}

        def keep(layer):
            def hook(module, args):
                outputs[layer] = args[0]
            return hook

        attns = [self.runner.layers[l].self_attn for l in layers]
        handles = [a.o_proj.register_forward_pre_hook(keep(l)) for l, a in zip(layers, attns)]
        for a in attns:
            a.__dict__[_KEEP] = inputs
        try:
            with _attention(self.runner.config, SCREEN_ATTENTION):
                yield outputs, inputs
        finally:
            for h in handles:
                h.remove()
            for a in attns:
                a.__dict__.pop(_KEEP, None)

    @torch.no_grad()
    def _delta(self, q, k, v, scaling, window, key_mask) -> torch.Tensor:
        """``o_act - o_plain [B, T, Hq, D]`` of every head of one layer."""
        from ..op import act_attention

        sc = self.scorer
        common = dict(beta=sc.beta, tau=sc.tau, scale=scaling, key_padding_mask=key_mask,
                      backend=sc.backend, window=window)
        every = torch.ones(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)
        return (act_attention(q, k, v, heads=every, **common)
                - act_attention(q, k, v, heads=None, **common)).transpose(1, 2)

    def estimate(self, ids, mask, items, layers: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``([B, len(layers), Hq] first-order objective change of each candidate,
        [B] objective value of the plain model, the plain model's scores)`` (the scores are
        :func:`~act_kernels.tasks.score_last_logits` of its logits)."""
        def objective(hidden):
            logits = self.runner.last_logits(hidden)
            return (objective_values(logits, items, self.objective),
                    lambda: score_last_logits(logits.detach(), items))
        return self._first_order(ids, mask, layers, objective)

    def estimate_options(self, batch: Sequence[Sample], layers: Sequence[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """:meth:`estimate` under the log-likelihood objective: one forward and backward over
        the option rows of ``batch`` (samples encoded with ``loglik=True``), the rows'
        estimates summed per sample."""
        view = OptionRows(batch)
        ids, mask = pad_batch(view.rows, self.scorer.tokenizer, self.scorer.device)
        protocol = self.scorer.objective
        gold = [s.gold for s in batch]

        def objective(hidden):
            scored = view.scored(option_sums(self.runner.tail_logits, hidden,
                                             [r.item for r in view.rows]), protocol)
            return (option_objective(scored, gold, self.objective),
                    lambda: {k: v.detach() for k, v in scored.items()})
        est, values, scored = self._first_order(ids, mask, layers, objective)
        owner = torch.as_tensor([i for i, _ in view.where], dtype=torch.long,
                                device=est.device)
        per_sample = est.new_zeros(len(batch), *est.shape[1:]).index_add_(0, owner, est)
        return per_sample, values, scored

    def _first_order(self, ids, mask, layers: Sequence[int], objective
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``([rows, len(layers), Hq] first-order change, values, scores)`` of
        ``objective(hidden after the last layer) -> (differentiable values, scores())`` over the
        rows ``ids`` (the values may be per sample of several rows: the gradient is the sum's)."""
        first = min(layers)
        with self._kept(layers) as (outputs, inputs):
            with torch.no_grad():                 # no gradient is needed below the first layer
                hidden, ctx = self.runner.context(ids, mask)
                hidden = self.runner.run_layers(hidden, ctx, 0, first)
            with torch.enable_grad():
                hidden = hidden.detach().requires_grad_(True)   # a graph even if frozen
                hidden = self.runner.run_layers(hidden, ctx, first, self.runner.num_layers)
                values, scores = objective(hidden)
                grads = torch.autograd.grad(values.sum(), [outputs[l] for l in layers],
                                            allow_unused=True)
        missing = set(layers) - set(inputs)
        if missing:
            raise RuntimeError(f"act search: no attention call was seen for layers "
                               f"{sorted(missing)} (the model does not call Transformers' "
                               "attention interface)")
        real = ctx.key_mask[:, :, None, None]
        per_layer = []
        for l, grad in zip(layers, grads):
            if grad is None:              # the objective does not depend on this layer
                per_layer.append(torch.zeros(ids.shape[0], self.runner.num_heads,
                                             device=ids.device))
                continue
            delta = self._delta(*inputs[l], ctx.key_mask)
            prod = grad.view(delta.shape).float() * delta.float()
            per_layer.append(torch.where(real, prod, 0.0).sum(dim=(1, 3)))
        return torch.stack(per_layer, dim=1), values.detach(), scores()

    def run(self, n_total: int, samples: Sequence[Sample], layers: Sequence[int],
            progress: Optional[Callable[[int], None]] = None
            ) -> tuple[torch.Tensor, torch.Tensor, Results]:
        """``([n_total, len(layers), Hq], [n_total], Results)``: float64 estimates, plain
        objective values and the plain model's outcomes at the samples' global indices (zero
        elsewhere), this process's batches computed, all ranks reduced."""
        sc = self.scorer
        est = torch.zeros(n_total, len(layers), self.runner.num_heads, dtype=torch.float64)
        val = torch.zeros(n_total, dtype=torch.float64)
        plain = Results.empty(n_total)
        for batch in sc.my_batches(samples):
            index = torch.as_tensor([s.index for s in batch], dtype=torch.long)
            if sc.objective == NEXT_TOKEN:
                ids, mask = pad_batch(batch, sc.tokenizer, sc.device)
                e, v, scored = self.estimate(ids, mask, [s.item for s in batch], layers)
            else:
                e, v, scored = self.estimate_options(batch, layers)
            est[index], val[index] = e.double().cpu(), v.double().cpu()
            plain.put(index, scored)
            if progress:
                progress(len(batch))
        return sc.dist.all_reduce(est), sc.dist.all_reduce(val), plain.reduce(sc.dist)


# Which samples an exact run must cover (the approximation of ``--exact-check boundary``): a
# sample's answer can flip only if the change of its decision margin reaches the margin itself.
# Measured on SmolLM2 (120 samples x 243 heads, benchmarks/RESULTS.md): the first-order
# estimate is within 40% of the exact change for 90% of (sample, head) pairs, and
# ``|margin| <= 3 |estimate| + 0.05`` selects 10% of the pairs yet holds 394 of the 396
# answers that flip.
BOUNDARY_FACTOR = 3.0
BOUNDARY_SLACK = 0.05


@dataclass
class ScreenResult:
    """Per-sample first-order estimates ``est [n, layers, heads]`` (float64, by global sample
    index; zero for samples not screened), the plain model's objective values ``value [n]``,
    and the objective they are for."""

    est: torch.Tensor
    value: torch.Tensor
    objective: str
    layers: list
    heads: list

    def column(self, key: tuple[int, int]) -> torch.Tensor:
        """``[n]`` estimates of candidate ``(layer, head)``."""
        return self.est[:, self.layers.index(key[0]), self.heads.index(key[1])]

    def means(self, samples: Sequence[Sample]) -> dict[tuple[int, int], float]:
        idx = torch.as_tensor([s.index for s in samples], dtype=torch.long)
        mean = self.est[idx].mean(0) if len(idx) else self.est[:0].sum(0)
        return {(l, h): float(mean[i, j]) for i, l in enumerate(self.layers)
                for j, h in enumerate(self.heads)}

    def gained(self, samples: Sequence[Sample]) -> dict[tuple[int, int], int]:
        """Predicted answers gained minus lost on ``samples`` per candidate (the decision
        objective only: its sign is the answer's correctness)."""
        idx = torch.as_tensor([s.index for s in samples], dtype=torch.long)
        value = self.value[idx][:, None, None]
        net = ((value + self.est[idx] > 0).long() - (value > 0).long()).sum(0)
        return {(l, h): int(net[i, j]) for i, l in enumerate(self.layers)
                for j, h in enumerate(self.heads)}


def screen_order(screen: ScreenResult, samples: Sequence[Sample],
                 candidates: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Candidates best first: predicted answers gained on ``samples`` (decision objective),
    then the mean estimate, then layer and head."""
    mean = screen.means(samples)
    gained = screen.gained(samples) if screen.objective == "decision" else {}
    return sorted(candidates, key=lambda k: (-gained.get(k, 0), -mean[k], k))


def near_boundary(samples: Sequence[Sample], margins: torch.Tensor,
                  estimate: torch.Tensor) -> list[Sample]:
    """The samples whose answer a candidate may flip: ``|margin| <= BOUNDARY_FACTOR *
    |estimate| + BOUNDARY_SLACK`` (``margins``: the decision margins the candidate would change,
    ``estimate``: its first-order change, both ``[n]`` by global index)."""
    return [s for s in samples
            if abs(float(margins[s.index])) <= BOUNDARY_FACTOR * abs(float(estimate[s.index]))
            + BOUNDARY_SLACK]


def screen_candidates(st) -> tuple[ScreenResult, Results]:
    """Screen stage of :func:`~act_kernels.search.core.run_search`: the first-order estimate of
    every candidate of ``st`` on every calibration sample (the scoring part ranks the
    candidates, the validation part bounds the greedy step's runs), and the uncalibrated
    model's outcomes, which its forward computes anyway (the search's baseline), by chunks of
    :data:`SCREEN_CHUNK` samples, each a checkpoint record (values as recorded, so a resumed
    search ranks exactly as an uninterrupted one)."""
    screen = FirstOrderScreen(st.scorer, st.cfg.screen_objective)
    ordered = list(st.score) + list(st.val)
    chunks = [ordered[i:i + SCREEN_CHUNK] for i in range(0, len(ordered), SCREEN_CHUNK)]
    todo = sum(len(c) for k, c in enumerate(chunks) if st.ckpt.find("screen", chunk=k) is None)
    bar = progress(todo, "screen", st.dist.main)
    est = torch.zeros(st.n, len(st.layers), len(st.heads), dtype=torch.float64)
    value = torch.zeros(st.n, dtype=torch.float64)
    plain = Results.empty(st.n)
    head_idx = torch.as_tensor(st.heads, dtype=torch.long)
    try:
        for k, chunk in enumerate(chunks):
            rec = st.ckpt.find("screen", chunk=k)
            if rec is None:
                e, v, res = screen.run(st.n, chunk, st.layers, bar.update)
                index = torch.as_tensor([s.index for s in chunk], dtype=torch.long)
                rows = e[:, :, head_idx][index]
                rec = st.record({"kind": "screen", "chunk": k,
                                 "index": [s.index for s in chunk],
                                 "value": [float(f"{x:.6g}") for x in v[index].tolist()],
                                 "plain": {f: getattr(res, f)[index].tolist()
                                           for f in Results.FIELDS},
                                 "estimate": [[float(f"{x:.6g}") for x in row.flatten().tolist()]
                                              for row in rows]})
            index = torch.as_tensor(rec["index"], dtype=torch.long)
            est[index] = torch.tensor(rec["estimate"], dtype=torch.float64).view(
                -1, len(st.layers), len(st.heads))
            value[index] = torch.tensor(rec["value"], dtype=torch.float64)
            for f in Results.FIELDS:
                getattr(plain, f)[index] = torch.tensor(rec["plain"][f], dtype=torch.float64)
    finally:
        bar.close()
    return (ScreenResult(est, value, st.cfg.screen_objective, list(st.layers), list(st.heads)),
            plain)
