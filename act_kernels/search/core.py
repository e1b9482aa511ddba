"""``act search``: score the candidate heads alone, then combine the good ones greedily.

The search is a few named steps over one :class:`SearchState` (see :func:`run_search`):
:func:`load_data`, :func:`measure_baseline`, :func:`score_candidates` (every candidate exactly,
or the first-order screen of :mod:`act_kernels.search.screen` and the best ``screen_top``
exactly), :func:`select_greedy`, :func:`measure_sets`, then the report
(:mod:`act_kernels.search.report`).

Outputs in ``out``: ``profile.json`` (:class:`~act_kernels.profiles.ACTProfile`), ``heads.csv``
(every candidate), ``summary.md`` and the checkpoint ``search_checkpoint.jsonl`` (one record per
finished step; an interrupted search started again with the same arguments continues from it
and writes the same files as an uninterrupted run).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..params import (DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_BETA, DEFAULT_TASKS,
                      DEFAULT_TAU, check_range)
from ..runtime import Checkpoint, Dist, progress
from ..scoring import (NEXT_TOKEN, Results, Sample, calibration_examples, encode_examples,
                       fingerprint, metrics, parse_tasks)
from .candidates import Scorer
from .report import summarize, write_outputs
from .rules import (EPS, EVIDENCE_LEVEL, as_heads, beats, improves, margin_evidence,
                    rank_key, step_level)

CHECKPOINT = "search_checkpoint.jsonl"
STRATEGIES = ("screen", "exhaustive")
EXACT_CHECKS = ("boundary", "all")


@dataclass
class SearchConfig:
    """Everything that defines a search (and therefore its checkpoint)."""

    tasks: Sequence[str] = DEFAULT_TASKS
    samples: int = 300
    layers: Optional[Sequence[int]] = None      # None: 2 .. L-2
    heads: Optional[Sequence[int]] = None       # None: all query heads
    beta: float = DEFAULT_BETA
    tau: float = DEFAULT_TAU
    seed: int = 0
    val_fraction: float = 1 / 3
    max_greedy: int = 32
    chat_template: bool = False
    max_length: Optional[int] = None
    model_name: Optional[str] = None
    data: dict = field(default_factory=dict)    # task -> local JSONL/CSV file
    strategy: str = "screen"                    # "screen" or "exhaustive"
    screen_top: int = 40                        # screen: candidates scored exactly
    screen_objective: str = "decision"          # screen: "decision", "margin" or "logprob"
    exact_check: str = "boundary"               # screen: exact runs on "boundary" samples or "all"
    objective: str = "next-token"               # scoring protocol searched for (PROTOCOLS)
    bootstrap: int = 2000                       # resamples of the final set's interval
    batch_size: int = DEFAULT_BATCH_SIZE
    max_rows: int = 64
    batch_tokens: int = 4096                    # rows x positions per forward after a candidate
    backend: str = DEFAULT_BACKEND
    skip_sinkless: bool = True
    reuse_prefix: bool = True
    evidence_level: float = EVIDENCE_LEVEL      # final check's level; greedy: split over tries
    sham_labels: Optional[int] = None           # seed: shuffle the validation part's labels


# Settings that change how fast a search runs, not what it finds (not in the checkpoint header).
_SPEED_SETTINGS = ("batch_size", "max_rows", "batch_tokens", "backend", "data", "skip_sinkless",
                   "reuse_prefix")


def default_layers(num_layers: int) -> list[int]:
    """Layers 2 .. L-2 (the reference leaves the first two and the last layer alone)."""
    return list(range(min(2, num_layers), max(num_layers - 1, 0)))


def split_score_val(per_task: Mapping[str, list], val_fraction: float) -> tuple[dict, dict]:
    """Per task, the first part (in seeded order) scores the candidates, the rest validates."""
    score, val = {}, {}
    for task, exs in per_task.items():
        n_val = int(math.floor(len(exs) * val_fraction + 0.5)) if val_fraction > 0 else 0
        if 0 < val_fraction and n_val == 0 and len(exs) >= 2:
            n_val = 1
        n_val = min(n_val, max(len(exs) - 1, 0))
        score[task] = exs[:len(exs) - n_val]
        val[task] = exs[len(exs) - n_val:]
    return score, val


# ---------------------------------------------------------------------------------------------
# The state the steps share
# ---------------------------------------------------------------------------------------------

@dataclass
class SearchState:
    """What the steps of a search read and add, in the order they run."""

    cfg: SearchConfig
    scorer: Scorer
    dist: Dist
    out: Path
    on_record: Optional[Callable[[dict], None]]
    tasks: list[str]
    layers: list[int]
    heads: list[int]
    # load_data
    samples: list[Sample] = field(default_factory=list)
    score: list[Sample] = field(default_factory=list)          # scores the candidates
    val: list[Sample] = field(default_factory=list)            # validates the combination
    calibration: dict = field(default_factory=dict)            # task -> examples drawn
    ckpt: Optional[Checkpoint] = None
    # measure_baseline
    baseline: Optional[Results] = None
    # score_candidates
    screen: Optional[object] = None                 # screen.ScreenResult (strategy "screen")
    estimates: dict = field(default_factory=dict)   # (layer, head) -> mean first-order estimate
    rows: list[dict] = field(default_factory=list)  # the candidates scored exactly
    # select_greedy
    good: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    kept: list[tuple[int, int]] = field(default_factory=list)
    # measure_sets
    sets: dict = field(default_factory=dict)        # name -> {"heads", "score", "val", ...}

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def candidates(self) -> list[tuple[int, int]]:
        return [(l, h) for l in self.layers for h in self.heads]

    def record(self, rec: dict) -> dict:
        """Checkpoint ``rec`` (rank 0 writes it) and tell ``on_record``."""
        self.ckpt.add(rec)
        if self.on_record is not None:
            self.on_record(rec)
        return rec


def run_search(model, tokenizer, cfg: SearchConfig, out: str | os.PathLike, *,
               dist: Optional[Dist] = None,
               on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the search (see :data:`act_kernels.search.report.SEARCH_RULE`) and write ``out``'s
    files; returns the summary dict (also on every rank under torchrun; only rank 0 writes).

    ``on_record(record)`` is called after every checkpoint record (e.g. to show or to stop)."""
    st = new_state(model, tokenizer, cfg, Path(out), dist or Dist(), on_record)
    load_data(st, tokenizer)
    measure_baseline(st)
    score_candidates(st)
    select_greedy(st)
    measure_sets(st)
    summary = summarize(st)
    if st.dist.main:
        write_outputs(st.out, summary, cfg)
    st.dist.barrier()
    return summary


