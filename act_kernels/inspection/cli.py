"""The ``act inspect`` command: ``add_arguments(parser)`` and ``run(args)``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..cli_args import add_model_arguments, deprecated_alias
from ..params import DEFAULT_BETA, DEFAULT_TAU, check_range, parse_index_list
from .collect import DEFAULT_TOP, DEFAULT_WINDOW, SinkReport, collect_sinks
from .report import JSON_NAME, write_report


def parse_layers(spec: Optional[str], num_layers: int) -> Optional[List[int]]:
    """``None`` / ``"all"`` -> all; ``"2:28"`` (inclusive), ``"3,5,-1"`` -> sorted indices."""
    return parse_index_list(spec, num_layers, "layer")


def parse_heads(spec: Optional[str], num_layers: int, num_heads: int
                ) -> Optional[List[Tuple[int, int]]]:
    """``"5:3,12:0"`` (LAYER:HEAD pairs) -> ``[(5, 3), (12, 0)]``; ``None`` -> ``None``."""
    if spec is None or not spec.strip():
        return None
    pairs = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        sep = next((s for s in (":", ".", "/") if s in item), None)
        if sep is None:
            raise ValueError(f"--heads expects LAYER:HEAD pairs such as 5:3,12:0; got {item!r}")
        a, b = item.split(sep, 1)
        layer, head = int(a), int(b)
        layer = layer + num_layers if layer < 0 else layer
        check_range([layer], num_layers, "layer", "act inspect")
        check_range([head], num_heads, "head", "act inspect")
        if (layer, head) not in pairs:
            pairs.append((layer, head))
    return pairs or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (one of)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--text", help="the text to look at")
    one.add_argument("--file", help="read the text from this file (UTF-8)")
    one.add_argument("--task", help="take the prompt of a task example (e.g. sst2)")
    src.add_argument("--index", type=int, default=0, help="example index with --task (default 0)")
    src.add_argument("--split", default=None, help="task split with --task (default: the "
                                                   "task's default split)")
    src.add_argument("--chat-template", action="store_true",
                     help="wrap the --task prompt in the tokenizer's chat template")
    src.add_argument("--max-tokens", type=int, default=4096,
                     help="keep the first N tokens (default 4096)")
    parser.add_argument("--out", required=True, help="output directory (PNGs + inspect.json)")
    add_model_arguments(parser)
    parser.add_argument("--profile", default=None,
                        help="profile.json: its heads are framed in the pictures and calibrated "
                             "during the run (see --mark-only)")
    parser.add_argument("--mark-only", action="store_true",
                        help="run the model uncalibrated; only mark the profile's heads")
    parser.add_argument("--layers", default=None,
                        help="layers to inspect: 'A:B' (inclusive), 'A,B,C' or 'all' (default)")
    parser.add_argument("--heads", default=None,
                        help="heads whose attention maps are drawn, LAYER:HEAD pairs, e.g. "
                             "'5:3,12:0' (default: the --top strongest)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"number of strongest heads drawn without --heads "
                             f"(default {DEFAULT_TOP})")
    parser.add_argument("--rows", type=int, default=DEFAULT_WINDOW,
                        help=f"rows (query positions) drawn in the attention maps (default "
                             f"{DEFAULT_WINDOW}; was --window); statistics always cover the "
                             "whole input")
    parser.add_argument("--first-row", type=int, default=0,
                        help="first row drawn in the attention maps (default 0; was "
                             "--window-start)")
    deprecated_alias(parser, "--window", "--rows", type=int)
    deprecated_alias(parser, "--window-start", "--first-row", type=int)
    parser.add_argument("--beta", type=float, default=None,
                        help=f"share of sink attention kept (default: the profile's, else "
                             f"{DEFAULT_BETA:g})")
    parser.add_argument("--tau", type=float, default=None,
                        help=f"sink threshold (default: the profile's, else {DEFAULT_TAU:g})")
    parser.add_argument("--heads-csv", default=None,
                        help="heads.csv of an `act search`: per-head score deltas as a heat map")
    parser.add_argument("--dpi", type=int, default=110)


def _read_text(args, tokenizer) -> Tuple[str, bool, str]:
    """``(text, add_special_tokens, description)`` from --text / --file / --task."""
    if args.text is not None:
        return args.text, True, "text"
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            return f.read(), True, f"file {args.file}"
    from ..tasks import get_task, load_examples

    task = get_task(args.task)
    examples = load_examples(task, split=args.split)
    if not 0 <= args.index < len(examples):
        raise ValueError(f"--index {args.index} is out of range: {task.name} has "
                         f"{len(examples)} examples")
    example = examples[args.index]
    prompt = task.build_prompt(example, tokenizer, chat_template=bool(args.chat_template))
    return prompt, not args.chat_template, f"{task.name} example {args.index}"


def _check_files(args) -> None:
    if args.rows <= 0:
        raise ValueError(f"--rows must be positive, got {args.rows}")
    if args.profile is not None and not os.path.isfile(args.profile):
        raise FileNotFoundError(f"no profile file {args.profile!r}")
    if args.heads_csv is not None and not os.path.isfile(args.heads_csv):
        raise FileNotFoundError(f"no heads.csv file {args.heads_csv!r}")


def _print_summary(report: SinkReport, data: dict, what: str, out_dir: str) -> None:
    count, mass = report.sink_count(), report.mean_sink_mass()
    print(f"act inspect: {what}, {report.num_tokens} tokens, {len(report.layers)} layers x "
          f"{report.num_heads} heads, tau={report.tau:g}, beta={report.beta:g}")
    print(f"  heads with sinks beyond the first token: {int((count > 0).sum())} of {count.size}")
    labels = report.labels
    freq = report.token_sink_frequency()
    top_tokens = [j for j in np.argsort(-freq, kind="stable")[:5] if freq[j] > 0]
    if top_tokens:
        print("  most frequent sinks: " + ", ".join(
            f"'{labels[j]}'@{j} ({100 * freq[j]:.0f}% of heads)" for j in top_tokens))
    for rec in data["maps"]:
        li = report.layer_index(rec["layer"])
        print(f"  map L{rec['layer']} H{rec['head']}: {int(count[li, rec['head']])} sinks, "
              f"mean sink mass {mass[li, rec['head']]:.3f} -> {rec['png']}")
    figs = data["figures"]
    print(f"  grid: {figs['grid']['png']}")
    print(f"  tokens: {figs['token_sinks']['png']}")
    if "head_deltas" in figs:
        print(f"  head deltas: {figs['head_deltas']['png']}")
    print(f"  numbers: {Path(out_dir) / JSON_NAME}")


def run(args) -> int:
    from ..cli_args import load_for_args
    from ..modelinfo import num_layers as model_num_layers, num_query_heads
    from ..profiles import ACTProfile

    _check_files(args)
    profile = ACTProfile.load(args.profile) if args.profile is not None else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_args(args, device, "act inspect")
    num_layers, num_heads = model_num_layers(model), num_query_heads(model)
    layers = parse_layers(args.layers, num_layers)
    map_heads = parse_heads(args.heads, num_layers, num_heads)
    text, special, what = _read_text(args, tokenizer)
    start = max(0, args.first_row)
    capture = sorted({layer for layer, _ in map_heads}) if map_heads else None
    if map_heads:
        layers = sorted(set(layers or range(num_layers)) | set(capture))
    report = collect_sinks(model, tokenizer, text, profile=profile, layers=layers,
                           beta=args.beta, tau=args.tau,
                           window=(start, start + args.rows), capture_layers=capture,
                           run_calibrated=not args.mark_only, add_special_tokens=special,
                           max_tokens=args.max_tokens)
    data = write_report(report, args.out, heads_csv=args.heads_csv, map_heads=map_heads,
                        top=args.top, dpi=args.dpi)
    _print_summary(report, data, what, args.out)
    return 0
