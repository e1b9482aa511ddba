"""What ``act search`` writes: ``profile.json``, ``heads.csv`` and ``summary.md`` (with the rule
it followed, :data:`SEARCH_RULE`), built from a finished :class:`~.core.SearchState`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..params import DEFAULT_MODEL_NAME
from ..scoring import Results, metrics, paired_bootstrap
from .rules import as_heads, rank_key, step_level

SEARCH_RULE = """\
## How `act search` chooses heads

1. **Calibration data.** `--samples` prompts mixed evenly from `--tasks`, drawn in seeded order
   from each task's calibration pool (disjoint from the evaluation split `act eval` uses). Per
   task, the first part (1 - `--val-fraction`, default 2/3) is the *scoring* part, the rest the
   *validation* part.
2. **Screen (`--strategy screen`, the default).** One plain forward and one backward per
   calibration sample give the gradient of its *decision margin* (the margin whose sign is the
   answer's correctness: the gold label's log-probability margin for classification, the gold
   letter's best logit over every other token for greedy multiple choice) with respect to every
   head's attention output; the op, run twice per layer (every head calibrated, none), gives the
   change calibration makes to each head's output. Their dot product, summed over positions, is
   the first-order estimate of each candidate's margin change on each sample. Candidates are
   ranked by the answers the estimate predicts they gain on the scoring part (net), then by the
   mean estimate; the `--screen-top` best go on to step 3, the others are not run.
3. **Exact scoring (as the reference code).** Each candidate (by default all heads of layers
   2 .. L-2; the first two and the last layer are left alone) is calibrated alone and run on
   the scoring part. It is *individually good* when it raises accuracy over the uncalibrated
   model (strictly more correct answers). The reference keeps all of them together. With the
   screen's `--exact-check boundary` (the default) a candidate runs only on the samples whose
   answer it may flip, `|decision margin| <= 3 |estimate| + 0.05`, and keeps the uncalibrated
   outcome on the others: an approximation, measured in the project's benchmarks (about a tenth
   of the runs; a few flips in a thousand fall outside it). `--exact-check all` runs them all.
