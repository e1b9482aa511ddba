"""Sliding-window prefill on the CPU: the torch backend with ``window=W`` against SDPA with the
equivalent band mask, and against the same calibrated call without a window (full causal).

Shape: SmolLM2's attention (B=1, Hq=9, Hkv=3, D=64), fp32, N=16384 by default, W=512 and 4096.
Inputs carry planted sinks every 256 keys, so the calibrated calls have sinks to find in every
window. The contenders of one size are timed in turn (``interleaved_medians``), so the ratios
come from one run. Goal (issue 12): at W=512, N=16384, a calibrated windowed call is at least
10x faster than the full causal calibrated call.

    python benchmarks/bench_window.py --threads 1            # appended to RESULTS.md
    python benchmarks/bench_window.py --n 2048 --no-write     # a quick check
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import ALL_HEADS, HKV, HQ, TWO_HEADS, interleaved_medians, random_inputs  # noqa: E402
from common import append_results  # noqa: E402

from act_kernels import act_attention  # noqa: E402


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
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n
    q, k, v = random_inputs(n, n, tuple(range(256, n, 256)))
    calls = {}
    for w in args.windows:
        calls.update(calls_for(n, w, q, k, v))
    calls["torch causal 2/9"] = lambda: act_attention(q, k, v, heads=TWO_HEADS, backend="torch")
    calls["torch causal 9/9"] = lambda: act_attention(q, k, v, heads=ALL_HEADS, backend="torch")
    times = interleaved_medians(calls, args.repeat)
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
    body = (f"Windowed prefill, N={n}, B=1, Hq={HQ}, Hkv={HKV}, D=64, fp32, sinks planted every "
            f"256 keys; median of {args.repeat} interleaved runs.\n\n" + "\n".join(lines))
    print(body)
    if not args.no_write:
        append_results("Sliding-window prefill (bench_window.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
