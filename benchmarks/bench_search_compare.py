"""``bench_search.py --compare``: the first-order screen against exact per-head scoring.

On SmolLM2-135M-Instruct, calibration samples mixed from four tasks, every head of layers 2..28:

1. **Exact**: every candidate calibrated alone on every sample (today's exact scorer), by chunks
   of 6 samples per task, cached in ``--cache`` (resumable; ``--chunks`` says how many to use).
2. **Screen**: the first-order estimate of every candidate on the same samples, for each
   ``--objectives`` (the margin, and the gold option's log-probability as a cheap variant);
   also ranked within each layer (z-scored per layer) as a second cheap variant.
3. Spearman rank correlation between the per-head mean estimate and the per-head mean exact
   margin change, and the recall of the exact top-20 heads inside the screen's top-K
   (K = 20, 40, 80), per task and on the mix; CPU seconds per sample of both.
4. With ``--search-samples N``: ``act search`` with each strategy on N samples (the exhaustive
   one's exact stage read from the cache, which must cover its scoring part) and ``act eval``
   of both profiles on ``--eval-samples`` held-out samples per task.

Results are appended to RESULTS.md (``--no-write`` prints them).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results  # noqa: E402

PER_CHUNK = 6          # samples per task in one exact chunk
LAYERS = list(range(2, 29))
TOP = 20


# ---------------------------------------------------------------------------------------------
# Samples and the exact cache
# ---------------------------------------------------------------------------------------------

def task_samples(tok, tasks, n):
    """``{task: [Sample]}``: the ``n`` calibration samples ``act search --samples n`` draws."""
    from act_kernels.scoring import calibration_examples, encode_examples

    per_task = calibration_examples(tasks, n, 0)
    return {t: encode_examples(t, per_task[t], tok, False, None) for t in tasks}


def chunk(enc, c):
    """Chunk ``c``: samples ``6c .. 6c+5`` of every task, re-indexed from 0."""
    from act_kernels.scoring import Sample

    out = []
    for samples in enc.values():
        for s in samples[c * PER_CHUNK:(c + 1) * PER_CHUNK]:
            out.append(Sample(len(out), s.task, s.id, s.ids, s.item))
    return out


def exact_chunk(model, tok, samples, path: Path) -> dict:
    """Every candidate alone on ``samples`` (cached in ``path``)."""
    from act_kernels.search import Scorer

    if path.exists():
        return torch.load(path)
    n = len(samples)
    scorer = Scorer(model, tok, batch_size=8)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    base = scorer.plain(n, samples)
    res = {}
    scorer.candidates(n, samples, base, {l: list(range(scorer.num_heads)) for l in LAYERS},
                      lambda l, r: res.update({(l, h): x for h, x in r.items()}))
    rec = {"ids": [s.id for s in samples], "tasks": [s.task for s in samples],
           "base": base.to_record(), "cand": {k: v.to_record() for k, v in res.items()},
           "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
           "threads": torch.get_num_threads()}
    torch.save(rec, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return rec


def exact_changes(rec) -> torch.Tensor:
    """``[n, L, H]`` exact margin change of every candidate on the chunk's samples."""
    from act_kernels.scoring import Results

    base = Results.from_record(rec["base"]).margin
    heads = 1 + max(h for _, h in rec["cand"])
    out = torch.zeros(len(rec["ids"]), len(LAYERS), heads, dtype=torch.float64)
    for (l, h), r in rec["cand"].items():
        out[:, LAYERS.index(l), h] = Results.from_record(r).margin - base
    return out


def screen_chunk(scorer, samples, objective) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``([n, L, H] estimates, [n] plain objective values, CPU seconds)`` of the screen on
    ``samples``."""
    from act_kernels.search.screen import FirstOrderScreen

    cpu0 = time.process_time()
    est, value, _ = FirstOrderScreen(scorer, objective).run(len(samples), samples, LAYERS)
    return est, value, time.process_time() - cpu0


def exact_outcomes(rec) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n] baseline correctness, [n, L, H] correctness with each candidate alone)``."""
    from act_kernels.scoring import Results

    base = Results.from_record(rec["base"]).correct
    heads = 1 + max(h for _, h in rec["cand"])
    out = torch.zeros(len(rec["ids"]), len(LAYERS), heads, dtype=torch.float64)
    for (l, h), r in rec["cand"].items():
        out[:, LAYERS.index(l), h] = Results.from_record(r).correct
    return base, out


