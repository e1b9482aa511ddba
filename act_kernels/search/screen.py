"""First-order screen of every candidate head from one forward and one backward per sample.

Calibrating head ``h`` of layer ``l`` changes only that head's attention output at that layer,
by ``delta_o[l, h, i] = o_act - o_plain`` at each position ``i``. To first order the change of
the objective ``f`` (the gold option's log-probability margin at the last position, or its
log-probability) is ``sum_i <df / do[l, h, i], delta_o[l, h, i]>``:

* :meth:`FirstOrderScreen.gradients`: one plain differentiable forward (SDPA) and one backward
  give ``df / do`` for every layer and head at once (the input of each layer's ``o_proj`` is
  the concatenation of its heads' attention outputs);
* :meth:`FirstOrderScreen.deltas`: one no-grad forward with the ACT attention (nothing
  calibrated: each layer's own output is ``o_plain``) records each layer's query/key/value
  (:func:`~act_kernels.hf.recording`) and runs the op once more on them with every head
  calibrated, for every head's ``delta_o`` of that layer;
* :meth:`FirstOrderScreen.estimate`: their dot products, ``[B, layers, heads]``.

So a sample costs about four forwards whatever the number of candidates; the search then
checks the best candidates exactly (:func:`screen_candidates`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from ..tasks import score_last_logits
from .data import Sample, pad_batch
from .report import progress

OBJECTIVES = ("margin", "logprob")
SCREEN_CHUNK = 64    # scoring samples per checkpoint record (fixed: results do not depend on it)


def objective_values(logits: torch.Tensor, items, objective: str = "margin") -> torch.Tensor:
    """Per row: the gold option's log-probability margin over the best other option, or its
    log-probability (``objective="logprob"``), differentiable in ``logits [B, V]``. Rows are
    scored one by one so no row carries another's padded (-inf) options into the gradient."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown screen objective {objective!r}; choose one of {OBJECTIVES}")
    values = []
    for r, item in enumerate(items):
        scored = score_last_logits(logits[r:r + 1], [item])
        if objective == "margin":
            values.append(scored["gold_logprob_margin"][0])
        else:
            values.append(scored["option_logprobs"][0, item.gold])
    return torch.stack(values)


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
    uses a :class:`~act_kernels.search.scoring.Scorer`'s model, runner and settings."""

    def __init__(self, scorer, objective: str = "margin"):
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

    @contextlib.contextmanager
    def _attention_outputs(self, layers: Sequence[int]):
        """Within the block, ``{layer: input of its o_proj [B, T, Hq * D]}`` of every forward
        (the layer's attention output, its heads side by side)."""
        inputs: dict[int, torch.Tensor] = {}

        def keep(layer):
            def hook(module, args):
                inputs[layer] = args[0]
            return hook

        handles = [self.runner.layers[l].self_attn.o_proj.register_forward_pre_hook(keep(l))
                   for l in layers]
        try:
            yield inputs
        finally:
            for h in handles:
                h.remove()

    def _per_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.runner.num_heads, -1)

    def gradients(self, ids, mask, items, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{layer: df/do [B, T, Hq, D]}`` from one plain (SDPA) forward and one backward."""
        with self._attention_outputs(layers) as inputs, torch.enable_grad(), \
                _attention(self.runner.config, "sdpa"):
            hidden, ctx = self.runner.context(ids, mask)
            hidden = hidden.detach().requires_grad_(True)   # a graph even if weights are frozen
            hidden = self.runner.run_layers(hidden, ctx, 0, self.runner.num_layers)
            total = objective_values(self.runner.last_logits(hidden), items,
                                     self.objective).sum()
            grads = torch.autograd.grad(total, [inputs[l] for l in layers], allow_unused=True)
        return {l: self._per_head(torch.zeros_like(inputs[l]) if g is None else g.detach())
                for l, g in zip(layers, grads)}

    @torch.no_grad()
    def deltas(self, ids, mask, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{layer: o_act - o_plain [B, T, Hq, D]}``: ``o_plain`` is the layer's own output in
        a plain ACT forward (nothing calibrated), ``o_act`` one more op call on the same
        query/key/value with every head calibrated."""
        from ..hf import recording
        from ..op import act_attention
        from .runner import act_mode

        sc, calibrated = self.scorer, {}

        def recorder(module, stats, query, key, value, key_padding_mask):
            every = torch.ones(query.shape[0], query.shape[1], dtype=torch.bool,
                               device=query.device)
            calibrated[module.layer_idx] = act_attention(
                query, key, value, heads=every, beta=sc.beta, tau=sc.tau, scale=module.scaling,
                key_padding_mask=key_padding_mask, backend=sc.backend)

        with act_mode(sc.model, beta=sc.beta, tau=sc.tau, backend=sc.backend), \
                recording(sc.model, recorder, layers=layers), \
                self._attention_outputs(layers) as plain:
            hidden, ctx = self.runner.context(ids, mask)
            self.runner.run_layers(hidden, ctx, 0, max(layers) + 1)
        missing = set(layers) - set(calibrated)
        if missing:
            raise RuntimeError(f"act search: no ACT attention call was recorded for layers "
                               f"{sorted(missing)} (the model does not call Transformers' "
                               "attention interface)")
        return {l: calibrated[l].transpose(1, 2) - self._per_head(plain[l]) for l in layers}

    def estimate(self, ids, mask, items, layers: Sequence[int]) -> torch.Tensor:
        """``[B, len(layers), Hq]``: the first-order objective change of each candidate."""
        grads = self.gradients(ids, mask, items, layers)
        deltas = self.deltas(ids, mask, layers)
        real = mask.bool()[:, :, None, None]
        per_layer = []
        for l in layers:
            prod = torch.where(real, grads[l].float() * deltas[l].float(), 0.0)
            per_layer.append(prod.sum(dim=(1, 3)))
        return torch.stack(per_layer, dim=1)

    def run(self, n_total: int, samples: Sequence[Sample], layers: Sequence[int],
            progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """``[n_total, len(layers), Hq]`` float64 estimates at the samples' global indices (zero
        elsewhere), this process's batches computed, all ranks reduced."""
        sc = self.scorer
        est = torch.zeros(n_total, len(layers), self.runner.num_heads, dtype=torch.float64)
        for batch in sc.my_batches(samples):
            ids, mask = pad_batch(batch, sc.tokenizer, sc.device)
            index = torch.as_tensor([s.index for s in batch], dtype=torch.long)
            est[index] = self.estimate(ids, mask, [s.item for s in batch], layers).double().cpu()
            if progress:
                progress(len(batch))
        return sc.dist.all_reduce(est)


def screen_candidates(st) -> dict[tuple[int, int], float]:
    """Screen stage of :func:`~act_kernels.search.core.run_search`: the mean first-order
    estimate over the scoring part of every candidate of ``st``, by chunks of
    :data:`SCREEN_CHUNK` samples, each a checkpoint record (values as recorded, so a resumed
    search ranks exactly as an uninterrupted one)."""
    screen = FirstOrderScreen(st.scorer, st.cfg.screen_objective)
    chunks = [st.score[i:i + SCREEN_CHUNK] for i in range(0, len(st.score), SCREEN_CHUNK)]
    todo = sum(len(c) for k, c in enumerate(chunks) if st.ckpt.find("screen", chunk=k) is None)
    bar = progress(todo, "screen", st.dist.main)
    sums = torch.zeros(len(st.layers), len(st.heads), dtype=torch.float64)
    head_idx = torch.as_tensor(st.heads, dtype=torch.long)
    try:
        for k, chunk in enumerate(chunks):
            rec = st.ckpt.find("screen", chunk=k)
            if rec is None:
                est = screen.run(st.n, chunk, st.layers, bar.update)[:, :, head_idx]
                rows = est[torch.as_tensor([s.index for s in chunk], dtype=torch.long)]
                rec = st.record({"kind": "screen", "chunk": k,
                                 "index": [s.index for s in chunk],
                                 "estimate": [[float(f"{v:.6g}") for v in row.flatten().tolist()]
                                              for row in rows]})
            sums += torch.tensor(rec["estimate"], dtype=torch.float64).view(
                -1, len(st.layers), len(st.heads)).sum(0)
    finally:
        bar.close()
    means = sums / max(len(st.score), 1)
    return {(l, h): float(means[i, j]) for i, l in enumerate(st.layers)
            for j, h in enumerate(st.heads)}
