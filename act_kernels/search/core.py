"""``act search``: score every candidate head alone, then combine the good ones greedily.

Outputs in ``out``: ``profile.json`` (:class:`~act_kernels.profile.ACTProfile`), ``heads.csv``
(every candidate), ``summary.md`` and the checkpoint ``search_checkpoint.jsonl`` (one record per
finished step; an interrupted search started again with the same arguments continues from it
and writes the same files as an uninterrupted run).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .data import (Sample, calibration_examples, encode_examples, fingerprint, parse_tasks,
                   split_score_val)
from .scoring import Dist, Results, Scorer, metrics

CHECKPOINT = "search_checkpoint.jsonl"
STOP_ENV = "ACT_SEARCH_STOP_AFTER"   # testing: raise after this many candidate records

SEARCH_RULE = """\
## How `act search` chooses heads

1. **Calibration data.** `--samples` prompts mixed evenly from `--tasks`, drawn in seeded order
   from each task's calibration pool (disjoint from the evaluation split `act eval` uses). Per
   task, the first part (1 - `--val-fraction`, default 2/3) is the *scoring* part, the rest the
   *validation* part.
2. **Scoring (as the reference code).** Every candidate head (by default all heads of layers
   2 .. L-2; the first two and the last layer are left alone) is calibrated alone and run on the
   scoring part. It is *individually good* when it raises accuracy over the uncalibrated model
   (strictly more correct answers). The reference keeps all of them together.
3. **Greedy combination (ours).** The union of individually good heads can hurt, so the good
   heads are tried one at a time, best first (accuracy gain, then class-balanced accuracy gain,
   then margin gain, then layer/head index), each added to the heads kept so far and run on the
   *validation* part, which did not score them. A head is kept only if the combination loses
   neither accuracy nor class-balanced accuracy on the validation part compared with the heads
   kept so far (ties keep the head: it was good on the scoring part). At most
   `--max-greedy` heads are tried.
4. **Never the margin alone.** The gold label's log-probability margin is reported for every
   candidate and for the final set, and only breaks ties in the order of step 3; it never
   decides whether a head is kept (a margin gain can come with an accuracy loss).
5. **Reported.** For every candidate: accuracy, class-balanced accuracy (mean over the
   (task, gold option) groups) and mean margin, with deltas, on the scoring part; for the final
   set and for the reference's union: the same on the scoring and validation parts.
"""


@dataclass
class SearchConfig:
    """Everything that defines a search (and therefore its checkpoint)."""

    tasks: Sequence[str] = ("sst2", "arc_easy")
    samples: int = 300
    layers: Optional[Sequence[int]] = None      # None: 2 .. L-2
    heads: Optional[Sequence[int]] = None       # None: all query heads
    beta: float = 0.4
    tau: float = 0.1
    seed: int = 0
    val_fraction: float = 1 / 3
    max_greedy: int = 32
    chat_template: bool = False
    max_length: Optional[int] = None
    model_name: Optional[str] = None
    data: dict = field(default_factory=dict)    # task -> local JSONL/CSV file
    batch_size: int = 8
    max_rows: int = 64
    max_tokens: int = 4096
    backend: str = "torch"
    skip_sinkless: bool = True
    reuse_prefix: bool = True


def default_layers(num_layers: int) -> list[int]:
    """Layers 2 .. L-2 (the reference leaves the first two and the last layer alone)."""
    return list(range(min(2, num_layers), max(num_layers - 1, 0)))


def parse_index_list(spec, upper: int, what: str) -> Optional[list[int]]:
    """``None``/``"all"`` -> None; ``"2:28"`` (inclusive), ``"3,5,9"``, ``"-1"``, or a list of
    ints -> sorted unique indices in ``0 .. upper-1`` (``ValueError`` names a bad one)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        if isinstance(item, str) and ":" in item:
            a, b = item.split(":", 1)
            lo = int(a) if a.strip() else 0
            hi = int(b) if b.strip() else upper - 1
            lo, hi = (lo + upper if lo < 0 else lo), (hi + upper if hi < 0 else hi)
            if lo > hi:
                raise ValueError(f"empty {what} range {item!r}")
            rng = range(lo, hi + 1)
        else:
            v = int(item)
            rng = [v + upper if v < 0 else v]
        for v in rng:
            if not 0 <= v < upper:
                raise ValueError(f"{what} {v} is out of range: the model has {upper} {what}s "
                                 f"(valid 0..{upper - 1})")
            out.add(v)
    if not out:
        raise ValueError(f"no {what} selected by {spec!r}")
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------