4. **Greedy combination (ours), on evidence.** The union of individually good heads can hurt,
   so the good heads are tried one at a time, best first (accuracy gain, then class-balanced
   accuracy gain, then margin gain, then layer/head index), each added to the heads kept so
   far and run on the *validation* part, which did not score them. A head is kept only on
   evidence: the paired per-sample changes of the decision margin (the combination minus the
   heads kept so far, on the same samples) have a one-sided lower confidence bound above zero,
   from a sign-flip test (the observed mean against the means under random signs of the
   changes: exact, no normality assumed, and a handful of samples cannot pass it), and neither
   accuracy nor class-balanced accuracy falls. The level is
   `--evidence-level` (default 0.05) divided by the number of heads tried (Bonferroni), so on
   data where no head helps, the chance that any head is kept is at most 5%. At most
   `--max-greedy` heads are tried. With `--exact-check boundary` a trial runs the validation
   samples whose answer the new head may flip (its estimate against the kept set's margins);
   the evidence is taken on those samples only, with exact values of both sets there (the
   kept set is rerun on any of them where its outcome was carried over from an earlier set);
   the other samples keep the kept set's outcome and count as unchanged.
5. **Does no harm, on evidence.** The final set is run exactly on every validation sample and
   compared with the uncalibrated model there. A non-empty profile is written only when the
   same rule holds against the uncalibrated model at level `--evidence-level` (one-sided
   sign-flip lower bound of the mean decision-margin change above zero, accuracy and
   class-balanced accuracy not lower). Otherwise the profile written is empty and the set is
   only reported. The paired bootstrap intervals of the accuracy and margin differences are
   reported as well. (The validation part chose the set, so this check is not independent of
   the greedy step; the Bonferroni level of step 4 is what bounds keeping heads on noise.
   Measured on data whose validation labels are shuffled: `benchmarks/bench_sham.py`.)
6. **Reported.** For every candidate: the estimate (screen) and, when run exactly, accuracy,
   class-balanced accuracy (mean over the (task, gold option) groups) and mean margin, with
   deltas, on the scoring part, and the samples it ran on; for the final set (and, for the
   exhaustive strategy, the reference's union): the same on the validation part (the scoring
   part chose the heads, so it is not run again).
"""


def _validation_interval(st, final: Results) -> dict:
    """Final set minus the uncalibrated model on the validation part: accuracy and margin
    differences with paired bootstrap 95% intervals."""
    if not st.val:
        return {}
    idx = torch.as_tensor([s.index for s in st.val], dtype=torch.long)
    out = {}
    for key in ("correct", "margin"):
        diff = getattr(final, key)[idx] - getattr(st.baseline, key)[idx]
        lo, hi = paired_bootstrap([diff], st.cfg.bootstrap, st.cfg.seed)
        out[key] = {"delta": float(diff.mean()), "ci95": [lo, hi]}
    return out


def summarize(st) -> dict:
    """The summary dict of a finished search (what :func:`write_outputs` writes)."""
    from ..profiles import ACTProfile

    cfg = st.cfg
    base = {"score": metrics(st.baseline, st.score), "val": metrics(st.baseline, st.val)}
    fin, ref = st.sets["final"], st.sets.get("reference_union")
    no_gain = bool(st.kept) and not fin["beats"]
    chosen = {} if no_gain else as_heads(st.kept)
    provenance = {
        "tool": "act search", "strategy": cfg.strategy, "tasks": st.tasks, "samples": st.n,
        "seed": cfg.seed, "calibration": dict(st.calibration),
        "scoring_samples": len(st.score), "validation_samples": len(st.val),
        "layers": st.layers, "heads_searched": st.heads, "chat_template": cfg.chat_template,
        "max_length": cfg.max_length, "data_files": dict(cfg.data),
        "rule": "individually good on the scoring part, then greedy forward selection on the "
                "validation part (one-sided sign-flip lower bound of the paired decision-margin "
                f"change above zero at level {cfg.evidence_level:g}/heads tried, no loss of "
                "accuracy or class-balanced accuracy); empty unless the final set beats the "
                "uncalibrated model on the validation part by the same rule at level "
                f"{cfg.evidence_level:g}",
        "evidence_level": cfg.evidence_level, "final_evidence": fin["evidence"],
        **({"sham_labels": cfg.sham_labels} if cfg.sham_labels is not None else {}),
        "baseline": base, "final": {"score": fin["score"], "val": fin["val"]},
        "best_set": [list(k) for k in st.kept], "no_gain": no_gain,
    }
    if cfg.strategy == "screen":
        provenance.update(screen_top=cfg.screen_top, screen_objective=cfg.screen_objective,
                          exact_check=cfg.exact_check)
    provenance["objective"] = cfg.objective
    profile = ACTProfile(heads=chosen, beta=cfg.beta, tau=cfg.tau, model_name=cfg.model_name,
                         num_layers=st.scorer.num_layers, num_heads=st.scorer.num_heads,
                         provenance=provenance)
    status = {key: "screened out" for key in st.candidates}
    for r in st.rows:
        status[(r["layer"], r["head"])] = "good" if r in st.good else ""
    for s in st.steps:
        status[(s["layer"], s["head"])] = "kept" if s["kept"] else "rejected"
    return {"baseline": base, "rows": st.rows, "estimates": dict(st.estimates),
            "good": [(r["layer"], r["head"]) for r in st.good], "steps": st.steps,
            "final": fin, "reference_union": ref, "profile": profile, "status": status,
            "no_gain": no_gain, "best_set": list(st.kept),
            "validation_interval": _validation_interval(st, Results.from_record(fin["results"])),
            "tasks": st.tasks, "n": st.n, "n_score": len(st.score), "n_val": len(st.val),
            "layers": st.layers, "heads": st.heads, "candidates": st.candidates,
            "score_index": [smp.index for smp in st.score],
            "calibration_ids": [smp.id for smp in st.samples]}


def no_gain_line(summary: dict) -> str:
    """The one plain line ``act search`` prints when the final set does not beat the
    uncalibrated model on the validation part with evidence."""
    b, f = summary["baseline"]["val"], summary["final"]["val"]
    ev = summary["final"]["evidence"]
    return (f"act search: the best set found ({len(summary['best_set'])} heads) does not beat "
            f"the uncalibrated model on the validation part with evidence (accuracy "
            f"{_pct(b['acc'])} -> {_pct(f['acc'])}, decision margin {ev['mean']:+.3f}, one-sided "
            f"{100 * (1 - ev['level']):g}% lower bound {_signed(ev['lower'], 3)}); the profile "
            "written "
            "is empty (the set is in summary.md)")


def write_outputs(out: Path, summary: dict, cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary["profile"].save(out / "profile.json")
    (out / "heads.csv").write_text(heads_csv(summary))
    (out / "summary.md").write_text(summary_md(summary, cfg))


def _f(x, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _signed(x, digits: int) -> str:
    """``+0.123``; ``n/a`` for a missing value (no evidence: fewer than two samples)."""
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


CSV_EXACT = ("acc", "d_acc", "bal_acc", "d_bal_acc", "margin", "d_margin")


def heads_csv(s: dict) -> str:
    """One line per candidate: exact scores where it was run exactly, the first-order estimate
    where it was screened, its status."""
    rows = {(r["layer"], r["head"]): r for r in s["rows"]}
    lines = [",".join(("layer", "head") + CSV_EXACT + ("estimate", "checked", "changed",
                                                       "sink_samples", "status"))]
    for key in s["candidates"]:
        r = rows.get(key, {})
        vals = [str(key[0]), str(key[1])] + [_f(r.get(k), 6) for k in CSV_EXACT]
        vals += [_f(s["estimates"].get(key), 6), str(r.get("checked", "")),
                 str(r.get("changed", "")),
                 str(r.get("sink_samples", "")), s["status"][key]]
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


def _interval_lines(s: dict) -> list[str]:
    iv = s["validation_interval"]
    if not iv:
        return []
    acc, mar = iv["correct"], iv["margin"]
    ev = s["final"]["evidence"]
    verdict = ("beats the uncalibrated model: profile written" if s["final"]["beats"] else
               "no evidence that it beats the uncalibrated model: profile empty"
               if s["best_set"] else "no head kept: profile empty")
    return ["", f"Final set minus uncalibrated on the validation part ({s['n_val']} samples; "
                "paired bootstrap 95% intervals): accuracy "
                f"{100 * acc['delta']:+.1f} points [{100 * acc['ci95'][0]:+.1f}, "
                f"{100 * acc['ci95'][1]:+.1f}], margin {mar['delta']:+.3f} "
                f"[{mar['ci95'][0]:+.3f}, {mar['ci95'][1]:+.3f}].",
            "", f"Final check (evidence): decision margin {ev['mean']:+.3f}, one-sided "
                f"{100 * (1 - ev['level']):g}% sign-flip lower bound {_signed(ev['lower'], 3)} "
                f"({ev['n']} samples); {verdict}."]


def summary_md(s: dict, cfg) -> str:
    b = s["baseline"]
    fin, ref = s["final"], s["reference_union"]
    strategy = (f"screen (first-order estimate for all {len(s['candidates'])} candidates, the "
                f"best {len(s['rows'])} scored exactly on "
                f"{'the samples whose answer they may flip' if cfg.exact_check == 'boundary' else 'every scoring sample'})"
                if cfg.strategy == "screen"
                else f"exhaustive (all {len(s['rows'])} candidates scored exactly)")
    lines = [
        "# ACT head search", "",
        f"- model: {cfg.model_name or DEFAULT_MODEL_NAME + ' (default)'}",
        f"- tasks: {', '.join(s['tasks'])}; {s['n']} calibration samples "
        f"({s['n_score']} scoring, {s['n_val']} validation), seed {cfg.seed}",
        f"- candidates: {len(s['candidates'])} (layers {s['layers'][0]}..{s['layers'][-1]}"
        f"{'' if len(s['layers']) == s['layers'][-1] - s['layers'][0] + 1 else ' (subset)'}, "
        f"{len(s['heads'])} heads each); beta {cfg.beta}, tau {cfg.tau}",
        f"- strategy: {strategy}",
        f"- individually good (scoring part): {len(s['good'])}; tried greedily: "
        f"{len(s['steps'])}; kept: {len(s['best_set'])}",
        f"- profile: `{json.dumps({str(k): v for k, v in s['profile'].heads.items()})}`",
    ]
    lines.append(f"- rule: heads kept on evidence (one-sided sign-flip bound of the decision "
                 f"margin's change, level {cfg.evidence_level:g} split over the heads tried; "
                 f"final check at level {cfg.evidence_level:g})")
    if cfg.sham_labels is not None:
        lines.append(f"- **sham data**: the validation part's labels are shuffled within each "
                     f"task (seed {cfg.sham_labels}); no head can truly help there, so anything "
                     "kept is kept on noise")
    if s["no_gain"]:
        lines.append(f"- **{no_gain_line(s)[len('act search: '):]}**")
    lines += ["", "## Final set vs the uncalibrated model", "",
              "| heads | part | n | accuracy | balanced acc. | margin |",
              "|---|---|---:|---:|---:|---:|"]
    sets = [("none (uncalibrated)", b), (f"final ({len(fin['heads'])})", fin)]
    if ref is not None:
        sets.append((f"reference union ({len(ref['heads'])})", ref))
    for name, rec in sets:
        for part in ("score", "val"):
            m = rec[part]
            if m and m["n"]:
                lines.append(f"| {name} | {'scoring' if part == 'score' else 'validation'} | "
                             f"{m['n']} | {_pct(m['acc'])} | {_pct(m['bal_acc'])} | "
                             f"{_f(m['margin'], 3)} |")
    lines += _interval_lines(s)
    lines += ["", "## Greedy steps (validation part)", ""]
    if s["steps"]:
        level = step_level(cfg.evidence_level, len(s["steps"]))
        lines += [f"Evidence per step: the paired decision-margin change on the samples run "
                  f"(one-sided sign-flip lower bound at level {cfg.evidence_level:g}/"
                  f"{len(s['steps'])} = {level:.2g}); kept when it is above zero and neither "
                  "accuracy nor balanced accuracy falls.", "",
                  "| step | layer.head | accuracy | balanced acc. | margin | run | "
                  "Δ decision margin | lower bound | kept |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for st in s["steps"]:
            v, ev = st["val"], st.get("evidence", {})
            lines.append(f"| {st['step']} | {st['layer']}.{st['head']} | {_pct(v['acc'])} | "
                         f"{_pct(v['bal_acc'])} | {_f(v['margin'], 3)} | {st.get('runs', '')} | "
                         f"{_signed(ev.get('mean'), 4)} | {_signed(ev.get('lower'), 4)} | "
                         f"{'yes' if st['kept'] else 'no'} |")
    else:
        lines.append("No head raised accuracy on the scoring part: the profile is empty.")

    lines += ["", "## Best candidates alone (scoring part; all in heads.csv)", "",
              "| layer.head | accuracy (Δ) | balanced acc. (Δ) | margin (Δ) | estimate | status |",
              "|---|---:|---:|---:|---:|---|"]
    for r in sorted(s["rows"], key=rank_key)[:15]:
        lines.append(f"| {r['layer']}.{r['head']} | {_pct(r['acc'])} ({100 * r['d_acc']:+.1f}) "
                     f"| {_pct(r['bal_acc'])} ({100 * r['d_bal_acc']:+.1f}) | "
                     f"{_f(r['margin'], 3)} ({r['d_margin']:+.3f}) | "
                     f"{'' if r['estimate'] is None else format(r['estimate'], '+.3f')} | "
                     f"{s['status'][(r['layer'], r['head'])]} |")
    lines += ["", SEARCH_RULE]
    return "\n".join(lines) + "\n"
