"""Sliding-window prefill on the CPU: the torch backend with ``window=W`` against SDPA with the
equivalent band mask, and against the same calibrated call without a window (full causal).

Shape: SmolLM2's attention (B=1, Hq=9, Hkv=3, D=64), fp32, N=16384 by default, W=512 and 4096.
Inputs carry planted sinks every 1024 keys (about +8 on their logits), so the calibrated calls
have sinks to find at both widths (the table counts them). The contenders are timed in turn
(``interleaved_medians``; SDPA's band call, 30 s at N=16384, once), so the ratios come from one
run. ``--before REV`` adds the windowed calls of the torch backend at git revision REV. Goal
(issue 12): at W=512, N=16384, a calibrated windowed call is at least 10x faster than the full
causal calibrated call.

    python benchmarks/bench_window.py --threads 1 --before REV   # appended to RESULTS.md
    python benchmarks/bench_window.py --n 2048 --no-write         # a quick check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
from bench_attention import (ALL_HEADS, HKV, HQ, TWO_HEADS, interleaved_medians,  # noqa: E402
                             load_backend_at, random_inputs)
from common import append_results  # noqa: E402

from act_kernels import act_attention, torch_backend  # noqa: E402

SINK_EVERY, SINK_LOGIT = 1024, 8.0
BEFORE = None        # --before REV: the torch backend module at that revision


def with_backend(module, fn):
    """``fn`` run with the op dispatching to ``module``'s torch backend (it imports it per call)."""
    def run():
        today = torch_backend.act_attention_torch
        torch_backend.act_attention_torch = module.act_attention_torch
        try:
            return fn()
        finally:
            torch_backend.act_attention_torch = today
    return run


def band_mask(n: int, w: int) -> torch.Tensor:
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (cols <= rows) & (cols > rows - w)


def calls_for(n: int, w: int, q, k, v):
    mask = band_mask(n, w)
    kk, vv = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    out = {f"SDPA band W={w}": lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)}
    for name, heads in (("none", None), ("2/9", TWO_HEADS), ("9/9", ALL_HEADS)):
        out[f"torch W={w} {name}"] = (lambda h=heads: act_attention(
            q, k, v, heads=h, window=w, backend="torch"))
        if BEFORE is not None and heads is not None:
            out[f"before W={w} {name}"] = with_backend(BEFORE, out[f"torch W={w} {name}"])
    return out


def sink_count(q, k, v, w=None) -> int:
    """Sinks a call with every head calibrated finds (summed over heads)."""
    _, stats = act_attention(q, k, v, heads=ALL_HEADS, window=w, backend="torch",
                             return_stats=True)
    return int(stats.sinks.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--before", type=str, default=None, metavar="REV",
                        help="also time the windowed calls of the torch backend at revision REV")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by process CPU time (needs --threads 1; see bench_attention)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-time needs --threads 1 (CPU time of several threads adds up)")
        bench_attention.CLOCK = time.process_time
    global BEFORE
    if args.before:
        BEFORE = load_backend_at(args.before)
    n = args.n
    q, k, v = random_inputs(n, n, tuple(range(SINK_EVERY, n, SINK_EVERY)), SINK_LOGIT)
    calls = {}
    for w in args.windows:
        calls.update(calls_for(n, w, q, k, v))
    calls["torch causal 2/9"] = lambda: act_attention(q, k, v, heads=TWO_HEADS, backend="torch")
    calls["torch causal 9/9"] = lambda: act_attention(q, k, v, heads=ALL_HEADS, backend="torch")
    once = {name: 1 for name in calls if name.startswith("SDPA")}
    times = interleaved_medians(calls, args.repeat, once)
    sinks = {w: sink_count(q, k, v, w) for w in args.windows}
    sinks[None] = sink_count(q, k, v)
    lines = ["| call | seconds | vs SDPA band (same W) | full causal calibrated / this |",
             "|---|---|---|---|"]
    for name, t in times.items():
        w = name.split("W=")[1].split()[0] if "W=" in name else None
        sdpa = times.get(f"SDPA band W={w}") if w else None
        full = None
        if name.endswith("2/9") or name.endswith("9/9"):
            full = times[f"torch causal {name.split()[-1]}"]
        lines.append(f"| {name} | {t:.3f} | {'' if sdpa is None else f'{t / sdpa:.2f}x'} | "
                     f"{'' if full is None or 'causal' in name else f'{full / t:.1f}x'} |")
    found = ", ".join(f"{'causal' if w is None else f'W={w}'}: {c}" for w, c in sinks.items())
    clock = "CPU time" if args.cpu_time else "wall time"
    body = (f"Windowed prefill, N={n}, B=1, Hq={HQ}, Hkv={HKV}, D=64, fp32, sinks planted every "
            f"{SINK_EVERY} keys (+{SINK_LOGIT:g} on their logits; sinks found over the 9 heads, "
            f"{found}); median of {args.repeat} interleaved runs ({clock}; SDPA band: one run)."
            "\n\n" + "\n".join(lines))
    print(body)
    if not args.no_write:
        append_results("Sliding-window prefill (bench_window.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