class Checkpoint:
    """JSONL records, appended and flushed one by one (written by rank 0 only)."""

    def __init__(self, path: Path, header: dict, writer: bool):
        self.path = path
        self.writer = writer
        self.records: list[dict] = []
        if path.exists():
            lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
            if lines and lines[0].get("kind") == "header":
                if lines[0]["config"] != header["config"]:
                    raise ValueError(
                        f"{path} was written by a search with other settings; use another "
                        "--out, or delete the checkpoint to start over")
                self.records = lines[1:]
        if not self.records and writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")

    def find(self, kind: str, **keys) -> Optional[dict]:
        for rec in self.records:
            if rec.get("kind") == kind and all(rec.get(k) == v for k, v in keys.items()):
                return rec
        return None

    def all(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def _deltas(m: dict, base: dict) -> dict:
    return {f"d_{k}": m[k] - base[k] for k in ("acc", "bal_acc", "margin")}


def run_search(model, tokenizer, cfg: SearchConfig, out: str | os.PathLike, *,
               dist: Optional[Dist] = None, log=print) -> dict:
    """Run the search (see :data:`SEARCH_RULE`) and write ``out``'s files; returns the summary
    dict (also on every rank under torchrun; only rank 0 writes)."""
    from ..profile import ACTProfile

    dist = dist or Dist()
    out = Path(out)
    tasks = parse_tasks(cfg.tasks)
    scorer = Scorer(model, tokenizer, beta=cfg.beta, tau=cfg.tau, backend=cfg.backend,
                    batch_size=cfg.batch_size, max_rows=cfg.max_rows,
                    max_tokens=cfg.max_tokens, dist=dist,
                    skip_sinkless=cfg.skip_sinkless, reuse_prefix=cfg.reuse_prefix)
    L, H = scorer.num_layers, scorer.num_heads
    layers = list(cfg.layers) if cfg.layers is not None else default_layers(L)
    heads = list(cfg.heads) if cfg.heads is not None else list(range(H))
    for l in layers:
        if not 0 <= l < L:
            raise ValueError(f"layer {l} is out of range: the model has {L} layers "
                             f"(valid 0..{L - 1})")
    for h in heads:
        if not 0 <= h < H:
            raise ValueError(f"head {h} is out of range: the model has {H} query heads per "
                             f"layer (valid 0..{H - 1})")

    # -- data
    per_task = calibration_examples(tasks, cfg.samples, cfg.seed, cfg.data)
    score_ex, val_ex = split_score_val(per_task, cfg.val_fraction)
    samples: list[Sample] = []
    score_s: list[Sample] = []
    val_s: list[Sample] = []
    for task in tasks:
        enc = encode_examples(task, score_ex[task] + val_ex[task], tokenizer, cfg.chat_template,
                              cfg.max_length, start=len(samples))
        samples += enc
        score_s += enc[:len(score_ex[task])]
        val_s += enc[len(score_ex[task]):]
    n = len(samples)
    scorer.check(samples)

    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("batch_size", "max_rows", "max_tokens", "backend", "data",
                              "skip_sinkless", "reuse_prefix")}
    settings.update(tasks=tasks, layers=layers, heads=heads, num_layers=L, num_heads=H,
                    data_fingerprint=fingerprint(samples))
    ckpt = Checkpoint(out / CHECKPOINT, {"kind": "header", "config": settings}, dist.main)

    # -- baseline on all calibration samples
    rec = ckpt.find("baseline")
    if rec is None:
        bar = _progress(n, "baseline", dist.main)
        baseline = scorer.plain(n, samples, progress=bar.update)
        bar.close()
        ckpt.add({"kind": "baseline", **baseline.to_record()})
    else:
        baseline = Results.from_record(rec)
    base_score, base_val = metrics(baseline, score_s), metrics(baseline, val_s)

    # -- every candidate alone, on the scoring part
    done = {(r["layer"], r["head"]) for r in ckpt.all("candidate")}
    todo = {l: [h for h in heads if (l, h) not in done] for l in layers}
    todo = {l: hs for l, hs in todo.items() if hs}
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    units = sum(len(hs) for hs in todo.values()) * len(score_s)
    bar = _progress(units, "candidates", dist.main)

    def on_layer(layer: int, results: dict) -> None:
        for head in sorted(results):
            res = results[head]
            ckpt.add({"kind": "candidate", "layer": layer, "head": head, **res.to_record()})
        if stop_after and len(ckpt.all("candidate")) >= stop_after:
            raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}: stopping the search (test hook)")

    try:
        scorer.candidates(n, score_s, baseline, todo, on_layer, progress=bar.update)
    finally:
        bar.close()

    rows = []
    for layer in layers:
        for head in heads:
            res = Results.from_record(ckpt.find("candidate", layer=layer, head=head))
            m = metrics(res, score_s)
            ran = sum(1 for s in score_s if res.ran[s.index] > 0)
            rows.append({"layer": layer, "head": head, **m, **_deltas(m, base_score),
                         "sink_samples": ran, "changed": int(sum(
                             1 for s in score_s if res.pred[s.index] != baseline.pred[s.index]))})
    good = [r for r in rows if r["d_acc"] > 1e-12]
    good.sort(key=lambda r: (-r["d_acc"], -r["d_bal_acc"], -r["d_margin"], r["layer"], r["head"]))
    tried = good[:max(0, cfg.max_greedy)]

    # -- greedy forward selection on the validation part
    kept: list[tuple[int, int]] = []
    current = base_val
    steps = []
    bar = _progress(len(tried) * len(val_s), "greedy", dist.main and bool(val_s))
    for step, cand in enumerate(tried):
        key = (cand["layer"], cand["head"])
        rec = ckpt.find("greedy", step=step)
        if rec is None:
            trial = _as_heads(kept + [key])
            res = scorer.plain(n, val_s, trial, progress=bar.update)
            m = metrics(res, val_s)
            accept = bool(val_s) and m["acc"] >= current["acc"] - 1e-12 and \
                m["bal_acc"] >= current["bal_acc"] - 1e-12
            rec = {"kind": "greedy", "step": step, "layer": key[0], "head": key[1],
                   "val": m, "kept": accept}
            ckpt.add(rec)
        else:
            bar.update(len(val_s))
        steps.append(rec)
        if rec["kept"]:
            kept.append(key)
            current = rec["val"]
    bar.close()

    # -- final set and the reference's union, on both parts
    finals = {}
    for name, chosen in (("final", kept), ("reference_union", [(r["layer"], r["head"])
                                                                for r in good])):
        rec = ckpt.find("set", name=name)
        if rec is None:
            if chosen:
                res = scorer.plain(n, samples, _as_heads(chosen))
            else:
                res = baseline
            rec = {"kind": "set", "name": name, "heads": [list(k) for k in chosen],
                   "score": metrics(res, score_s), "val": metrics(res, val_s)}
            ckpt.add(rec)
        finals[name] = rec

    # -- outputs
    provenance = {
        "tool": "act search", "tasks": tasks, "samples": n, "seed": cfg.seed,
        "calibration": {t: len(per_task[t]) for t in tasks},
        "scoring_samples": len(score_s), "validation_samples": len(val_s),
        "layers": layers, "heads_searched": heads, "chat_template": cfg.chat_template,
        "max_length": cfg.max_length, "data_files": dict(cfg.data),
        "rule": "individually good on the scoring part, then greedy forward selection "
                "without loss of accuracy or class-balanced accuracy on the validation part",
        "baseline": {"score": base_score, "val": base_val},
        "final": {"score": finals["final"]["score"], "val": finals["final"]["val"]},
    }
    profile = ACTProfile(heads=_as_heads(kept), beta=cfg.beta, tau=cfg.tau,
                         model_name=cfg.model_name, num_layers=L, num_heads=H,
                         provenance=provenance)
    status = {}
    for r in rows:
        status[(r["layer"], r["head"])] = "good" if r in good else ""
    for s in steps:
        status[(s["layer"], s["head"])] = "kept" if s["kept"] else "rejected"
    summary = {"baseline": {"score": base_score, "val": base_val}, "rows": rows,
               "good": [(r["layer"], r["head"]) for r in good], "steps": steps,
               "final": finals["final"], "reference_union": finals["reference_union"],
               "profile": profile, "status": status, "tasks": tasks, "n": n,
               "n_score": len(score_s), "n_val": len(val_s), "layers": layers, "heads": heads,
               "calibration_ids": [smp.id for smp in samples]}
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        profile.save(out / "profile.json")
        _write_csv(out / "heads.csv", rows, base_score, status)
        (out / "summary.md").write_text(_summary_md(summary, cfg))
    dist.barrier()
    return summary


