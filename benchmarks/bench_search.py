"""Head search: the fast scorer vs the naive loop (a full forward per candidate per sample).

Both score the same candidates (all heads of the given layers) on the same calibration samples
of SmolLM2-135M-Instruct; the script checks that every candidate gets the same per-sample
correctness and prediction (margins to 1e-4) and appends the timings to RESULTS.md.

    python benchmarks/bench_search.py                 # the default search: layers 2..28 (~15 min)
    python benchmarks/bench_search.py --samples 8 --layers 14,15 --layers 26:27

``--compare`` measures the first-order screen against exact scoring instead (see
:func:`compare` in ``bench_search_compare.py``)::

    python benchmarks/bench_search.py --compare --samples 240 --cache /tmp/act_exact
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_results  # noqa: E402


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call (synchronised on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    if "--compare" in sys.argv[1:]:
        from bench_search_compare import main as compare_main

        sys.argv.remove("--compare")
        return compare_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (mixed)")
    parser.add_argument("--tasks", default="sst2,arc_easy")
    parser.add_argument("--layers", action="append", default=None,
                        help="a layer group, as act search's --layers (repeatable; default: "
                             "2:28, the default search)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None,
                        help="ACT backend (default: triton on CUDA, torch on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--compare", action="store_true",
                        help="screen vs exact comparison (bench_search_compare.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from act_kernels import load_model
    from act_kernels.params import parse_index_list
    from act_kernels.scoring import calibration_examples, encode_examples, parse_tasks
    from act_kernels.search import Scorer, naive_candidates

    device = torch.device(args.device)
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    model, tok = load_model()
    model = model.to(device)
    # On the CPU the speed-up is taken on process CPU time (the machine is shared); on a GPU on
    # the synchronised wall time.
    on_gpu = device.type == "cuda"
    per_task = calibration_examples(parse_tasks(args.tasks), args.samples, 0)
    samples = []
    for task, exs in per_task.items():
        samples += encode_examples(task, exs, tok, False, None, start=len(samples))
    n = len(samples)
    tokens = sum(len(s.ids) for s in samples)
    heads = list(range(model.config.num_attention_heads))
    groups = args.layers or ["2:28"]
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    lines = [f"SmolLM2-135M-Instruct (float32, {where}, {backend} backend), {n} samples "
             f"({args.tasks}, {tokens} prompt tokens), all {len(heads)} heads of each layer; "
             "fast = baseline pass + candidates (layer reuse, one (sample, head) per batch "
             "row, last-position logits, sinkless rows skipped, positions before the first "
             "sink served from the plain pass's keys/values, suffixes of similar length "
             "batched across samples); naive = a full forward (batch 1, all logits) per "
             "candidate per sample. Per-sample correctness and predictions identical in every "
             "run (margins within 1e-4).", "",
             ("Speed-up on the synchronised wall time." if on_gpu else
              "Speed-up on the process CPU time (the machine is shared: wall times are shown "
              "but swing with other users' load)."), "",
             "| layers | candidates | naive (s) | fast (s) | speed-up | wall naive / fast (s) "
             "| rows run / all |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    totals = {"naive": 0.0, "fast": 0.0}
    per_layer_lines = []
    for group in groups:
        layers = parse_index_list(group, model.config.num_hidden_layers, "layer")
        todo = {l: heads for l in layers}
        scorer = Scorer(model, tok, batch_size=args.batch_size, backend=backend)
        fast, layer_done = {}, []

        def on_layer(layer, res):
            fast.update({(layer, h): r for h, r in res.items()})
            layer_done.append((layer, time.process_time(), time.perf_counter()))

        def run_fast():
            baseline = scorer.plain(n, samples)
            layer_done.append((-1, time.process_time(), time.perf_counter()))
            scorer.candidates(n, samples, baseline, todo, on_layer)

        out = {}
        cpu_fast, t_fast = _timed(run_fast, device)
        cpu_naive, t_naive = _timed(lambda: out.update(naive_candidates(
            model, tok, n, samples, todo, backend=backend)), device)
        naive = out
        for key, ref in naive.items():
            got = fast[key]
            if not (torch.equal(got.correct, ref.correct) and torch.equal(got.pred, ref.pred)):
                raise SystemExit(f"candidate {key}: fast and naive scores differ")
            torch.testing.assert_close(got.margin, ref.margin, atol=1e-4, rtol=1e-4)
        ran = int(sum(r.ran.sum() for r in fast.values()))
        total = len(fast) * n
        naive_t, fast_t = (t_naive, t_fast) if on_gpu else (cpu_naive, cpu_fast)
        ratio, wall_ratio = naive_t / fast_t, t_naive / t_fast
        print(f"layers {group}: naive {naive_t:.1f} s, fast {fast_t:.1f} s, x{ratio:.1f} "
              f"(wall {t_naive:.1f} / {t_fast:.1f} s, x{wall_ratio:.1f}; {ran}/{total} rows "
              "run), scores identical")
        lines.append(f"| {group} | {len(naive)} | {naive_t:.1f} | {fast_t:.1f} | "
                     f"**{ratio:.1f}x** | {t_naive:.1f} / {t_fast:.1f} ({wall_ratio:.1f}x) | "
                     f"{ran}/{total} |")
        totals["naive"] += naive_t
        totals["fast"] += fast_t
        # where the fast search spends its time: each layer's candidates against the naive
        # cost of as many candidates (a full forward each, whatever the layer)
        per_candidate = naive_t / len(naive)
        cells = []
        for (_, c0, w0), (layer, c1, w1) in zip(layer_done, layer_done[1:]):
            spent = (w1 - w0) if on_gpu else (c1 - c0)
            cells.append(f"{layer}: {per_candidate * len(todo[layer]) / spent:.1f}x")
        per_layer_lines.append(f"- layers {group}, speed-up of each layer's candidates "
                               f"(the baseline pass and set-up counted in the first): "
                               + ", ".join(cells))
    lines += ["", f"All groups: x{totals['naive'] / totals['fast']:.1f}.", ""] + per_layer_lines
    if not args.no_write:
        append_results("Head search: fast vs naive", "\n".join(lines))
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
