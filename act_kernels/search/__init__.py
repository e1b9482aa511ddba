"""The offline head search of ACT (``act search``): see :mod:`act_kernels.search.core`.

Fast by construction (:mod:`act_kernels.search.candidates`): hidden states entering a layer are
computed once per sample and reused by every candidate of that layer, a batch row is one
(sample, candidate head) pair, only the last position's logits are computed, and a head with no
sink on a sample is not run at all (calibration would leave it unchanged).
"""
from __future__ import annotations

import argparse

from ..params import DEFAULT_BETA, DEFAULT_TAU, DEFAULT_TASKS, parse_index_list
from .candidates import Scorer, naive_candidates
from .core import STRATEGIES, SearchConfig, default_layers, run_search
from .report import SEARCH_RULE

__all__ = ["SEARCH_RULE", "SearchConfig", "run_search", "default_layers", "STRATEGIES", "Scorer",
           "naive_candidates", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_args import add_common_arguments, deprecated_alias

    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated tasks of the mixed calibration set")
    parser.add_argument("--samples", type=int, default=300,
                        help="calibration samples in all, shared evenly by the tasks")
    parser.add_argument("--layers", default=None,
                        help="layers to search: 'A:B' (inclusive), 'A,B,C' or 'all' "
                             "(default: 2 .. L-2)")
    parser.add_argument("--heads", default=None, help="query heads to search (default: all)")
    parser.add_argument("--strategy", default="screen", choices=STRATEGIES,
                        help="screen (default): rank every candidate by a first-order estimate "
                             "from one forward and one backward per sample, score the best "
                             "--screen-top exactly; exhaustive: score every candidate exactly")
    parser.add_argument("--screen-top", type=int, default=40,
                        help="screen: candidates scored exactly (default 40)")
    parser.add_argument("--screen-objective", default="decision",
                        choices=("decision", "margin", "logprob"),
                        help="screen: the estimated quantity: the decision margin, whose sign "
                             "is the answer's correctness (default; candidates are ranked by the "
                             "answers it predicts they gain), the gold option's log-probability "
                             "margin, or its log-probability")
    parser.add_argument("--exact-check", default=None, choices=("boundary", "all"),
                        help="screen: run the exact checks (each screened candidate alone, "
                             "each greedy trial) only on the samples whose answer the "
                             "candidate may flip by its estimate (default, an approximation "
                             "measured in benchmarks/RESULTS.md; needs the decision objective), "
                             "or on every sample (the default with other objectives)")
    parser.add_argument("--objective", default="next-token",
                        choices=("next-token", "loglik", "loglik/token", "loglik/char"),
                        help="the scoring protocol the search raises, screen and exact checks "
                             "alike: next-token (default, the ACT reference's) or option "
                             "log-likelihood (loglik: lm-eval's acc; loglik/char: acc_norm; "
                             "loglik/token), whose decision margin is the gold option's "
                             "(normalised) log-likelihood minus the best other option's; costs "
                             "one sequence per option (README)")
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA,
                        help=f"ACT beta (default {DEFAULT_BETA})")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU,
                        help=f"ACT tau (default {DEFAULT_TAU})")
    parser.add_argument("--val-fraction", type=float, default=1 / 3,
                        help="part of the calibration data kept to validate the greedy "
                             "combination (default 1/3)")
    parser.add_argument("--max-greedy", type=int, default=32,
                        help="at most this many individually good heads are tried (default 32)")
    parser.add_argument("--evidence-level", type=float, default=0.05,
                        help="heads are kept on evidence: a one-sided lower confidence "
                             "bound (sign-flip test) of the mean paired per-sample change of "
                             "the decision margin (validation part) must be above zero, and "
                             "accuracy must not fall; the greedy step tests each head at this level divided "
                             "by the number of heads tried (Bonferroni: at most this chance of "
                             "keeping any head on noise), the final set against the "
                             "uncalibrated model at this level, else the profile is empty "
                             "(default 0.05)")
    parser.add_argument("--sham-labels", type=int, default=None, metavar="SEED",
                        help="sham run: shuffle the validation part's gold labels within each "
                             "task (seeded), so that no head can truly help there; measures how "
                             "often the search keeps heads on noise (benchmarks/bench_sham.py)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate prompts on the left to this many tokens")
    parser.add_argument("--max-rows", type=int, default=64,
                        help="(sample, head) rows per forward through a candidate's own "
                             "layer (default 64)")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="rows x positions per forward through the layers after a "
                             "candidate's (default 4096; was --max-tokens)")
    deprecated_alias(parser, "--max-tokens", "--batch-tokens", type=int)
    parser.add_argument("--no-skip", action="store_true",
                        help="run candidates even on samples where their head has no sink")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="recompute every position after a candidate's layer (by default "
                             "the positions before its first sink, which calibration leaves "
                             "unchanged, are served from a cache of the plain pass)")
    add_common_arguments(parser, out_default="act_runs/search")


