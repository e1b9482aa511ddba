"""Benchmark the Triton backend of ACT against SDPA (flash), the torch backend and eager.

    python benchmarks/bench_triton.py            # full sweep, appends to benchmarks/RESULTS.md
    python benchmarks/bench_triton.py --quick    # a few sizes

Prefill: bf16, causal, Nq == Nk = N in 1k..16k, D in {64, 128}, B * N = 16k tokens, H * D = 2048,
with 0 %, 25 % and 100 % of the heads calibrated. Reports TFLOP/s (causal attention FLOPs,
``2 * 2 * B * H * N^2 * D / 2``, the same count for every method so ratios are time ratios) and
the time ratio to SDPA. Decode: one query, GQA 32/8, D = 128, B = 8, Nk 1k..128k, latency
against SDPA. Times are medians of ``triton.testing.do_bench``.

Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _sdpa_flash(q, k, v, causal, gqa=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    backends = [SDPBackend.FLASH_ATTENTION] if not gqa else [SDPBackend.FLASH_ATTENTION,
                                                             SDPBackend.EFFICIENT_ATTENTION,
                                                             SDPBackend.MATH]
    with sdpa_kernel(backends):
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _bench(fn):
    import triton.testing
    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")
    except Exception as exc:  # a missing backend must not stop the sweep
        print(f"    skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return float("nan")


def _heads(hq, frac, device):
    mask = torch.zeros(hq, dtype=torch.bool, device=device)
    mask[: int(round(frac * hq))] = True
    return mask if mask.any() else None


def prefill(sizes, dims, fracs, eager_max):
    from act_kernels import act_attention
    rows = []
    for dim in dims:
        hq = 2048 // dim
        for n in sizes:
            bsz = max(1, 16384 // n)
            g = torch.Generator(device="cuda").manual_seed(n + dim)
            q, k, v = (torch.randn(bsz, hq, n, dim, device="cuda", dtype=torch.bfloat16,
                                   generator=g) for _ in range(3))
            flops = 2 * 2 * bsz * hq * n * n * dim / 2
            t_sdpa = _bench(lambda: _sdpa_flash(q, k, v, True))
            for frac in fracs:
                heads = _heads(hq, frac, q.device)
                row = {"D": dim, "N": n, "B": bsz, "H": hq, "calibrated": f"{int(frac * 100)}%",
                       "sdpa_ms": t_sdpa}
                row["triton_ms"] = _bench(lambda: act_attention(q, k, v, heads=heads,
                                                                backend="triton"))
                row["torch_ms"] = _bench(lambda: act_attention(q, k, v, heads=heads,
                                                               backend="torch"))
                row["eager_ms"] = (_bench(lambda: act_attention(q, k, v, heads=heads,
                                                                backend="eager"))
                                   if n <= eager_max else float("nan"))
                for key in ("sdpa", "triton", "torch", "eager"):
                    row[f"{key}_tflops"] = flops / (row[f"{key}_ms"] * 1e-3) / 1e12
                row["triton/sdpa"] = row["triton_ms"] / t_sdpa
                row["torch/triton"] = row["torch_ms"] / row["triton_ms"]
                print(f"  D={dim} N={n} cal={row['calibrated']}: sdpa {t_sdpa:.3f} ms, triton "
                      f"{row['triton_ms']:.3f} ms ({row['triton/sdpa']:.2f}x sdpa), torch "
                      f"{row['torch_ms']:.3f} ms, eager {row['eager_ms']:.3f} ms", flush=True)
                rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def decode(lengths, fracs, bsz=8, hq=32, hkv=8, dim=128):
    from act_kernels import act_attention
    rows = []
    for nk in lengths:
        g = torch.Generator(device="cuda").manual_seed(nk)
        q = torch.randn(bsz, hq, 1, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(bsz, hkv, nk, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(2))
        t_sdpa = _bench(lambda: _sdpa_flash(q, k, v, False, gqa=True))
        for frac in fracs:
            heads = _heads(hq, frac, q.device)
            t = _bench(lambda: act_attention(q, k, v, heads=heads, backend="triton"))
            t_torch = _bench(lambda: act_attention(q, k, v, heads=heads, backend="torch"))
            kv_bytes = 2 * bsz * hkv * nk * dim * 2
            row = {"Nk": nk, "calibrated": f"{int(frac * 100)}%", "sdpa_us": t_sdpa * 1e3,
                   "triton_us": t * 1e3, "torch_us": t_torch * 1e3, "triton/sdpa": t / t_sdpa,
                   "triton_GB/s": kv_bytes / (t * 1e-3) / 1e9}
            print(f"  decode Nk={nk} cal={row['calibrated']}: sdpa {row['sdpa_us']:.1f} us, "
                  f"triton {row['triton_us']:.1f} us ({row['triton/sdpa']:.2f}x), torch "
                  f"{row['torch_us']:.1f} us", flush=True)
            rows.append(row)
        del k, v
        torch.cuda.empty_cache()
    return rows


def check(dim=64, n=1000):
    """One correctness spot check on the GPU against the torch backend and eager."""
    from act_kernels import act_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    k[:, :, 7] = 4 * q.mean(dim=2)               # a planted sink
    heads = torch.tensor([True, False, True, True], device="cuda")
    out = act_attention(q, k, v, heads=heads, backend="triton")
    ref = act_attention(q, k, v, heads=heads, backend="eager")
    return float((out.float() - ref.float()).abs().max())


def _fmt(v):
    if isinstance(v, float):
        return "nan" if v != v else (f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
    return str(v)


def _table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few sizes only")
    ap.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--eager-max", type=int, default=4096, help="largest N for eager")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device; the Triton benchmark needs a GPU. Nothing to do.")
        return 0
    import triton

    sizes = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    dims = [64, 128]
    fracs = [0.0, 0.25, 1.0]
    lengths = [1024, 16384] if args.quick else [1024, 4096, 16384, 65536, 131072]

    err = check()
    print(f"spot check: max |triton - eager| = {err:.2e} (bf16)")
    print("prefill (causal, bf16):")
    pre = prefill(sizes, dims, fracs, args.eager_max)
    print("decode (Nq = 1, bf16, B=8, Hq=32, Hkv=8, D=128):")
    dec = decode(lengths, fracs)

    dev = torch.cuda.get_device_name()
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    section = "\n".join([
        f"## bench_triton: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- machine: {dev}, {platform.node()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, CUDA {torch.version.cuda}, commit {commit}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- spot check max |triton - eager| (bf16, N=1000): {err:.2e}",
        "- times are medians of triton.testing.do_bench; TFLOP/s count causal attention FLOPs "
        "(4 B H N^2 D / 2) for every method",
        "",
        "### Prefill (causal, bf16, B*N = 16k, H*D = 2048)",
        "",
        _table(pre, ["D", "N", "B", "H", "calibrated", "sdpa_tflops", "triton_tflops",
                     "torch_tflops", "eager_tflops", "triton/sdpa", "torch/triton"]),
        "",
        "### Decode (Nq = 1, bf16, B = 8, Hq = 32, Hkv = 8, D = 128)",
        "",
        _table(dec, ["Nk", "calibrated", "sdpa_us", "triton_us", "torch_us", "triton/sdpa",
                     "triton_GB/s"]),
        "",
    ])
    if not args.no_write:
        new = not os.path.exists(args.results)
        with open(args.results, "a") as f:
            if new:
                f.write("# Benchmark results\n\n")
            f.write(section + "\n")
        print(f"appended to {args.results}")
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