def new_state(model, tokenizer, cfg: SearchConfig, out: Path, dist: Dist,
              on_record) -> SearchState:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
    if cfg.strategy == "screen" and cfg.screen_top < 1:
        raise ValueError(f"screen_top must be at least 1, got {cfg.screen_top}")
    if cfg.exact_check not in EXACT_CHECKS:
        raise ValueError(f"unknown exact_check {cfg.exact_check!r}; choose one of {EXACT_CHECKS}")
    if _boundary(cfg) and cfg.screen_objective != "decision":
        raise ValueError("exact_check='boundary' needs screen_objective='decision' (the margin "
                         f"whose sign is the answer), got {cfg.screen_objective!r}; use "
                         "exact_check='all' with other objectives")
    if not 0 < cfg.evidence_level < 0.5:
        raise ValueError(f"evidence_level must be in (0, 0.5), got {cfg.evidence_level}")
    scorer = Scorer(model, tokenizer, beta=cfg.beta, tau=cfg.tau, backend=cfg.backend,
                    batch_size=cfg.batch_size, max_rows=cfg.max_rows,
                    batch_tokens=cfg.batch_tokens, dist=dist,
                    skip_sinkless=cfg.skip_sinkless, reuse_prefix=cfg.reuse_prefix,
                    objective=cfg.objective)
    L, H = scorer.num_layers, scorer.num_heads
    layers = check_range(cfg.layers if cfg.layers is not None else default_layers(L), L,
                         "layer", "act search")
    heads = check_range(cfg.heads if cfg.heads is not None else range(H), H, "head",
                        "act search")
    return SearchState(cfg=cfg, scorer=scorer, dist=dist, out=out, on_record=on_record,
                       tasks=parse_tasks(cfg.tasks), layers=layers, heads=heads)


def load_data(st: SearchState, tokenizer) -> None:
    """Calibration samples, mixed from the tasks, split into scoring and validation parts;
    opens the checkpoint (whose header names the settings and the data)."""
    cfg = st.cfg
    per_task = calibration_examples(st.tasks, cfg.samples, cfg.seed, cfg.data)
    score_ex, val_ex = split_score_val(per_task, cfg.val_fraction)
    for task in st.tasks:
        enc = encode_examples(task, score_ex[task] + val_ex[task], tokenizer, cfg.chat_template,
                              cfg.max_length, start=len(st.samples),
                              loglik=cfg.objective != NEXT_TOKEN)
        st.samples += enc
        st.score += enc[:len(score_ex[task])]
        st.val += enc[len(score_ex[task]):]
    if cfg.sham_labels is not None:
        st.val = sham_labels(st.val, cfg.sham_labels)
        by_index = {s.index: s for s in st.val}
        st.samples = [by_index.get(s.index, s) for s in st.samples]
    st.calibration = {t: len(per_task[t]) for t in st.tasks}
    st.scorer.check(st.samples)
    settings = {k: v for k, v in asdict(cfg).items() if k not in _SPEED_SETTINGS}
    if cfg.objective == NEXT_TOKEN:      # checkpoints written before the objective existed
        settings.pop("objective")
    if cfg.strategy == "exhaustive":     # the screen's settings do not change its results
        for key in ("screen_top", "screen_objective", "exact_check"):
            settings.pop(key)
    settings.update(tasks=st.tasks, layers=st.layers, heads=st.heads,
                    num_layers=st.scorer.num_layers, num_heads=st.scorer.num_heads,
                    data_fingerprint=fingerprint(st.samples))
    st.ckpt = Checkpoint(st.out / CHECKPOINT, {"kind": "header", "config": settings},
                         st.dist.main)


