"""act_attention's torch backend vs SDPA vs the eager reference (issues 2 and 14).

SmolLM2's attention shape: B=1, Hq=9, Hkv=3, D=64, float32. For each N: plain SDPA (the faster
of its GQA call and a call on repeated k/v), the torch backend with no head, 2 of 9 and all 9
heads calibrated, all 9 again on inputs with planted sinks (random inputs have none, so the
calibration's correction never runs on them), and the eager reference where its full maps fit.
Then decode (Nq=1), the same contenders. Every contender of one size is timed interleaved with
SDPA, so ratios come from the same moments of a shared machine. Heads are passed as bool masks
built once, as the Transformers integration passes them.

    python benchmarks/bench_attention.py            # the full table, appended to RESULTS.md
    python benchmarks/bench_attention.py --quick    # N up to 2048, no file written
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, exact_rss_mode, extra_peak_bytes, median_time  # noqa: E402

from act_kernels import act_attention, torch_backend  # noqa: E402

HQ, HKV, D = 9, 3, 64
TWO_HEADS = torch.zeros(HQ, dtype=torch.bool)
TWO_HEADS[[2, 6]] = True
ALL_HEADS = torch.ones(HQ, dtype=torch.bool)
EAGER_MAX_N = 4096
SINK_LOGIT = 4.0          # planted sinks: keys every query aligns with, about +4 on their logits


def sdpa_best(q, k, v, causal=True):
    """The faster of SDPA's GQA call and its call on repeated k/v (repeat included)."""
    gqa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa: E731

    def repeated():
        kk = k.repeat_interleave(HQ // HKV, dim=1)
        vv = v.repeat_interleave(HQ // HKV, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)
    return gqa, repeated


def random_inputs(nq, nk, sinks=(), sink_logit=SINK_LOGIT):
    """q ``[1, Hq, Nq, D]``, k, v ``[1, Hkv, Nk, D]``, standard normal; ``sinks`` lists key
    positions planted as attention sinks (they share a direction with every query, which adds
    about ``sink_logit`` to their logits)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, HQ, nq, D), torch.randn(1, HKV, nk, D), torch.randn(1, HKV, nk, D)
    if sinks:
        u = torch.nn.functional.normalize(torch.randn(D), dim=0) * (sink_logit * D ** 0.5) ** 0.5
        q += u
        k[:, :, list(sinks)] = u + 0.3 * torch.randn(1, HKV, len(sinks), D)
    return q, k, v


def planted(n):
    """Three sink positions spread over the sequence (not the first key, never a sink)."""
    return (n // 8, n // 2, n - n // 8)


def prefill_inputs(n):
    return random_inputs(n, n)


BEFORE = None    # --before REV: the torch backend module as it was at that commit


def load_backend_at(rev: str):
    """The torch backend at git revision ``rev`` (``act_kernels/torch_backend.py`` or the
    ``torch_backend/`` package), as a module, for a same-run before/after comparison.

    The package as it was at ``rev`` is extracted to a temporary folder and imported under its
    own name without running its ``__init__`` (no second registration of the op): the backend's
    package-relative imports (``sinks``, ``calibration``, ...) resolve to that revision's modules.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(["git", "archive", rev, "act_kernels"], cwd=root, check=True,
                             capture_output=True).stdout
    folder = tempfile.mkdtemp(prefix="act_kernels_at_")
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder)
    name = "act_kernels_at_" + "".join(c if c.isalnum() else "_" for c in rev)
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(folder, "act_kernels")]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.torch_backend")


def torch_calls(q, k, v, q_s, k_s, v_s):
    """The torch backend's contenders (``*_s``: the inputs with planted sinks)."""
    calls = {
        "torch, 0 heads": lambda: act_attention(q, k, v, backend="torch"),
        "torch, 2/9 heads": lambda: act_attention(q, k, v, heads=TWO_HEADS, backend="torch"),
        "torch, 9/9 heads": lambda: act_attention(q, k, v, heads=ALL_HEADS, backend="torch"),
        "torch, 9/9 heads, sinks": lambda: act_attention(q_s, k_s, v_s, heads=ALL_HEADS,
                                                         backend="torch"),
    }
    if BEFORE is not None:   # the same op call, dispatched to the backend of --before
        for name, heads in (("2/9", TWO_HEADS), ("9/9", ALL_HEADS)):
            calls[f"before, {name} heads"] = lambda heads=heads: call_before(q, k, v, heads)
        calls["before, 9/9 heads, sinks"] = lambda: call_before(q_s, k_s, v_s, ALL_HEADS)
    return calls


