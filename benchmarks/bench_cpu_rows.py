"""The CPU decode step's calibrated rows: the compiled loop (``torch_backend/cpu_rows.py``)
against the torch step (its ops over every row), the measurement behind the loop's rule.

One op call per shape (``act_attention``, torch backend, one query row, no mask), both ways timed
alternately on the same inputs (best of 5 batches of ``--calls`` calls; warm data, so the figure
is the loop's arithmetic and dispatch against the step's, not the cold misses of a model's
step), at GQA shapes (SmolLM2 9/3 heads, D 64; Llama-3-8B 32/8, D 128; batch 1 and 4), with 1,
2, a quarter and all of the rows calibrated, below ``decode.DIRECT_MIN_KEYS`` keys.
``taken`` says whether the rule (``MAX_ROW_SHARE``, ``MAX_ROW_KEYS``) takes the loop there.

    python benchmarks/bench_cpu_rows.py --threads 2            # appended to RESULTS.md
    python benchmarks/bench_cpu_rows.py --threads 1 --no-write
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, publish  # noqa: E402

from act_kernels import act_attention  # noqa: E402
from act_kernels.torch_backend import cpu_rows  # noqa: E402

SHAPES = [(1, 9, 3, 64), (1, 32, 8, 128), (4, 32, 8, 128)]   # B, Hq, Hkv, D
KEYS = (512, 2048, 4000)


def inputs(bsz, hq, hkv, nk, dim, seed=1):
    """Random q, k, v with one key that takes a large share of every row (a sink to calibrate)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, 1, dim, generator=gen)
    k = torch.randn(bsz, hkv, nk, dim, generator=gen)
    v = torch.randn(bsz, hkv, nk, dim, generator=gen)
    k[:, :, nk // 3] = q[:, :: hq // hkv, 0] * 0.6
    return q, k, v


def best(fn, calls):
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def run(calls):
    rows = []
    rule = (cpu_rows.MAX_ROW_SHARE, cpu_rows.MAX_ROW_KEYS)
    try:
        for bsz, hq, hkv, dim in SHAPES:
            for nk in KEYS:
                q, k, v = inputs(bsz, hq, hkv, nk, dim)
                for count in sorted({1, 2, hq // 4, hq}):
                    heads = torch.zeros(bsz, hq, dtype=torch.bool)
                    heads[:, :count] = True
                    cpu_rows.MAX_ROW_SHARE, cpu_rows.MAX_ROW_KEYS = rule
                    taken = cpu_rows.rows_to_take(q, k, v, heads) is not None

                    def call():
                        act_attention(q, k, v, heads=heads, backend="torch")
                    cpu_rows.MAX_ROW_SHARE, cpu_rows.MAX_ROW_KEYS = 1, 1 << 60
                    loop = best(call, calls)
                    cpu_rows.MAX_ROW_KEYS = 0
                    step = best(call, calls)
                    rows.append((bsz, hq, hkv, dim, nk, bsz * count, loop, step, taken))
    finally:
        cpu_rows.MAX_ROW_SHARE, cpu_rows.MAX_ROW_KEYS = rule
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if cpu_rows.numba is None:
        raise SystemExit("bench_cpu_rows.py needs numba (pip install act-kernels[cpu])")
    print(machine_line(), flush=True)
    lines = ["| B | Hq/Hkv | D | Nk | calibrated rows | rows x keys | loop us | torch step us "
             "| loop / step | rule takes the loop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for bsz, hq, hkv, dim, nk, count, loop, step, taken in run(args.calls):
        lines.append(f"| {bsz} | {hq}/{hkv} | {dim} | {nk} | {count} | {count * nk} | "
                     f"{loop * 1e6:.0f} | {step * 1e6:.0f} | {loop / step:.2f} | "
                     f"{'yes' if taken else 'no'} |")
    body = (f"{args.threads} thread(s); one decode call of the op per shape, best of 5 x "
            f"{args.calls} calls, both ways alternately on the same inputs. Rule: calibrated "
            f"rows <= 1/{cpu_rows.MAX_ROW_SHARE} of the rows and rows x keys <= "
            f"{cpu_rows.MAX_ROW_KEYS}.\n\n" + "\n".join(lines))
    publish("CPU decode: the calibrated rows' loop against the torch step (bench_cpu_rows.py)",
            body, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