def config_from_args(args, num_layers: int, num_heads: int) -> SearchConfig:
    from ..cli_args import parse_data
    from ..params import DEFAULT_MODEL_NAME
    from ..scoring import parse_tasks

    if args.samples < 2:
        raise SystemExit("--samples must be at least 2")
    if args.screen_top < 1:
        raise SystemExit("--screen-top must be at least 1")
    if not 0 <= args.val_fraction < 1:
        raise SystemExit("--val-fraction must be in [0, 1)")
    if not 0 < args.evidence_level < 0.5:
        raise SystemExit("--evidence-level must be in (0, 0.5)")
    return SearchConfig(
        tasks=parse_tasks(args.tasks), samples=args.samples,
        layers=parse_index_list(args.layers, num_layers, "layer"),
        heads=parse_index_list(args.heads, num_heads, "head"),
        beta=args.beta, tau=args.tau, seed=args.seed, val_fraction=args.val_fraction,
        max_greedy=args.max_greedy, strategy=args.strategy, screen_top=args.screen_top,
        screen_objective=args.screen_objective, exact_check=args.exact_check or (
            "boundary" if args.screen_objective == "decision" else "all"),
        objective=args.objective,
        chat_template=args.chat_template,
        max_length=args.max_length, model_name=args.model or DEFAULT_MODEL_NAME,
        data=parse_data(args.data), batch_size=args.batch_size, max_rows=args.max_rows,
        batch_tokens=args.batch_tokens, skip_sinkless=not args.no_skip,
        reuse_prefix=not args.no_prefix_reuse, evidence_level=args.evidence_level,
        sham_labels=args.sham_labels)


def run(args) -> int:
    import time

    from ..cli_args import check_tasks, eprint, load_for_args
    from ..modelinfo import model_device, num_layers, num_query_heads
    from ..params import resolve_backend
    from ..runtime import Dist
    from .report import no_gain_line

    check_tasks(args.tasks, "act search")
    dist = Dist()
    try:
        start = time.time()
        model, tokenizer = load_for_args(args, dist.device())
        try:
            cfg = config_from_args(args, num_layers(model), num_query_heads(model))
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"act search: {exc}")
        cfg.backend = resolve_backend(args.backend, model_device(model), "act search")
        summary = run_search(model, tokenizer, cfg, args.out, dist=dist)
        if dist.main:
            fin, base = summary["final"], summary["baseline"]
            eprint(f"act search: {len(summary['candidates'])} candidates, "
                   f"{len(summary['rows'])} scored exactly, {len(summary['good'])} "
                   f"individually good, {len(summary['best_set'])} kept "
                   f"({time.time() - start:.0f} s)")
            if summary["no_gain"]:
                eprint(no_gain_line(summary))
            elif fin["val"]["n"]:
                eprint(f"validation accuracy {100 * base['val']['acc']:.1f} -> "
                       f"{100 * fin['val']['acc']:.1f}")
            print(f"profile: {args.out}/profile.json\nreport:  {args.out}/summary.md")
        return 0
    finally:
        dist.close()
