"""``act lm-eval ARGS...``: lm-evaluation-harness's own command line with the ``act`` model
registered (see :mod:`act_kernels.lmeval`). Kept apart from that module so that ``act``
can say what to install when lm-eval is missing."""
from __future__ import annotations

import argparse
import importlib.util


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every argument, options included, belongs to lm-eval: none is an option of this parser
    # (with a prefix character no argument starts with, "--model" is not taken for one).
    parser.prefix_chars = "\0"
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="lm-eval's arguments, e.g. run --model act --model_args "
                             "profile=profile.json --tasks arc_easy (lm-eval -h: act lm-eval -h)")


def run(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("act lm-eval: lm-evaluation-harness is not installed; "
                         "pip install 'act-kernels[lmeval]'")
    from .lmeval import cli_main

    return cli_main(args.lm_eval_args)
