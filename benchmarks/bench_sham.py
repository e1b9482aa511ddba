"""How often does ``act search`` keep heads on noise? (issue 20, "false-keep rate")

Each seed runs a small screened search whose *validation* labels are shuffled within each task
(``--sham-labels``: the scoring part is untouched, so heads that raise accuracy there are found
and tried, but on the validation part no head can truly raise accuracy). Anything kept is kept
on noise; the goal is an empty profile in at least 95% of seeds. The data seed changes with the
sham seed, so the runs are independent replicates. Use classification tasks (the RESULTS run
uses SST-2, MR and SUBJ): for multiple choice scored by the greedy next token, shuffling the
labels does not remove gains in format (naming an option letter at all raises the decision
margin whatever the gold letter), so a head kept there is not necessarily kept on noise.

From the same runs, because nothing is kept on sham data unless the rule fails (every greedy
step then compares a head with the uncalibrated model), the script also counts the seeds where
two other rules would have kept a head: the per-step bound without the Bonferroni split (level
0.05 for every head), and the rule before issue 20 (no loss of accuracy or balanced accuracy and
a gain in accuracy, or in mean margin at equal accuracy). Rates come with Wilson 95% intervals.

    python benchmarks/bench_sham.py --seeds 20 --tasks sst2,mr,subj --samples 90 \
        --screen-top 12 --max-greedy 8 --out /tmp/sham                # RESULTS.md
    python benchmarks/bench_sham.py --seeds 2 --samples 48 --no-write
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results  # noqa: E402


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion ``k / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def other_rules(summary: dict) -> dict:
    """Would the uncorrected per-step bound, or the rule before issue 20, have kept a head? Only
    meaningful when the search kept nothing (each step then compares with the baseline)."""
    base = summary["baseline"]["val"]
    uncorrected = old = False
    for st in summary["steps"]:
        v, ev = st["val"], st["evidence"]
        no_loss = v["acc"] >= base["acc"] - 1e-12 and v["bal_acc"] >= base["bal_acc"] - 1e-12
        uncorrected |= no_loss and ev["p"] <= 0.05
        gain = v["acc"] > base["acc"] + 1e-12 or (abs(v["acc"] - base["acc"]) <= 1e-12
                                                   and v["margin"] > base["margin"] + 1e-12)
        old |= no_loss and gain
    return {"uncorrected": uncorrected, "old_rule": old}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--tasks", default="sst2,mr,subj")
    parser.add_argument("--samples", type=int, default=90)
    parser.add_argument("--val-fraction", type=float, default=0.5)
    parser.add_argument("--layers", default=None, help="default: 2 .. L-2")
    parser.add_argument("--screen-top", type=int, default=12)
    parser.add_argument("--max-greedy", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/act_sham")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from act_kernels.hf import load_model
    from act_kernels.modelinfo import num_layers
    from act_kernels.params import parse_index_list
    from act_kernels.scoring import parse_tasks
    from act_kernels.search import SearchConfig, run_search

    model, tok = load_model(args.model)
    layers = parse_index_list(args.layers, num_layers(model), "layer")
    rows, kept_any, unc_any, old_any, tried = [], 0, 0, 0, 0
    start_all = time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = SearchConfig(tasks=parse_tasks(args.tasks), samples=args.samples, layers=layers,
                           seed=seed, val_fraction=args.val_fraction,
                           max_greedy=args.max_greedy, screen_top=args.screen_top,
                           model_name=args.model or "SmolLM2-135M-Instruct", sham_labels=seed)
        start, cpu = time.time(), time.process_time()
        summary = run_search(model, tok, cfg, os.path.join(args.out, f"seed{seed}"))
        wall, cpu = time.time() - start, time.process_time() - cpu
        kept = summary["profile"].num_calibrated()
        others = other_rules(summary) if not summary["best_set"] else {"uncorrected": True,
                                                                        "old_rule": True}
        kept_any += kept > 0
        unc_any += others["uncorrected"]
        old_any += others["old_rule"]
        tried += len(summary["steps"])
        best = max((st["evidence"]["lower"] for st in summary["steps"]
                    if st["evidence"]["lower"] is not None), default=None)
        rows.append((seed, len(summary["good"]), len(summary["steps"]), len(summary["best_set"]),
                     kept, others, best, wall, cpu))
        print(json.dumps({"seed": seed, "good": len(summary["good"]),
                          "tried": len(summary["steps"]), "greedy_kept": len(summary["best_set"]),
                          "profile_heads": kept, **others, "best_lower": best,
                          "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}), flush=True)
    n = len(rows)
    lines = [
        f"Sham searches: `act search` defaults (screen, top {args.screen_top}, boundary checks, "
        f"evidence level 0.05 split over the heads tried) on {args.samples} samples of "
        f"{args.tasks} (validation fraction {args.val_fraction}), at most {args.max_greedy} "
        f"heads tried, validation labels shuffled within each task; seed k: data seed k, "
        f"shuffle seed k. {n} seeds, {tried} greedy trials in all, "
        f"{time.time() - start_all:.0f} s wall.", "",
        "| seed | individually good | tried | kept by the greedy step | profile heads | "
        "uncorrected 5% would keep | old rule would keep | best lower bound | CPU s |",
        "|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for seed, good, n_tried, greedy, heads, others, best, wall, cpu in rows:
        lines.append(f"| {seed} | {good} | {n_tried} | {greedy} | {heads} | "
                     f"{'yes' if others['uncorrected'] else 'no'} | "
                     f"{'yes' if others['old_rule'] else 'no'} | "
                     f"{'' if best is None else format(best, '+.4f')} | {cpu:.0f} |")
    lines.append("")
    for name, k in (("**this rule: a non-empty profile**", kept_any),
                    ("per-step bound at 0.05 without the Bonferroni split: a head kept", unc_any),
                    ("the rule before issue 20: a head kept", old_any)):
        lo, hi = wilson(k, n)
        lines.append(f"- {name}: {k} of {n} seeds ({100 * k / n:.0f}%, Wilson 95% "
                     f"[{100 * lo:.0f}%, {100 * hi:.0f}%])")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        append_results("False-keep rate on sham data (bench_sham.py, issue 20)", body)


if __name__ == "__main__":
    main()