def decision_lines(groups, est, value, base, correct, ks) -> list[str]:
    """What the greedy step consumes: the recall of the individually good heads (exact answers
    gained > 0) in the screened top-K, ranked by predicted answers gained (the default) or by
    the mean estimate; and the boundary rule's cost and misses."""
    from act_kernels.search.screen import BOUNDARY_FACTOR, BOUNDARY_SLACK

    lines = ["Decision objective (the default): recall of the *individually good* heads (exact "
             "answers gained > 0, what the greedy step tries) inside the screened top-K, "
             "ranked by predicted answers gained (then mean estimate; the default) or by the "
             "mean estimate alone; and the boundary rule of `--exact-check boundary` (a "
             f"sample runs exactly for a head when |decision margin| <= {BOUNDARY_FACTOR:g} "
             f"|estimate| + {BOUNDARY_SLACK:g}): share of (sample, head) pairs it runs, and "
             "the answers that flip exactly outside it.", "",
             "| part | n | good heads | " + " | ".join(f"gained@{k}" for k in ks) + " | " +
             " | ".join(f"mean@{k}" for k in ks) + " | pairs run | flips | flips missed |",
             "|---|---:|---:|" + "---:|" * (2 * len(ks)) + "---:|---:|---:|"]
    for part, idx in groups.items():
        e, v, b, c = est[idx], value[idx], base[idx], correct[idx]
        good = ((c - b[:, None, None]).sum(0) > 0).flatten()
        mean = e.mean(0).flatten()
        gained = ((v[:, None, None] + e > 0).double() - (v[:, None, None] > 0).double()).sum(0)
        order_gain = sorted(range(len(mean)), key=lambda i: (-float(gained.flatten()[i]),
                                                             -float(mean[i]), i))
        order_mean = torch.argsort(mean, descending=True, stable=True).tolist()
        rec = lambda order, k: float(good[order[:k]].sum()) / max(int(good.sum()), 1)  # noqa
        run = v.abs()[:, None, None] <= BOUNDARY_FACTOR * e.abs() + BOUNDARY_SLACK
        flips = c != b[:, None, None]
        lines.append(f"| {part} | {len(idx)} | {int(good.sum())} | " +
                     " | ".join(f"{rec(order_gain, k):.2f}" for k in ks) + " | " +
                     " | ".join(f"{rec(order_mean, k):.2f}" for k in ks) +
                     f" | {float(run.double().mean()):.3f} | {int(flips.sum())} | "
                     f"{int((flips & ~run).sum())} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Rank statistics
# ---------------------------------------------------------------------------------------------

def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (ties averaged)."""
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def recall(exact: torch.Tensor, estimate: torch.Tensor, k: int, top: int = TOP) -> float:
    """Fraction of the exact top-``top`` heads inside the estimate's top-``k``."""
    best = set(torch.argsort(exact.flatten(), descending=True, stable=True)[:top].tolist())
    got = set(torch.argsort(estimate.flatten(), descending=True, stable=True)[:k].tolist())
    return len(best & got) / top


def per_layer_z(est: torch.Tensor) -> torch.Tensor:
    """``[L, H]`` estimates z-scored within each layer (the "screen per layer" variant)."""
    return (est - est.mean(1, keepdim=True)) / est.std(1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Both strategies end to end, and their profiles held out
# ---------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def seed_exhaustive(model, tok, cfg, out: Path, chunks: list[dict]) -> None:
    """Start the exhaustive search's checkpoint and fill its exact stage from the cache (the
    same candidates on the same samples), so that ``run_search`` only runs the greedy step."""
    from act_kernels.scoring import Results, calibration_examples
    from act_kernels.search import run_search
    from act_kernels.search.core import CHECKPOINT, split_score_val
    import json

    path = out / CHECKPOINT
    if path.exists() and any('"candidate"' in l for l in path.read_text().splitlines()):
        return

    def stop(rec):
        if rec["kind"] == "baseline":
            raise _Stop

    try:
        run_search(model, tok, cfg, out, on_record=stop)
    except _Stop:
        pass
    records = [json.loads(l) for l in path.read_text().splitlines()]
    baseline = Results.from_record(next(r for r in records if r.get("kind") == "baseline"))
    score, val = split_score_val(calibration_examples(cfg.tasks, cfg.samples, cfg.seed),
                                 cfg.val_fraction)
    order = [ex.id for t in cfg.tasks for ex in score[t] + val[t]]
    scoring = {ex.id for t in cfg.tasks for ex in score[t]}
    where = {}
    for rec in chunks:
        for k, sid in enumerate(rec["ids"]):
            where[sid] = (rec, k)
    missing = scoring - set(where)
    if missing:
        raise SystemExit(f"the exact cache misses {len(missing)} scoring samples of the "
                         f"{cfg.samples}-sample search: use more --chunks or fewer samples")
    with path.open("a") as f:
        for l, h in sorted(chunks[0]["cand"]):
            res = baseline.fill_from(baseline)
            res.ran.zero_()
            for i, sid in enumerate(order):
                if sid in scoring:
                    rec, k = where[sid]
                    got = Results.from_record(rec["cand"][(l, h)])
                    if got.ran[k] > 0:
                        for name in Results.FIELDS:
                            getattr(res, name)[i] = getattr(got, name)[k]
            f.write(json.dumps({"kind": "candidate", "layer": l, "head": h,
                                **res.to_record()}) + "\n")


def timed_search(model, tok, cfg, out: Path):
    """``(summary, {stage: CPU seconds})`` of ``run_search``; stages from the record times."""
    from act_kernels.search import run_search

    marks = [("start", time.process_time())]
    summary = run_search(model, tok, cfg, out,
                         on_record=lambda rec: marks.append((rec["kind"], time.process_time())))
    marks.append(("end", time.process_time()))
    stages: dict[str, float] = {}
    for (_, t0), (kind, t1) in zip(marks, marks[1:]):
        stages[kind] = stages.get(kind, 0.0) + t1 - t0
    return summary, stages


def evaluate(model, tok, profile, tasks, samples, out: Path) -> dict:
    from act_kernels.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(tasks=tasks, samples=samples, bootstrap=2000, protocols=("next-token",))
    return run_eval(model, tok, profile, cfg, out)


# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,mr,subj,arc_easy")
    parser.add_argument("--samples", type=int, default=240,
                        help="calibration samples drawn (all four tasks together)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="exact chunks (6 samples per task each) to use; missing ones are "
                             "computed (default: all of --samples)")
    parser.add_argument("--cache", default="/tmp/act_exact_cache")
    parser.add_argument("--objectives", default="decision,margin,logprob")
    parser.add_argument("--ks", default="20,40,80")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--search-samples", type=int, default=0,
                        help="also run both strategies on this many samples and evaluate "
                             "their profiles (0: skip)")
    parser.add_argument("--screen-top", type=int, default=40)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--out", default="/tmp/act_compare")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from act_kernels import load_model
    from act_kernels.scoring import parse_tasks
    from act_kernels.search import Scorer

    tasks = parse_tasks(args.tasks)
    ks = [int(k) for k in args.ks.split(",")]
    model, tok = load_model()
    enc = task_samples(tok, tasks, args.samples)
    n_chunks = args.chunks or args.samples // len(tasks) // PER_CHUNK
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    chunks = [exact_chunk(model, tok, chunk(enc, c), cache / f"chunk_{c:02d}.pt")
              for c in range(n_chunks)]
    exact = torch.cat([exact_changes(r) for r in chunks])
    sample_tasks = [t for r in chunks for t in r["tasks"]]
    n = len(sample_tasks)
    exact_cpu = sum(r["cpu_s"] for r in chunks) / n

    scorer = Scorer(model, tok, batch_size=8)
    estimates, values, screen_cpu = {}, {}, {}
    for objective in args.objectives.split(","):
        parts, vals, cpu = [], [], 0.0
        for c in range(n_chunks):
            est, value, t = screen_chunk(scorer, chunk(enc, c), objective)
            parts.append(est)
            vals.append(value)
            cpu += t
        estimates[objective], values[objective] = torch.cat(parts), torch.cat(vals)
        screen_cpu[objective] = cpu / n

    groups = {t: [i for i, s in enumerate(sample_tasks) if s == t] for t in tasks}
    groups["mix"] = list(range(n))
    lines = [f"SmolLM2-135M-Instruct (float32, CPU, torch backend, {args.threads} thread), {n} "
             f"calibration samples ({', '.join(f'{t} {len(groups[t])}' for t in tasks)}; the "
             f"first {n // len(tasks)} of each task that `act search --samples {args.samples}` "
             f"draws), all {exact.shape[1] * exact.shape[2]} heads of layers 2..28. Exact = each "
             "head calibrated alone (today's exact scorer), the gold label's log-probability "
             "margin change averaged over the samples; estimate = the first-order screen, "
             "averaged likewise. Spearman over the heads; recall = the share of the exact "
             f"top-{TOP} inside the estimate's top-K.", "",
             "| objective | ranking | part | n | Spearman | " +
             " | ".join(f"recall@{k}" for k in ks) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(ks)]
    for objective, est in estimates.items():
        if objective == "decision":       # ranked by answers gained: its own table below
            continue
        for ranking in ("global", "per layer"):
            for part, idx in groups.items():
                ex, es = exact[idx].mean(0), est[idx].mean(0)
                es = per_layer_z(es) if ranking == "per layer" else es
                lines.append(f"| {objective} | {ranking} | {part} | {len(idx)} | "
                             f"{spearman(es, ex):.3f} | " +
                             " | ".join(f"{recall(ex, es, k):.2f}" for k in ks) + " |")
    if "decision" in estimates:
        outcomes = [exact_outcomes(r) for r in chunks]
        base = torch.cat([b for b, _ in outcomes])
        correct = torch.cat([c for _, c in outcomes])
        lines += [""] + decision_lines(groups, estimates["decision"], values["decision"], base,
                                       correct, ks)
    lines += ["", f"CPU time per sample ({args.threads} thread): exact scoring of all "
                  f"{exact.shape[1] * exact.shape[2]} candidates {exact_cpu:.2f} s; screen " +
              ", ".join(f"({o}) {t:.3f} s" for o, t in screen_cpu.items()) +
              f"; ratio {exact_cpu / max(screen_cpu.values()):.0f}x or more."]
    print("\n".join(lines), flush=True)

    if args.search_samples:
        lines += [""] + strategies(model, tok, tasks, args, chunks, exact_cpu)
    if args.no_write:
        print("\n".join(lines))
    else:
        append_results("Head search: first-order screen vs exact scoring", "\n".join(lines))


def strategies(model, tok, tasks, args, chunks, exact_cpu) -> list[str]:
    """Both strategies on ``--search-samples``; their profiles on held-out samples."""
    from act_kernels.search import SearchConfig

    out = Path(args.out)
    cfg = SearchConfig(tasks=tasks, samples=args.search_samples, seed=0,
                       model_name="SmolLM2-135M-Instruct", screen_top=args.screen_top)
    screen_cfg = replace(cfg, strategy="screen")
    exh_cfg = replace(cfg, strategy="exhaustive")
    wall0 = time.perf_counter()
    screen, screen_stages = timed_search(model, tok, screen_cfg, out / "screen")
    screen_wall = time.perf_counter() - wall0
    seed_exhaustive(model, tok, exh_cfg, out / "exhaustive", chunks)
    exhaustive, exh_stages = timed_search(model, tok, exh_cfg, out / "exhaustive")
    n_score = screen["n_score"]
    exh_cpu = exact_cpu * n_score + sum(v for k, v in exh_stages.items() if k != "candidate")
    screen_cpu = sum(screen_stages.values())
    lines = [f"`act search` with each strategy on {args.search_samples} samples "
             f"({n_score} scoring, {screen['n_val']} validation), `--screen-top "
             f"{args.screen_top}`; CPU seconds ({args.threads} thread). The exhaustive run's "
             f"exact stage is the cached exact scoring above ({exact_cpu:.2f} s a sample, "
             "scaled to its scoring samples); its other stages ran.", "",
             "| strategy | CPU s | of which exact stage | wall s | heads kept | profile |",
             "|---|---:|---:|---:|---:|---|"]
    for name, s, cpu, exact_s, wall in (
            ("screen", screen, screen_cpu, screen_stages.get("candidate", 0.0),
             f"{screen_wall:.0f}"),
            ("exhaustive", exhaustive, exh_cpu, exact_cpu * n_score, "-")):
        prof = s["profile"]
        lines.append(f"| {name} | {cpu:.0f} | {exact_s:.0f} | {wall} | {len(s['best_set'])} | "
                     f"`{ {int(k): v for k, v in prof.heads.items()} }`"
                     f"{' (no gain: empty)' if s['no_gain'] else ''} |")
    lines += ["", f"Speed-up of the screen on this run: {exh_cpu / screen_cpu:.1f}x (CPU).",
              f"Screen stages (CPU s): " + ", ".join(f"{k} {v:.0f}"
                                                    for k, v in screen_stages.items())]
    same = screen["profile"].heads == exhaustive["profile"].heads
    for name, s in (("screen", screen), ("exhaustive", exhaustive)):
        if name == "exhaustive" and same:
            lines.append("\nThe exhaustive profile is the screen's: same held-out figures.")
            break
        report = evaluate(model, tok, s["profile"], tasks, args.eval_samples,
                          out / f"eval_{name}")
        lines += ["", f"Held-out (`act eval`, {args.eval_samples} per task), {name} profile:",
                  "", "```", report["table"], "```"]
    return lines


if __name__ == "__main__":
    main()
