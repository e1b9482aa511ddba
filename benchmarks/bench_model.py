"""Whole-model speed of ACT in Transformers: SmolLM2-135M-Instruct prefill and decode.

Four ways to run the same model (float32, batch 1, greedy):

- ``sdpa``:             Transformers' default attention (no ACT);
- ``act_torch empty``:  ``attn_implementation="act_torch"`` with an empty profile;
- ``act_torch typical``: a typical profile, 2 heads in every other layer from 2 to 28
  (14 of 30 layers, the first two and the last left alone as in the reference code);
- ``eager hook``:       ACT the way the reference code does it: eager attention with the full
  probability maps of every layer, calibrated after the softmax (here through
  ``act_kernels.reference.act_attention_reference``), with the same profile.

Prefill: tokens/s of one forward over N tokens (``logits_to_keep=1``, so the LM head's
N x 49152 matmul, identical for every method, does not drown the attention). Decode: tokens/s
of single-token steps with a KV cache after a prompt of ``--decode-context`` tokens. The methods
are timed round-robin, so a noisy neighbour slows them all alike; the ratios are what counts.

Goals (CPU): typical >= 0.8x sdpa at 2048 prefill, >= 3x the eager hook; decode >= 0.85x sdpa.

    python benchmarks/bench_model.py                       # full sweep, appended to RESULTS.md
    python benchmarks/bench_model.py --quick --no-write    # a quick check that it runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_results, machine_line  # noqa: E402

from act_kernels import ACTProfile, apply_profile, load_model  # noqa: E402
from act_kernels.hf import remove_profile  # noqa: E402
from act_kernels.reference import act_attention_reference  # noqa: E402

HOOK_NAME = "act_bench_eager_hook"
_HOOK_PROFILE = {"profile": None}


def eager_hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager ACT: full maps for every head of every layer, calibration after the softmax."""
    bsz, hq = query.shape[:2]
    profile = _HOOK_PROFILE["profile"]
    heads = None
    idx = profile.heads.get(module.layer_idx) if profile is not None else None
    if idx:
        heads = torch.zeros(bsz, hq, dtype=torch.bool, device=query.device)
        heads[:, idx] = True
    # No padding in this benchmark: the eager mask is plain bottom-right causal.
    out, probs, _ = act_attention_reference(query, key, value, heads=heads,
                                            beta=profile.beta, tau=profile.tau, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_hook():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(HOOK_NAME, eager_hook)
    AttentionMaskInterface.register(HOOK_NAME, eager_mask)


def typical_profile(model) -> ACTProfile:
    n_layers = model.config.num_hidden_layers
    n_heads = model.config.num_attention_heads
    layers = range(2, n_layers - 1, 2)
    return ACTProfile.for_model(model, {l: sorted({l % n_heads, (l + 4) % n_heads})
                                        for l in layers},
                                provenance={"note": "benchmark profile, not searched"})


def set_method(model, method, profile):
    if method == "sdpa":
        remove_profile(model, "sdpa")
    elif method == "act_torch empty":
        apply_profile(model, ACTProfile(), backend="torch")
    elif method == "act_torch typical":
        apply_profile(model, profile, backend="torch")
    elif method == "eager hook":
        remove_profile(model, "sdpa")
        _HOOK_PROFILE["profile"] = profile
        model.set_attn_implementation(HOOK_NAME)
    else:
        raise ValueError(method)


def round_robin(model, methods, profile, make_fn, repeat, warmup=1):
    """Median seconds per method of ``make_fn(method)()``, timed in interleaved rounds."""
    fns = {}
    for m in methods:
        set_method(model, m, profile)
        fns[m] = make_fn(m)
        for _ in range(warmup):
            fns[m]()
    times = {m: [] for m in methods}
    for _ in range(repeat):
        for m in methods:
            set_method(model, m, profile)
            start = time.perf_counter()
            fns[m]()
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def prefill_inputs(tok, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Real text repeated, so attention looks like it does on real inputs (sinks included).
    text = ("The history of the lighthouse begins with fires lit on hills to guide ships. "
            "Later, towers were built, and lenses made the light visible far out at sea. ")
    ids = tok(text * (n // 20 + 2), return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        ids = torch.randint(100, 40000, (1, n), generator=gen)
    return ids


def bench_prefill(model, tok, methods, profile, sizes, repeat, eager_max):
    rows = []
    for n in sizes:
        ids = prefill_inputs(tok, n)
        active = [m for m in methods if m != "eager hook" or n <= eager_max]

        def make(method, ids=ids):
            def run():
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return run

        times = round_robin(model, active, profile, make, repeat)
        row = {"n": n, **{m: n / t for m, t in times.items()}}
        rows.append(row)
        print(f"prefill N={n}: " + ", ".join(f"{m} {row[m]:.0f} tok/s" for m in active),
              flush=True)
    return rows


def bench_decode(model, tok, methods, profile, context, steps, repeat):
    from transformers import DynamicCache

    ids = prefill_inputs(tok, context)

    def make(method):
        def run():
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
                nxt = out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(steps):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                run.decode_seconds = time.perf_counter() - start
        return run

    per_method = {m: [] for m in methods}
    fns = {}
    for m in methods:
        set_method(model, m, profile)
        fns[m] = make(m)
        fns[m]()                                                      # warm-up
    for _ in range(repeat):
        for m in methods:
            set_method(model, m, profile)
            fns[m]()
            per_method[m].append(fns[m].decode_seconds)
    result = {m: steps / statistics.median(t) for m, t in per_method.items()}
    print(f"decode after {context} tokens, {steps} steps: "
          + ", ".join(f"{m} {v:.1f} tok/s" for m, v in result.items()), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--eager-max", type=int, default=4096,
                        help="longest prefill the eager hook runs (its maps grow as N^2)")
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="N in {256, 512}, few steps")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.decode_steps, args.decode_context = [256, 512], 2, 8, 256
    if args.threads:
        torch.set_num_threads(args.threads)

    register_hook()
    model, tok = load_model()
    profile = typical_profile(model)
    methods = ["sdpa", "act_torch empty", "act_torch typical", "eager hook"]
    print(machine_line())
    print(f"typical profile: {profile.num_calibrated()} heads in {len(profile.heads)} layers")

    prefill = bench_prefill(model, tok, methods, profile, args.sizes, args.repeat,
                            args.eager_max)
    decode = bench_decode(model, tok, methods, profile, args.decode_context, args.decode_steps,
                          args.repeat)
    set_method(model, "sdpa", profile)

    lines = ["Prefill, tokens/s (higher is better):", "",
             "| N | " + " | ".join(methods) + " | typical / sdpa | typical / eager |",
             "|---:|" + "---:|" * (len(methods) + 2)]
    for row in prefill:
        cells = [f"{row[m]:.0f}" if m in row else "-" for m in methods]
        r1 = row["act_torch typical"] / row["sdpa"]
        r2 = (f"{row['act_torch typical'] / row['eager hook']:.2f}x" if "eager hook" in row
              else "-")
        lines.append(f"| {row['n']} | " + " | ".join(cells) + f" | {r1:.2f}x | {r2} |")
    lines += ["", f"Decode after {args.decode_context} tokens, {args.decode_steps} steps, "
              "tokens/s:", "",
              "| " + " | ".join(methods) + " | typical / sdpa |",
              "|" + "---:|" * (len(methods) + 1),
              "| " + " | ".join(f"{decode[m]:.1f}" for m in methods)
              + f" | {decode['act_torch typical'] / decode['sdpa']:.2f}x |"]

    goals = []
    at = {row["n"]: row for row in prefill}
    ref_n = 2048 if 2048 in at else max(at)
    row = at[ref_n]
    r_sdpa = row["act_torch typical"] / row["sdpa"]
    goals.append(f"typical >= 0.8x sdpa at {ref_n} prefill: {r_sdpa:.2f}x "
                 f"{'PASS' if r_sdpa >= 0.8 else 'FAIL'}")
    if "eager hook" in row:
        r_eager = row["act_torch typical"] / row["eager hook"]
        goals.append(f"typical >= 3x eager hook at {ref_n} prefill: {r_eager:.2f}x "
                     f"{'PASS' if r_eager >= 3 else 'FAIL'}")
    r_dec = decode["act_torch typical"] / decode["sdpa"]
    goals.append(f"decode typical >= 0.85x sdpa: {r_dec:.2f}x {'PASS' if r_dec >= 0.85 else 'FAIL'}")
    lines += ["", "Goals: " + "; ".join(goals) + ".",
              f"Profile: {profile.num_calibrated()} heads in {len(profile.heads)} of "
              f"{model.config.num_hidden_layers} layers; float32, batch 1, median of "
              f"{args.repeat} round-robin runs."]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_write:
        append_results("SmolLM2-135M-Instruct end to end (bench_model.py)", body)


if __name__ == "__main__":
    main()
