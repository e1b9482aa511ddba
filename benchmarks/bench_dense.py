"""The torch backend's two prefill paths against each other: dense (every pair's whole P) and
pruned (bound pass, exact sums of the candidates, sink correction by the identity).

Where does the dense path stop paying? SmolLM2's attention layout (Hq=9, Hkv=3, D=64, float32),
inputs with planted sinks, all 9 or 2 of 9 heads calibrated, square causal prefills of N
tokens, batches of 1 and of 8 (the head search's batch). Each size times both paths in a
shuffled interleaved order (CPU time at 1 thread by default), so each ratio comes from one
stretch of a shared machine. ``torch_backend.dense.DENSE_MAX_ENTRIES`` is chosen from this table.

    python benchmarks/bench_dense.py              # appended to RESULTS.md
    python benchmarks/bench_dense.py --no-write
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, median_time  # noqa: E402

from act_kernels import act_attention  # noqa: E402
from act_kernels.torch_backend import dense  # noqa: E402

HQ, HKV, D = 9, 3, 64
SIZES = [(8, 32), (8, 59), (8, 96), (1, 64), (1, 128), (1, 160), (1, 192), (1, 256), (1, 384),
         (1, 512)]


def inputs(bsz: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, HQ, n, D, generator=gen)
    k = torch.randn(bsz, HKV, n, D, generator=gen)
    v = torch.randn(bsz, HKV, n, D, generator=gen)
    u = torch.randn(D, generator=gen)
    u = u / u.norm() * (4.0 * D ** 0.5) ** 0.5       # about +4 on the planted keys' logits
    q += u
    for j in {min(3, n - 1), n // 3}:
        k[:, :, j] = u + 0.3 * torch.randn(bsz, HKV, D, generator=gen)
    return q, k, v


def timed(bsz: int, n: int, heads: torch.Tensor, rounds: int, repeat: int) -> dict:
    q, k, v = inputs(bsz, n)
    call = lambda: act_attention(q, k, v, heads=heads, backend="torch")  # noqa: E731
    limits = {"dense": 1 << 40, "pruned": 0}
    best = {name: float("inf") for name in limits}
    saved = dense.DENSE_MAX_ENTRIES
    try:
        for _ in range(rounds):
            for name in random.sample(list(limits), len(limits)):
                dense.DENSE_MAX_ENTRIES = limits[name]
                best[name] = min(best[name], median_time(call, repeat=repeat,
                                                         clock=time.process_time))
    finally:
        dense.DENSE_MAX_ENTRIES = saved
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    masks = {"9/9": torch.ones(HQ, dtype=torch.bool),
             "2/9": torch.tensor([i in (2, 6) for i in range(HQ)])}
    lines = ["| B | N | entries a pair | heads | dense ms | pruned ms | pruned / dense | "
             "taken now |", "|---:|---:|---:|---|---:|---:|---:|---|"]
    for bsz, n in SIZES:
        for label, mask in masks.items():
            t = timed(bsz, n, mask, args.rounds, args.repeat)
            now = "dense" if dense.takes_dense_path(n, n) else "pruned"
            lines.append(f"| {bsz} | {n} | {n * n} | {label} | {1e3 * t['dense']:.2f} | "
                         f"{1e3 * t['pruned']:.2f} | {t['pruned'] / t['dense']:.2f} | {now} |")
            print(lines[-1], flush=True)
    body = (f"CPU time of one call (best of {args.rounds} shuffled rounds, each the median of "
            f"{args.repeat} calls), {args.threads} thread(s); `DENSE_MAX_ENTRIES` = "
            f"{dense.DENSE_MAX_ENTRIES}.\n\n" + "\n".join(lines))
    print(body)
    if not args.no_write:
        append_results("Torch backend: dense path vs pruned passes for short prefills "
                       "(bench_dense.py)", body)


if __name__ == "__main__":
    main()
