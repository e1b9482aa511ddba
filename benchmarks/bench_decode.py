"""SmolLM2-135M-Instruct decode steps: ACT (empty and typical profile) against sdpa, interleaved
step by step, plus what one step does (Python calls, tensor ops, per attention layer).

The typical profile runs twice: as users get it (the calibrated rows in the CPU loop of
``torch_backend/cpu_rows.py`` when numba is installed) and as the torch step (the loop switched
off during its steps, as without numba).

Each method is its own model object (same weights) with its own dynamic cache, prefilled with
the same prompt; then the methods take one decode step each in turn (the order reversed every
other round), so a noisy neighbour slows all of them alike. Each step's time is taken with the
thread's CPU clock (waiting for a core is not counted) and the wall clock; the figure is the
median over rounds of the per-round ratio sdpa time / method time (tokens/s relative to sdpa).

The counts (``--counts``) are exact, not timed: Python function calls per decode step
(cProfile) and ATen ops per decode step (torch.profiler), for each method, and their
difference per attention layer.

    python benchmarks/bench_decode.py --threads 1          # ratios, appended to RESULTS.md
    python benchmarks/bench_decode.py --threads 2 --no-write
    python benchmarks/bench_decode.py --counts --no-write  # what a step does
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import prefill_inputs, set_method, typical_profile  # noqa: E402
from common import append_results, machine_line  # noqa: E402

from act_kernels import load_model  # noqa: E402
from act_kernels.torch_backend import cpu_rows  # noqa: E402

# "torch step": the typical profile with the CPU loop of torch_backend/cpu_rows.py switched off
# during its steps (the calibrated rows by torch ops, as without numba)
TORCH_STEP = "act_torch typical, torch step"
METHODS = ("sdpa", "act_torch empty", "act_torch typical", TORCH_STEP)


def prepared(methods, context):
    """``{method: [model, cache, next token, loop on]}`` after a prefill of ``context``
    tokens."""
    from transformers import DynamicCache

    runs = {}
    for method in methods:
        model, tok = load_model()
        set_method(model, "act_torch typical" if method == TORCH_STEP else method,
                   typical_profile(model))
        ids = prefill_inputs(tok, context)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        runs[method] = [model, cache, out.logits[:, -1:].argmax(-1), method != TORCH_STEP]
    return runs


def step(run) -> None:
    model, cache, nxt, loop = run
    limit = cpu_rows.MAX_ROW_KEYS
    cpu_rows.MAX_ROW_KEYS = limit if loop else 0
    try:
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    finally:
        cpu_rows.MAX_ROW_KEYS = limit
    run[2] = out.logits[:, -1:].argmax(-1)


def interleaved(runs, rounds: int, warmup: int):
    """Per method: the per-round (cpu, wall) seconds of one decode step."""
    times = {m: [] for m in runs}
    order = list(runs)
    for r in range(warmup + rounds):
        for method in (order if r % 2 == 0 else order[::-1]):
            cpu, wall = time.thread_time(), time.perf_counter()
            step(runs[method])
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            if r >= warmup:
                times[method].append((cpu, wall))
    return times


def ratios(times, method, clock: int) -> float:
    base = [t[clock] for t in times["sdpa"]]
    return statistics.median(b / t[clock] for b, t in zip(base, times[method]))


def counts(runs, steps: int):
    """Per method: (Python calls, ATen ops) per decode step, exact."""
    from torch.profiler import profile

    found = {}
    for method, run in runs.items():
        step(run)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step(run)
        prof.disable()
        calls = sum(v[1] for v in pstats.Stats(prof).stats.values()) / steps
        with profile() as p:
            for _ in range(steps):
                step(run)
        ops = sum(e.count for e in p.key_averages() if e.key.startswith("aten::")) / steps
        found[method] = (calls, ops)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=512, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=64, help="decode steps timed per method")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--counts", action="store_true",
                        help="count Python calls and ATen ops per step instead of timing")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    runs = prepared(METHODS, args.context)
    layers = runs["sdpa"][0].config.num_hidden_layers
    print(machine_line(), flush=True)

    if args.counts:
        found = counts(runs, steps=8)
        lines = ["| method | Python calls / step | ATen ops / step | Python calls / layer vs sdpa "
                 "| ATen ops / layer vs sdpa |", "|---|---:|---:|---:|---:|"]
        for method, (calls, ops) in found.items():
            lines.append(f"| {method} | {calls:.0f} | {ops:.0f} | "
                         f"{(calls - found['sdpa'][0]) / layers:+.1f} | "
                         f"{(ops - found['sdpa'][1]) / layers:+.1f} |")
        body = (f"Decode after {args.context} tokens, {layers} layers, counted over 8 steps "
                f"(exact, not timed).\n\n" + "\n".join(lines))
        title = "SmolLM2 decode step: what it does (bench_decode.py --counts)"
    else:
        times = interleaved(runs, args.rounds, args.warmup)
        lines = ["| method | step, CPU ms (median) | tokens/s vs sdpa, CPU time | "
                 "tokens/s vs sdpa, wall |", "|---|---:|---:|---:|"]
        for method in METHODS:
            cpu = statistics.median(t[0] for t in times[method]) * 1e3
            lines.append(f"| {method} | {cpu:.1f} | {ratios(times, method, 0):.3f}x | "
                         f"{ratios(times, method, 1):.3f}x |")
        body = (f"Decode after {args.context} tokens, {args.rounds} steps per method taken in "
                f"turn (order reversed every other round), {args.threads} thread(s); median of "
                f"the per-step ratios sdpa time / method time. Goal: typical >= 0.97x.\n\n"
                + "\n".join(lines))
        title = "SmolLM2 decode, interleaved steps (bench_decode.py)"
    print(body)
    if not args.no_write:
        append_results(title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