def _as_heads(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(int(layer), []).append(int(head))
    return {l: sorted(h) for l, h in sorted(out.items())}


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


def _write_csv(path: Path, rows: list[dict], base: dict, status: dict) -> None:
    cols = ["layer", "head", "acc", "d_acc", "bal_acc", "d_bal_acc", "margin", "d_margin",
            "changed", "sink_samples", "status"]
    lines = [",".join(cols)]
    for r in rows:
        vals = [str(r["layer"]), str(r["head"])]
        for k in ("acc", "d_acc", "bal_acc", "d_bal_acc", "margin", "d_margin"):
            vals.append(_f(r[k], 6))
        vals += [str(r["changed"]), str(r["sink_samples"]), status[(r["layer"], r["head"])]]
        lines.append(",".join(vals))
    path.write_text("\n".join(lines) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _summary_md(s: dict, cfg: SearchConfig) -> str:
    b = s["baseline"]
    fin, ref = s["final"], s["reference_union"]
    lines = [
        "# ACT head search", "",
        f"- model: {cfg.model_name or 'SmolLM2-135M-Instruct (default)'}",
        f"- tasks: {', '.join(s['tasks'])}; {s['n']} calibration samples "
        f"({s['n_score']} scoring, {s['n_val']} validation), seed {cfg.seed}",
        f"- candidates: {len(s['rows'])} (layers {s['layers'][0]}..{s['layers'][-1]}"
        f"{'' if len(s['layers']) == s['layers'][-1] - s['layers'][0] + 1 else ' (subset)'}, "
        f"{len(s['heads'])} heads each); beta {cfg.beta}, tau {cfg.tau}",
        f"- individually good (scoring part): {len(s['good'])}; tried greedily: "
        f"{len(s['steps'])}; kept: {s['profile'].num_calibrated()}",
        f"- profile: `{json.dumps({str(k): v for k, v in s['profile'].heads.items()})}`", "",
        "## Final set vs the uncalibrated model", "",
        "| heads | part | n | accuracy | balanced acc. | margin |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, rec in (("none (uncalibrated)", {"score": b["score"], "val": b["val"]}),
                      (f"final ({len(fin['heads'])})", fin),
                      (f"reference union ({len(ref['heads'])})", ref)):
        for part in ("score", "val"):
            m = rec[part]
            if not m["n"]:
                continue
            lines.append(f"| {name} | {'scoring' if part == 'score' else 'validation'} | "
                         f"{m['n']} | {_pct(m['acc'])} | {_pct(m['bal_acc'])} | "
                         f"{_f(m['margin'], 3)} |")
    lines += ["", "## Greedy steps (validation part)", ""]
    if s["steps"]:
        lines += ["| step | layer.head | accuracy | balanced acc. | margin | kept |",
                  "|---:|---|---:|---:|---:|---|"]
        for st in s["steps"]:
            v = st["val"]
            lines.append(f"| {st['step']} | {st['layer']}.{st['head']} | {_pct(v['acc'])} | "
                         f"{_pct(v['bal_acc'])} | {_f(v['margin'], 3)} | "
                         f"{'yes' if st['kept'] else 'no'} |")
    else:
        lines.append("No head raised accuracy on the scoring part: the profile is empty.")
    top = sorted(s["rows"], key=lambda r: (-r["d_acc"], -r["d_bal_acc"], -r["d_margin"],
                                           r["layer"], r["head"]))[:15]
    lines += ["", "## Best candidates alone (scoring part; all in heads.csv)", "",
              "| layer.head | accuracy (Δ) | balanced acc. (Δ) | margin (Δ) | status |",
              "|---|---:|---:|---:|---|"]
    for r in top:
        lines.append(f"| {r['layer']}.{r['head']} | {_pct(r['acc'])} ({100 * r['d_acc']:+.1f}) "
                     f"| {_pct(r['bal_acc'])} ({100 * r['d_bal_acc']:+.1f}) | "
                     f"{_f(r['margin'], 3)} ({r['d_margin']:+.3f}) | "
                     f"{s['status'][(r['layer'], r['head'])]} |")
    lines += ["", SEARCH_RULE]
    return "\n".join(lines) + "\n"
