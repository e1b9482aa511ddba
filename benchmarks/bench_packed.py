"""Packed (padding-free) prefill vs the same sequences padded to a batch: SmolLM2-135M-Instruct.

Issue 21's goal: a packed batch of 8 x 512 tokens (one row, position ids restarting at each
sequence, no cache, no 2-D mask: Transformers builds its block-diagonal causal mask, which
``act_torch`` reads as ``segment_ids``) at least 0.9x the speed of the same tokens as a padded
batch ``[8, 512]``, 1 thread, same run. A second case has unequal lengths (the padded batch then
computes padding the packed row does not). Both with the benchmark's typical profile (2 heads in
every other layer, as ``bench_model.py``), float32, ``logits_to_keep=1``; the two layouts are
timed in alternating rounds and the medians compared (wall time and process CPU time).

    python benchmarks/bench_packed.py                       # appended to RESULTS.md
    python benchmarks/bench_packed.py --rounds 1 --no-write  # a quick check that it runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import prefill_inputs, typical_profile  # noqa: E402
from common import append_results, machine_line  # noqa: E402

from act_kernels import apply_profile, load_model  # noqa: E402

CASES = {"8 x 512": [512] * 8, "8 unequal (256..512)": [512, 448, 384, 320, 512, 256, 480, 400]}


def layouts(ids: torch.Tensor, lengths):
    """The same token sequences packed into one row and left-padded into a batch."""
    seqs, start = [], 0
    for n in lengths:
        seqs.append(ids[0, start:start + n])
        start += n
    packed = {"input_ids": torch.cat(seqs)[None],
              "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    width = max(lengths)
    batch = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        batch[b, width - len(s):] = s
        mask[b, width - len(s):] = 1
    return {"packed": packed, "padded": {"input_ids": batch, "attention_mask": mask}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    apply_profile(model, typical_profile(model), backend="torch")
    print(machine_line(), flush=True)
    lines = ["| case | tokens | packed s (wall / cpu) | padded s (wall / cpu) | packed speed / "
             "padded (wall / cpu) |", "|---|---|---|---|---|"]
    for case, lengths in CASES.items():
        ids = prefill_inputs(tok, sum(lengths))
        inputs = layouts(ids, lengths)

        def run(name):
            with torch.no_grad():
                model(**inputs[name], use_cache=False, logits_to_keep=1)

        for name in inputs:                                  # warm-up
            run(name)
        wall = {name: [] for name in inputs}
        cpu = {name: [] for name in inputs}
        for r in range(args.rounds):
            order = list(inputs) if r % 2 == 0 else list(inputs)[::-1]
            for name in order:
                w, c = time.perf_counter(), time.process_time()
                run(name)
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in inputs}
        p, q = med["packed"], med["padded"]
        line = (f"| {case} | {sum(lengths)} | {p[0]:.2f} / {p[1]:.2f} | {q[0]:.2f} / {q[1]:.2f} "
                f"| {q[0] / p[0]:.2f}x / {q[1] / p[1]:.2f}x |")
        print(line, flush=True)
        lines.append(line)
    body = "\n".join(lines) + (f"\n\n{args.rounds} alternating rounds, medians; typical "
                               "profile, act_torch, float32, logits_to_keep=1.\n")
    if not args.no_write:
        append_results("Packed vs padded prefill, SmolLM2-135M-Instruct (issue 21, "
                       "bench_packed.py)", body)


if __name__ == "__main__":
    main()
