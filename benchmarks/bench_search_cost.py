"""What the screened head search costs against the exhaustive one, on the same samples (issue 13).

Part 1 runs ``act search``'s screened strategy end to end (the default settings) and charges
the process CPU time between checkpoint records to the stage that wrote the later record:
screen (which is also the baseline), exact checks, greedy trials, final set.

Part 2 prices ``--strategy exhaustive`` on the same samples without running all of it (hours
on this CPU): its exact stage (every candidate on every scoring sample) is timed on the first
``--exhaustive-subset`` scoring samples and scaled per sample, half of them before the screened
search and half after it (and a plain forward of every sample likewise, before and after), so
that a drift of the shared machine's speed during the run weighs on both strategies alike; a
forward with the final set calibrated is timed on the validation part; these price the
exhaustive strategy's other stages: the baseline on every sample, ``max_greedy`` trials on every
validation sample (no estimate says which samples a head may flip), the final set and the
reference union on the validation part. The per-sample cost of the exact stage depends on the
prompts' lengths and sinks; the subset is the scoring part's first samples in the search's own
(task-mixed, seeded) order.

    python benchmarks/bench_search_cost.py --samples 900 --out /tmp/cost900   # RESULTS.md
    python benchmarks/bench_search_cost.py --samples 48 --exhaustive-subset 8 --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results  # noqa: E402

STAGES = {"header": "start", "screen": "screen + baseline", "baseline": "screen + baseline",
          "candidate": "exact checks", "greedy": "greedy trials", "set": "final set"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,mr,subj,arc_easy")
    parser.add_argument("--samples", type=int, default=900)
    parser.add_argument("--exhaustive-subset", type=int, default=48,
                        help="scoring samples on which the exhaustive exact stage is timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/act_search_cost")
    parser.add_argument("--skip-search", action="store_true",
                        help="reuse a finished search in --out (part 2 only)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from act_kernels.hf import load_model
    from act_kernels.search import SearchConfig, run_search
    from act_kernels.search.core import load_data, new_state
    from act_kernels.search.report import as_heads
    from act_kernels.runtime import Dist

    cpu0 = time.process_time()
    model, tok = load_model()
    load_cpu = time.process_time() - cpu0
    cfg = SearchConfig(tasks=args.tasks.split(","), samples=args.samples,
                       model_name="SmolLM2-135M-Instruct")
    out = Path(args.out)
    if not args.skip_search and (out / "search_checkpoint.jsonl").exists():
        raise SystemExit(f"{out} holds a checkpoint: remove it, or pass --skip-search")

    # ------------------------------------------- part 2a: exhaustive's costs, first half
    st = new_state(model, tok, cfg, out / "exhaustive-probe", Dist(), None)
    load_data(st, tok)
    scorer = st.scorer
    todo = {l: list(st.heads) for l in st.layers}
    subset = st.score[:args.exhaustive_subset]
    halves = [subset[:len(subset) // 2], subset[len(subset) // 2:]]
    spent = {"exact": 0.0, "plain": 0.0}

    def exhaustive_half(part):
        t = time.process_time()
        base = scorer.plain(st.n, st.samples)
        spent["plain"] += time.process_time() - t
        t = time.process_time()
        scorer.candidates(st.n, part, base, todo, lambda layer, res: None)
        spent["exact"] += time.process_time() - t

    exhaustive_half(halves[0])

    # ---------------------------------------------------------------- part 1: the screen
    stages: dict[str, float] = {}
    last = [time.process_time()]

    def on_record(rec: dict) -> None:
        now = time.process_time()
        stage = STAGES.get(rec.get("kind"), rec.get("kind"))
        stages[stage] = stages.get(stage, 0.0) + now - last[0]
        last[0] = now

    wall = time.perf_counter()
    summary = run_search(model, tok, cfg, out, on_record=None if args.skip_search else on_record)
    wall = time.perf_counter() - wall
    stages.pop("start", None)
    screen_cpu = sum(stages.values())

    # ------------------------------------------- part 2b: exhaustive's costs, second half
    exhaustive_half(halves[1])
    kept = summary["best_set"] or [(st.layers[0], 0)]
    t = time.process_time()
    scorer.plain(st.n, st.val, as_heads(kept))
    calibrated_per_sample = (time.process_time() - t) / max(1, len(st.val))
    n, n_score, n_val = st.n, len(st.score), len(st.val)
    plain_per_sample = spent["plain"] / (2 * n)
    exact_per_sample = spent["exact"] / len(subset)
    exhaustive = {
        "baseline (every sample, plain)": n * plain_per_sample,
        "exact: every candidate on every scoring sample": n_score * exact_per_sample,
        f"greedy: {cfg.max_greedy} trials on every validation sample":
            cfg.max_greedy * n_val * calibrated_per_sample,
        "final set + reference union (validation part)": 2 * n_val * calibrated_per_sample,
    }
    exhaustive_cpu = sum(exhaustive.values())
    ratio = exhaustive_cpu / screen_cpu if screen_cpu else float("nan")

    rows = ["| stage | CPU s |", "|---|---:|"]
    rows += [f"| {name} | {sec:.0f} |" for name, sec in stages.items()]
    rows += [f"| **screened search, total** (model load {load_cpu:.0f} s not included; "
             f"{wall:.0f} s wall) | **{screen_cpu:.0f}** |"]
    erows = ["| exhaustive stage (priced) | CPU s |", "|---|---:|"]
    erows += [f"| {name} | {sec:.0f} |" for name, sec in exhaustive.items()]
    erows += [f"| **exhaustive, total** | **{exhaustive_cpu:.0f}** |"]
    val = summary["final"]["val"]
    base = summary["baseline"]["val"]
    body = "\n".join([
        f"`act search --tasks {args.tasks} --samples {args.samples} --threads {args.threads}` "
        f"(the default screen: top {cfg.screen_top}, decision objective, boundary checks; "
        f"{n_score} scoring and {n_val} validation samples, {len(st.candidates)} candidates); "
        f"process CPU time at {args.threads} thread(s).", "", *rows, "",
        f"Exhaustive on the same samples: its exact stage timed on {len(subset)} scoring "
        f"samples, half before and half after the screened search ({exact_per_sample:.2f} s "
        f"each, every one of the {len(st.candidates)} candidates); a plain forward "
        f"{plain_per_sample:.3f} s a sample (every sample, before and after), one with the "
        f"final set calibrated {calibrated_per_sample:.3f} s a sample.", "", *erows, "",
        f"**Ratio: {ratio:.1f}x** (exhaustive / screened, CPU time).", "",
        f"The screened search kept {len(summary['best_set'])} heads: validation accuracy "
        f"{100 * base['acc']:.1f}% -> {100 * val['acc']:.1f}% ({val['n']} samples); profile "
        f"`{out / 'profile.json'}`."])
    print(body)
    (out / "cost.json").write_text(json.dumps({
        "stages": stages, "screen_cpu": screen_cpu, "load_cpu": load_cpu, "wall": wall,
        "exhaustive": exhaustive, "exhaustive_cpu": exhaustive_cpu, "ratio": ratio,
        "exact_per_sample": exact_per_sample, "plain_per_sample": plain_per_sample,
        "calibrated_per_sample": calibrated_per_sample, "subset": len(subset)}, indent=1))
    if not args.no_write:
        append_results("Head search cost: screened vs exhaustive on the same samples "
                       "(bench_search_cost.py, issue 13)", body)


if __name__ == "__main__":
    main()