def call_before(q, k, v, heads):
    today = torch_backend.act_attention_torch
    torch_backend.act_attention_torch = BEFORE.act_attention_torch   # the op imports it per call
    try:
        return act_attention(q, k, v, heads=heads, backend="torch")
    finally:
        torch_backend.act_attention_torch = today


def prefill_calls(q, k, v):
    n = q.shape[2]
    gqa, repeated = sdpa_best(q, k, v)
    calls = {"sdpa gqa": gqa, "sdpa repeat-kv": repeated}
    calls.update(torch_calls(q, k, v, *random_inputs(n, n, planted(n))))
    if n <= EAGER_MAX_N:
        calls["eager, 9/9 heads"] = lambda: act_attention(q, k, v, heads=ALL_HEADS,
                                                        backend="eager")
    return calls


CLOCK = time.perf_counter     # --cpu-time: time.process_time


def interleaved_medians(calls, reps, max_reps=None):
    """Median time of each call, the calls timed in turn ``reps`` times (``max_reps``: a
    per-call cap for slow ones). Each round times the calls in its own (seeded) random order, so
    that no call always follows the same one: at decode sizes a call measured 1.6x of SDPA right
    after SDPA's repeat-kv call (which allocates) and 1.0x elsewhere."""
    for fn in calls.values():       # warm-up
        fn()
    times = {name: [] for name in calls}
    for rep in range(reps):
        order = list(calls.items())
        random.Random(rep).shuffle(order)
        for name, fn in order:
            if max_reps and name in max_reps and len(times[name]) >= max_reps[name]:
                continue
            times[name].append(median_time(fn, 1, warmup=0, clock=CLOCK))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_prefill(sizes, repeat):
    """Times first (every call of one size interleaved, medians), then peak memory."""
    rows = []
    for n in sizes:
        calls = prefill_calls(*prefill_inputs(n))
        reps = repeat if n <= 4096 else max(2, repeat // 2)
        row = {"N": n}
        row.update(interleaved_medians(calls, reps, {"eager, 9/9 heads": 2}))
        row["sdpa_s"] = min(row["sdpa gqa"], row["sdpa repeat-kv"])
        row["sdpa_call"] = "gqa" if row["sdpa gqa"] <= row["sdpa repeat-kv"] else "repeat-kv"
        rows.append(row)
        print(row, flush=True)
    exact_rss_mode()
    for row in rows:
        calls = prefill_calls(*prefill_inputs(row["N"]))
        for name, fn in calls.items():
            row[name + " mem"] = extra_peak_bytes(fn)
        row["sdpa_mem"] = row[f"sdpa {row['sdpa_call']} mem"]
        print({k: v for k, v in row.items() if k.endswith("mem")}, flush=True)
    return rows


def bench_decode(sizes, repeat):
    rows = []
    for nk in sizes:
        q, k, v = random_inputs(1, nk)
        gqa, repeated = sdpa_best(q, k, v, causal=False)
        calls = {"sdpa gqa": gqa, "sdpa repeat-kv": repeated}
        calls.update(torch_calls(q, k, v, *random_inputs(1, nk, planted(nk))))
        row = {"Nk": nk}
        row.update(interleaved_medians(calls, repeat * 20))
        row["sdpa_s"] = min(row["sdpa gqa"], row["sdpa repeat-kv"])
        rows.append(row)
        print(row, flush=True)
    return rows


def to_markdown(prefill, decode) -> str:
    mib = 1 << 20
    full_maps = lambda n: HQ * n * n * 4  # noqa: E731  (the fp32 maps of all heads)
    lines = ["### Prefill (B=1, Hq=9, Hkv=3, D=64, fp32, causal): time as a ratio of SDPA",
             "",
             "| N | SDPA (s) | torch 0 heads | torch 2/9 | torch 9/9 | torch 9/9, sinks | "
             "eager 9/9 | extra peak, torch 9/9 | as % of the full maps | extra peak, SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in prefill:
        s = r["sdpa_s"]
        eager = f"{r['eager, 9/9 heads'] / s:.2f}x" if "eager, 9/9 heads" in r else "(does not fit)"
        mem = r["torch, 9/9 heads mem"]
        lines.append(
            f"| {r['N']} | {s:.4f} ({r['sdpa_call']}) | {r['torch, 0 heads'] / s:.2f}x | "
            f"{r['torch, 2/9 heads'] / s:.2f}x | {r['torch, 9/9 heads'] / s:.2f}x | "
            f"{r['torch, 9/9 heads, sinks'] / s:.2f}x | {eager} | "
            f"{mem / mib:.1f} MiB | {100 * mem / full_maps(r['N']):.2f}% | "
            f"{r['sdpa_mem'] / mib:.1f} MiB |")
    speedups = [f"N={r['N']}: {r['eager, 9/9 heads'] / r['torch, 9/9 heads']:.1f}x"
                for r in prefill if "eager, 9/9 heads" in r]
    lines += ["", "torch backend (9/9 heads) vs the eager reference: " + ", ".join(speedups), "",
              "### Decode (Nq=1): time as a ratio of SDPA", "",
              "| Nk | SDPA (ms) | torch 0 heads | torch 2/9 | torch 9/9 | torch 9/9, sinks |",
              "|---|---|---|---|---|---|"]
    for r in decode:
        s = r["sdpa_s"]
        lines.append(f"| {r['Nk']} | {1e3 * s:.3f} | {r['torch, 0 heads'] / s:.2f}x | "
                     f"{r['torch, 2/9 heads'] / s:.2f}x | {r['torch, 9/9 heads'] / s:.2f}x | "
                     f"{r['torch, 9/9 heads, sinks'] / s:.2f}x |")
    if BEFORE is not None:
        lines += before_after(prefill, decode)
    return "\n".join(lines)


def before_after(prefill, decode) -> list:
    """The torch backend at ``--before`` vs now, as ratios of SDPA from the same run."""
    rev = BEFORE.__name__.split("_at_")[1].rpartition(".")[0]   # act_kernels_at_REV.torch_backend
    lines = ["", f"### Before ({rev}) and now, same run: "
             "time as a ratio of SDPA", "",
             "| call | 2/9 before | 2/9 now | 9/9 before | 9/9 now | 9/9 sinks before | "
             "9/9 sinks now |", "|---|---|---|---|---|---|---|"]
    for label, rows, key in (("prefill N", prefill, "N"), ("decode Nk", decode, "Nk")):
        for r in rows:
            s = r["sdpa_s"]
            lines.append(f"| {label}={r[key]} | {r['before, 2/9 heads'] / s:.2f}x | "
                         f"{r['torch, 2/9 heads'] / s:.2f}x | {r['before, 9/9 heads'] / s:.2f}x | "
                         f"{r['torch, 9/9 heads'] / s:.2f}x | "
                         f"{r['before, 9/9 heads, sinks'] / s:.2f}x | "
                         f"{r['torch, 9/9 heads, sinks'] / s:.2f}x |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no RESULTS.md entry")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated prefill N")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--decode-sizes", type=str, default=None, help="comma-separated decode Nk")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--before", type=str, default=None, metavar="REV",
                        help="also time the torch backend as it was at git revision REV")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by process CPU time, not wall time (use with --threads 1 on "
                             "a shared machine: waits for a core are left out)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global BEFORE, CLOCK
    if args.before:
        BEFORE = load_backend_at(args.before)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-time needs --threads 1 (CPU time of several threads adds up)")
        CLOCK = time.process_time
    sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes else
             [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    decode_sizes = ([int(x) for x in args.decode_sizes.split(",")] if args.decode_sizes else
                    [1024, 8192] if args.quick else [1024, 8192, 32768])
    prefill = bench_prefill(sizes, args.repeat)
    decode = bench_decode(decode_sizes, args.repeat)
    table = to_markdown(prefill, decode)
    print(table)
    if not args.quick:
        append_results("bench_attention: torch backend vs SDPA vs eager (CPU)", table)


if __name__ == "__main__":
    main()