def sham_labels(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """``samples`` with their gold labels shuffled (seeded) within each task and number of
    options: sham data on which no head can truly raise accuracy, to measure how often the
    search keeps heads on noise (``--sham-labels``)."""
    gen = torch.Generator().manual_seed(int(seed))
    groups: dict[tuple, list[int]] = {}
    for k, s in enumerate(samples):
        groups.setdefault((s.task, len(s.item.option_token_ids)), []).append(k)
    out = list(samples)
    for members in groups.values():
        golds = [samples[k].gold for k in members]
        for k, j in zip(members, torch.randperm(len(members), generator=gen).tolist()):
            out[k] = replace(samples[k], item=replace(samples[k].item, gold=golds[j]))
    return out


def measure_baseline(st: SearchState) -> None:
    """The uncalibrated model on every calibration sample (screen strategy: from the screen's
    own plain forward, which it runs on every sample anyway)."""
    rec = st.ckpt.find("baseline")
    if rec is None:
        if st.cfg.strategy == "screen":
            from .screen import screen_candidates

            st.screen, baseline = screen_candidates(st)
        else:
            bar = progress(st.n, "baseline", st.dist.main)
            baseline = st.scorer.plain(st.n, st.samples, progress=bar.update)
            bar.close()
        rec = st.record({"kind": "baseline", **baseline.to_record()})
    st.baseline = Results.from_record(rec)


def _boundary(cfg: SearchConfig) -> bool:
    """Do exact runs cover only the samples near the decision boundary (screen strategy)?"""
    return cfg.strategy == "screen" and cfg.exact_check == "boundary"


def score_candidates(st: SearchState) -> None:
    """Each candidate calibrated alone on the scoring part: every candidate (exhaustive), or the
    ``screen_top`` best by the first-order screen (screen), on every scoring sample or, with
    ``exact_check="boundary"``, on the samples whose answer it may flip. Fills ``st.rows``."""
    exact = st.candidates
    only = None
    if st.cfg.strategy == "screen":
        from .screen import near_boundary, screen_candidates, screen_order

        if st.screen is None:                  # resumed after the screen: read its records
            st.screen = screen_candidates(st)[0]
        st.estimates = st.screen.means(st.score)
        exact = sorted(screen_order(st.screen, st.score, exact)[:st.cfg.screen_top])
        if _boundary(st.cfg):
            only = {key: {s.index for s in near_boundary(st.score, st.baseline.decision,
                                                         st.screen.column(key))}
                    for key in exact}
    done = {(r["layer"], r["head"]) for r in st.ckpt.all("candidate")}
    todo: dict[int, list[int]] = {}
    for layer, head in exact:
        if (layer, head) not in done:
            todo.setdefault(layer, []).append(head)
    samples = st.score
    if only is not None:
        runs = set().union(*(only[(l, h)] for l, hs in todo.items() for h in hs))
        samples = [s for s in st.score if s.index in runs]
    bar = progress(sum(map(len, todo.values())) * len(samples), "exact", st.dist.main)

    def on_layer(layer: int, results: dict) -> None:
        for head in sorted(results):
            st.record({"kind": "candidate", "layer": layer, "head": head,
                       **results[head].to_record()})

    try:
        st.scorer.candidates(st.n, samples, st.baseline, todo, on_layer, progress=bar.update,
                             only=only)
    finally:
        bar.close()
    base = metrics(st.baseline, st.score)
    for layer, head in exact:
        res = Results.from_record(st.ckpt.find("candidate", layer=layer, head=head))
        m = metrics(res, st.score)
        st.rows.append({
            "layer": layer, "head": head, **m,
            **{f"d_{k}": m[k] - base[k] for k in ("acc", "bal_acc", "margin")},
            "estimate": st.estimates.get((layer, head)),
            "checked": len(only[(layer, head)]) if only is not None else len(st.score),
            "sink_samples": sum(1 for s in st.score if res.ran[s.index] > 0),
            "changed": sum(1 for s in st.score
                           if res.pred[s.index] != st.baseline.pred[s.index])})


def select_greedy(st: SearchState) -> None:
    """Individually good heads (accuracy gain on the scoring part), best first, each kept only if
    it :func:`improves` the heads kept so far on the validation part: the paired changes of the
    decision margin have a one-sided lower confidence bound above zero (level
    ``evidence_level`` split over the heads tried, :func:`step_level`) and neither accuracy nor
    class-balanced accuracy falls.

    With ``exact_check="boundary"`` a trial runs only the validation samples whose answer the
    new head may flip (by its first-order estimate, from the kept set's decision margins); the
    others keep the kept set's outcome and are not part of the evidence. The evidence compares
    exact values of both sets on the samples run: where the kept set's outcome on such a sample
    was carried over from an earlier set, the kept set is run there first (``refreshed``)."""
    st.good = sorted((r for r in st.rows if r["d_acc"] > EPS), key=rank_key)
    tried = st.good[:max(0, st.cfg.max_greedy)]
    level = step_level(st.cfg.evidence_level, len(tried))
    current_res = st.baseline                  # exact on every sample (``ran`` marks exact)
    bar = progress(len(tried) * len(st.val), "greedy", st.dist.main and bool(st.val))
    for step, cand in enumerate(tried):
        key = (cand["layer"], cand["head"])
        rec = st.ckpt.find("greedy", step=step)
        if rec is None:
            runs = st.val
            if _boundary(st.cfg):
                from .screen import near_boundary
                runs = near_boundary(st.val, current_res.decision, st.screen.column(key))
            stale = [s for s in runs if current_res.ran[s.index] <= 0]
            refreshed = None
            if stale:
                fresh = st.scorer.plain(st.n, stale, as_heads(st.kept))
                refreshed = fresh.fill_from(current_res)
                refreshed.ran = torch.maximum(fresh.ran, current_res.ran)
                current_res = refreshed
            res = current_res
            if runs:
                res = st.scorer.plain(st.n, runs, as_heads(st.kept + [key]),
                                      progress=bar.update).fill_from(current_res)
            bar.update(len(st.val) - len(runs))
            m = metrics(res, st.val)
            idx = torch.as_tensor([s.index for s in runs], dtype=torch.long)
            ev = margin_evidence(res.decision[idx] - current_res.decision[idx], level)
            kept = bool(runs) and improves(m, metrics(current_res, st.val), ev)
            rec = st.record({"kind": "greedy", "step": step, "layer": key[0], "head": key[1],
                             "val": m, "kept": kept, "runs": len(runs), "evidence": ev,
                             "run": [s.index for s in runs], "refreshed": len(stale),
                             **({"current": refreshed.to_record()}
                                if refreshed is not None else {}),
                             **({"results": res.to_record()} if kept else {})})
        else:
            bar.update(len(st.val))
            if "current" in rec:
                current_res = Results.from_record(rec["current"])
        st.steps.append(rec)
        if rec["kept"]:
            st.kept.append(key)
            current_res = Results.from_record(rec["results"])
    bar.close()


def measure_sets(st: SearchState) -> None:
    """The final set and, for the exhaustive strategy, the reference's union of good heads, run
    exactly on the validation part, the part that decides whether the search wrote a profile
    (the scoring part chose the heads, so its figures would flatter them: it is not run); the
    final set's per-sample outcomes there give the interval against the uncalibrated model.
    (The screen checks only its best candidates, so its good heads are not the reference's
    union: that set is not measured.)

    Each set's ``evidence`` (:func:`margin_evidence` of its decision margin against the
    uncalibrated model's, every validation sample, level ``evidence_level``) and ``beats``
    (:func:`beats`: the final check) are added, not
    recorded (they follow from the record)."""
    chosen = {"final": st.kept}
    if st.cfg.strategy == "exhaustive":
        chosen["reference_union"] = [(r["layer"], r["head"]) for r in st.good]
    for name, pairs in chosen.items():
        rec = st.ckpt.find("set", name=name)
        if rec is None:
            res = (st.scorer.plain(st.n, st.val, as_heads(pairs))
                   if pairs and st.val else st.baseline)
            rec = st.record({"kind": "set", "name": name, "heads": [list(k) for k in pairs],
                             "score": None, "val": metrics(res, st.val),
                             "results": res.to_record()})
        res = Results.from_record(rec["results"])
        idx = torch.as_tensor([s.index for s in st.val], dtype=torch.long)
        ev = margin_evidence(res.decision[idx] - st.baseline.decision[idx],
                             st.cfg.evidence_level)
        base = metrics(st.baseline, st.val)
        st.sets[name] = {**rec, "evidence": ev,
                         "beats": bool(pairs) and bool(st.val) and beats(rec["val"], base, ev)}


