"""Benchmark the Triton backend of ACT against SDPA (flash), the torch backend and eager.

    python benchmarks/bench_triton.py            # full sweep, appends to benchmarks/RESULTS.md
    python benchmarks/bench_triton.py --quick    # a few sizes

Prefill: bf16, causal, Nq == Nk = N in 1k..16k, D in {64, 128}, B * N = 16k tokens, H * D = 2048,
with 0 %, 25 % and 100 % of the heads calibrated. Reports TFLOP/s (causal attention FLOPs counted
as FlashAttention's benchmarks count them, ``4 * B * H * N^2 * D / 2``, the same count for every
method so ratios are time ratios) and the time ratio to SDPA (and FlashAttention-2 if installed). Decode: one query, GQA 32/8, D = 128, B = 8, Nk 1k..128k, latency
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
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sdpa(q, k, v, causal, gqa=False):
    """PyTorch SDPA; on CUDA restricted to the flash kernel (GQA may fall back to the others)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if q.is_cuda:
        backends = [SDPBackend.FLASH_ATTENTION]
        if gqa:
            backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    else:
        backends = [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def flash_attn():
    """FlashAttention-2's ``flash_attn_func`` taking our [B, H, N, D] layout, or None."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None

    def run(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               causal=causal)
    return run


def time_ms(fn):
    """Median time of ``fn()`` in ms: ``triton.testing.do_bench`` on CUDA; on the CPU the wall
    time of one call after a warm-up one (the CPU dry runs only check that the code path works).
    NaN if it fails."""
    try:
        fn()
        if torch.cuda.is_available():
            import triton.testing
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")
    except Exception as exc:  # a missing backend must not stop the sweep
        print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return float("nan")


def causal_flops(bsz, hq, n, dim):
    """FLOPs of a causal attention forward as FlashAttention's benchmarks count them:
    two matmuls of 2 B H N^2 D each, halved by the causal mask."""
    return 4 * bsz * hq * n * n * dim / 2


def _heads(hq, frac, device):
    """The first ``frac`` of the heads, or None (plain attention) for none."""
    mask = torch.zeros(hq, dtype=torch.bool, device=device)
    mask[: int(round(frac * hq))] = True
    return mask if int(round(frac * hq)) > 0 else None


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prefill(sizes, dims, fracs, methods=("triton", "torch", "eager"), eager_max=4096,
            device="cuda", tokens=16384, width=2048, dtype=torch.bfloat16):
    """Causal prefill, Nq == Nk = N, B * N = ``tokens``, H * D = ``width``: one row per
    (D, N, fraction of heads calibrated) with ms, TFLOP/s and ratios to SDPA (and to
    FlashAttention-2 when it is installed)."""
    from act_kernels import act_attention
    fa = flash_attn() if device != "cpu" else None
    rows = []
    for dim in dims:
        hq = max(1, width // dim)
        for n in sizes:
            bsz = max(1, tokens // n)
            g = torch.Generator(device=device).manual_seed(n + dim)
            q, k, v = (torch.randn(bsz, hq, n, dim, device=device, dtype=dtype, generator=g)
                       for _ in range(3))
            flops = causal_flops(bsz, hq, n, dim)
            base = {"sdpa_ms": time_ms(lambda: sdpa(q, k, v, True))}
            if fa is not None:
                base["flash_attn_ms"] = time_ms(lambda: fa(q, k, v, True))
            for frac in fracs:
                heads = _heads(hq, frac, q.device)
                row = {"D": dim, "N": n, "B": bsz, "H": hq, "calibrated": f"{int(frac * 100)}%",
                       **base}
                for method in methods:
                    if method == "eager" and n > eager_max:
                        row["eager_ms"] = float("nan")
                        continue
                    row[f"{method}_ms"] = time_ms(lambda: act_attention(
                        q, k, v, heads=heads, backend=method))
                for key in [m for m in ("sdpa", "flash_attn", *methods) if f"{m}_ms" in row]:
                    row[f"{key}_tflops"] = flops / (row[f"{key}_ms"] * 1e-3) / 1e12
                best = min(row["sdpa_ms"], row.get("flash_attn_ms", float("inf")))
                row["triton/sdpa"] = row.get("triton_ms", float("nan")) / row["sdpa_ms"]
                row["triton_throughput_vs_best"] = best / row.get("triton_ms", float("nan"))
                if "torch_ms" in row and "triton_ms" in row:
                    row["torch/triton"] = row["torch_ms"] / row["triton_ms"]
                print("  " + ", ".join(f"{key} {_fmt(val)}" for key, val in row.items()),
                      flush=True)
                rows.append(row)
            del q, k, v
            _free()
    return rows


def decode(lengths, fracs, methods=("triton", "torch"), bsz=8, hq=32, hkv=8, dim=128,
           device="cuda", dtype=torch.bfloat16):
    """One query against Nk keys (GQA): latency against SDPA and the K/V bytes per second."""
    from act_kernels import act_attention
    rows = []
    for nk in lengths:
        g = torch.Generator(device=device).manual_seed(nk)
        q = torch.randn(bsz, hq, 1, dim, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(bsz, hkv, nk, dim, device=device, dtype=dtype, generator=g)
                for _ in range(2))
        t_sdpa = time_ms(lambda: sdpa(q, k, v, False, gqa=True))
        kv_bytes = 2 * bsz * hkv * nk * dim * k.element_size()
        for frac in fracs:
            heads = _heads(hq, frac, q.device)
            row = {"Nk": nk, "calibrated": f"{int(frac * 100)}%", "sdpa_us": t_sdpa * 1e3}
            for method in methods:
                row[f"{method}_us"] = 1e3 * time_ms(lambda: act_attention(
                    q, k, v, heads=heads, backend=method))
            row["triton/sdpa"] = row.get("triton_us", float("nan")) / row["sdpa_us"]
            row["triton_GB/s"] = kv_bytes / (row.get("triton_us", float("nan")) * 1e-6) / 1e9
            row["sdpa_GB/s"] = kv_bytes / (row["sdpa_us"] * 1e-6) / 1e9
            print("  " + ", ".join(f"{key} {_fmt(val)}" for key, val in row.items()), flush=True)
            rows.append(row)
        del k, v
        _free()
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
    pre = prefill(sizes, dims, fracs, eager_max=args.eager_max)
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
