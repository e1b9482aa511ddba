"""Traffic and roofline model of the Triton backend at real model shapes, without a GPU.

    python benchmarks/gpu_model.py --out DIR [--markdown FILE]

It calls the backend's own entry point (``triton_backend.act_attention_triton``) with CPU
tensors inside ``kernels.aot.compile_only(90)`` (the target H100 and H200 share: sm_90), with
every kernel module's ``launch`` replaced by a recorder: nothing is compiled or run, but every
launch the call would make is recorded with its grid, its arguments and its block
configuration. The decode configuration is the launcher's formula (132 SMs); an autotuned
kernel is modelled with the first candidate its pruning rule keeps for sm_90
(``configs.kept_configs``: the largest tiles that fit, which the autotuner may not pick).
K and V are zero-stride views (no memory), so the shapes can be those of the models.

Each recorded launch is priced by the ``*_cost`` function next to its kernel (``decode.py``,
``flash_forward.py``, ``column_scores.py``, ``sink_correction.py``), which walks the kernel's
own loop bounds with the same constexprs: HBM bytes read and written (every program's loads
counted in full, no L2 reuse across programs; masked rows and lanes are not fetched) and
tensor-core FLOPs (the tiles as issued). Data-dependent parts are stated, not measured: no left
padding; ``ceil(1/tau) - 1`` sinks per calibrated row (an upper bound) for the decode epilogue's
V gather and the prefill correction; the cancellation guard passes (rows whose sinks hold more
than ``1 - STABLE_REST`` of the attention) are reported apart (``guard_bytes``), not added.

Time lower bound of a launch: ``max(bytes / bandwidth, FLOPs / peak)``, summed over launches
(they run one after another); datasheet figures of the two targets (SXM, dense bf16 tensor
cores, no sparsity):

* H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s;
* H200:     4.8 TB/s HBM3e, 989 TFLOP/s.

Reference points: decode ``min_bytes`` = q, K and V once, the output once (what any decode
kernel must move); prefill ``flash_flops`` = ``4 B Hq D x (visible (query, key) pairs)``, the
exact causal FlashAttention count, and ``plain_bytes`` / ``plain_flops`` = this model's own
plain pass (no head calibrated) at the same shape.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys

if __name__ == "__main__":       # the GPU block sizes, not the interpreter's
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from act_kernels.kernels import (aot, column_scores, configs, decode, flash_forward,  # noqa: E402
                                 sink_correction)

DEVICES = {  # bytes/s, FLOP/s (dense bf16)
    "H100 SXM": (3.35e12, 989e12),
    "H200": (4.8e12, 989e12),
}
MODELS = {  # name: (Hq, Hkv, D)
    "Llama-3-8B": (32, 8, 128),
    "Qwen2.5-7B": (28, 4, 128),
}
DECODE_NK = (4096, 16384, 32768, 65536, 131072)
DECODE_B = (1, 8, 16, 64)
PREFILL_N = (2048, 4096, 8192, 16384, 32768)
FRACTIONS = (0.0, 0.25, 1.0)
TAU, BETA = 0.1, 0.4
GOALS = {"decode_25%_bytes_vs_min": 1.15, "prefill_25%_flops_vs_flash": 1.3,
         "prefill_100%_flops_vs_flash": 1.6, "prefill_25%_flops_vs_plain": 1.3,
         "prefill_100%_flops_vs_plain": 1.6}

# kernel (its Python name) -> (short name, cost function, autotune kind or None)
KERNELS = {
    "_decode_split_kernel": ("decode_split", decode.split_cost, None),
    "_decode_epilogue_kernel": ("decode_epilogue", decode.epilogue_cost, None),
    "_flash_forward_kernel": ("forward", flash_forward.forward_cost, "forward"),
    "_column_scores_kernel": ("column", column_scores.column_cost, "column"),
    "_sink_correction_kernel": ("correction", None, "correction"),
}
MODULES = (decode, flash_forward, column_scores, sink_correction)


def _arg_names(kernel):
    fn = kernel
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn.arg_names


def _name(kernel) -> str:
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


@contextlib.contextmanager
def recording():
    """Replace ``launch`` in every kernel module by a recorder; yields the list of launches,
    each ``{"kernel", "grid", "args"}`` with ``args`` every kernel argument by name, the block
    configuration included."""
    launches = []

    def record(kernel, grid, *args, **kwargs):
        named = dict(zip(_arg_names(kernel), args), **kwargs)
        kind = KERNELS[_name(kernel)][2]
        if hasattr(kernel, "prune_configs"):      # autotuned: the config the pruning keeps first
            config = configs.kept_configs(kind, configs.candidates(kind), named["BLOCK_D"],
                                          named["Q"].element_size(), configs.SMEM_LIMIT[90])[0]
            named.update(config.kwargs, num_warps=config.num_warps,
                         num_stages=config.num_stages)
        grid = grid(named) if callable(grid) else grid
        launches.append({"kernel": _name(kernel), "grid": tuple(grid), "args": named})

    saved = [(m, m.launch) for m in MODULES]
    try:
        for m in MODULES:
            m.launch = record
        yield launches
    finally:
        for m, fn in saved:
            m.launch = fn


def record_call(bsz, hq, hkv, nq, nk, dim, fraction, dtype=torch.bfloat16, window=None):
    """The launches of one backend call at this shape, ``fraction`` of the heads calibrated
    (every ``1/fraction``-th head)."""
    from act_kernels.triton_backend import act_attention_triton

    q = torch.zeros(1, 1, 1, 1, dtype=dtype).expand(bsz, hq, nq, dim)
    kv = torch.zeros(1, 1, 1, 1, dtype=dtype).expand(bsz, hkv, nk, dim)
    heads = None
    if fraction > 0:
        every = round(1 / fraction)
        heads = (torch.arange(hq) % every == 0).expand(bsz, hq).contiguous()
    stand_in = contextlib.nullcontext() if configs.INTERPRET else aot.compile_only(90)
    with stand_in, recording() as launches:
        act_attention_triton(q, kv, kv, heads, BETA, TAU, dim ** -0.5, None, False,
                             window=window)
    return launches


def price(launches, tau=TAU):
    """Per-launch and total bytes, FLOPs and time bounds of recorded launches."""
    rows, guard = [], 0.0
    for launch in launches:
        name, fn, _ = KERNELS[launch["kernel"]]
        a, grid = launch["args"], launch["grid"]
        if name == "correction":
            c = sink_correction.correction_cost(grid, a, math.ceil(1 / tau) - 1)
        else:
            c = fn(grid, a)
        if name == "decode_epilogue" and a["TRACK"]:
            g = decode.guard_cost(grid, a)
            guard += g["read"]
        c["bytes"] = c["read"] + c["write"]
        c["seconds"] = {dev: max(c["bytes"] / bw, c["flops"] / peak)
                        for dev, (bw, peak) in DEVICES.items()}
        config = {k: v for k, v in a.items() if k.startswith("BLOCK_")
                  or k in ("num_warps", "num_stages", "CAND", "split_size", "num_splits")}
        rows.append(dict(kernel=name, grid=list(grid), config=config, **c))
    total = {key: sum(r[key] for r in rows) for key in ("read", "write", "bytes", "flops")}
    total["seconds"] = {dev: sum(r["seconds"][dev] for r in rows) for dev in DEVICES}
    total["guard_bytes"] = guard
    return rows, total


def decode_case(model, bsz, nk, fraction, shape=None):
    """One decode step of ``model`` (or of ``shape = (Hq, Hkv, D)``) priced."""
    hq, hkv, dim = shape or MODELS[model]
    launches, el = record_call(bsz, hq, hkv, 1, nk, dim, fraction), 2
    rows, total = price(launches)
    minimum = bsz * (2 * hq * dim + 2 * hkv * nk * dim) * el
    return dict(path="decode", model=model, B=bsz, Nk=nk, calibrated=f"{fraction:.0%}",
                launches=rows, total=total, min_bytes=minimum,
                bytes_vs_min=total["bytes"] / minimum,
                bound_us={dev: s * 1e6 for dev, s in total["seconds"].items()},
                min_bound_us={dev: minimum / bw * 1e6 for dev, (bw, _) in DEVICES.items()})


def flash_flops(bsz, hq, nq, nk, dim):
    """``4 B Hq D`` times the (query, key) pairs a causal pass sees (row ``i`` sees
    ``Nk - Nq + i + 1`` keys)."""
    pairs = nq * (nk - nq) + nq * (nq + 1) // 2
    return 4 * bsz * hq * dim * pairs


def prefill_case(model, n, fraction, plain=None):
    hq, hkv, dim = MODELS[model]
    rows, total = price(record_call(1, hq, hkv, n, n, dim, fraction))
    flops = flash_flops(1, hq, n, n, dim)
    plain = plain or total
    return dict(path="prefill", model=model, B=1, N=n, calibrated=f"{fraction:.0%}",
                launches=rows, total=total, flash_flops=flops,
                flops_vs_flash=total["flops"] / flops,
                flops_vs_plain=total["flops"] / plain["flops"],
                bytes_vs_plain=total["bytes"] / plain["bytes"],
                bound_us={dev: s * 1e6 for dev, s in total["seconds"].items()},
                flash_bound_us={dev: flops / peak * 1e6 for dev, (_, peak) in DEVICES.items()})


def run(decode_nk=DECODE_NK, decode_b=DECODE_B, prefill_n=PREFILL_N, models=tuple(MODELS)):
    cases = []
    for model in models:
        for bsz in decode_b:
            for nk in decode_nk:
                cases += [decode_case(model, bsz, nk, f) for f in FRACTIONS]
    for n in prefill_n:
        plain = prefill_case(models[0], n, 0.0)
        cases += [plain] + [prefill_case(models[0], n, f, plain["total"]) for f in FRACTIONS[1:]]
    return cases


def goals(cases):
    """The modelled figures of issue 22 against their targets (worst case over the shapes)."""
    worst = {"decode_25%_bytes_vs_min": max(
        c["bytes_vs_min"] for c in cases if c["path"] == "decode" and c["calibrated"] == "25%")}
    for frac in ("25%", "100%"):
        for ref in ("flash", "plain"):
            worst[f"prefill_{frac}_flops_vs_{ref}"] = max(
                c[f"flops_vs_{ref}"] for c in cases
                if c["path"] == "prefill" and c["calibrated"] == frac)
    return {key: {"modelled_worst": val, "goal": GOALS[key], "met": val <= GOALS[key]}
            for key, val in worst.items()}


def markdown(cases, decode_nk=(4096, 32768, 131072), decode_b=(1, 8, 64)):
    dev = list(DEVICES)
    out = [f"### Modelled traffic and time bounds ({datetime.date.today()}, "
           "`python benchmarks/gpu_model.py --out DIR`)", "",
           "No GPU: launches recorded from the backend's own calls (compile-only stand-in, "
           "sm_90 configs), priced by each kernel's `*_cost` (no L2 reuse; bf16; no padding; "
           f"tau = {TAU}; guard passes not included).", "",
           "Decode (one step, all layers' cost is this times the layer count):", "",
           "| model | B | Nk | calibrated | MB moved | x min bytes | bound us "
           f"{dev[0]} | bound us {dev[1]} | min-bytes us {dev[0]} |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c["path"] == "decode" and c["Nk"] in decode_nk and c["B"] in decode_b:
            out.append(f"| {c['model']} | {c['B']} | {c['Nk']} | {c['calibrated']} | "
                       f"{c['total']['bytes'] / 1e6:.1f} | {c['bytes_vs_min']:.3f} | "
                       f"{c['bound_us'][dev[0]]:.1f} | {c['bound_us'][dev[1]]:.1f} | "
                       f"{c['min_bound_us'][dev[0]]:.1f} |")
    out += ["", "Prefill (causal, B = 1, Llama-3-8B heads, one layer):", "",
            f"| N | calibrated | TFLOP | x flash FLOPs | x plain-pass FLOPs | x plain-pass bytes | "
            f"bound ms {dev[0]} | bound ms {dev[1]} |", "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c["path"] == "prefill":
            out.append(f"| {c['N']} | {c['calibrated']} | {c['total']['flops'] / 1e12:.3f} | "
                       f"{c['flops_vs_flash']:.3f} | {c['flops_vs_plain']:.3f} | "
                       f"{c['bytes_vs_plain']:.3f} | {c['bound_us'][dev[0]] / 1e3:.3f} | "
                       f"{c['bound_us'][dev[1]] / 1e3:.3f} |")
    out += ["", "Goals (issue 22, worst over the shapes; `flash`: the exact causal count, "
            "`plain`: this model's plain pass, whose diagonal tiles FlashAttention also "
            "computes):", ""]
    for key, g in goals(cases).items():
        out.append(f"- {key}: {g['modelled_worst']:.3f} (goal <= {g['goal']}): "
                   f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_model.json")
    ap.add_argument("--markdown", help="append the Markdown tables to this file")
    args = ap.parse_args(argv)
    cases = run()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_model.json")
    with open(path, "w") as f:
        json.dump({"devices": DEVICES, "tau": TAU, "goals": goals(cases), "cases": cases}, f,
                  indent=1)
    text = markdown(cases)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
