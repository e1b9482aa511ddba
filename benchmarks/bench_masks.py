"""Packed sequences (``segment_ids``) against the same tokens padded to a batch, on the CPU.

Op level: SmolLM2's attention shape (Hq=9, Hkv=3, D=64, fp32). Eight sequences laid one after
another in one row ``[1, Hq, sum n_i, D]`` with ``segment_ids`` (the op splits the call into
per-segment sub-calls, sub-calls of one length batched), against the same sequences as a
``[8, Hq, 512, D]`` batch, left-padded to 512 where shorter. Both in Transformers' layout (views
of ``[B, N, H, D]`` tensors), as a model passes them. Two sets of lengths: eight of 512
(the packed call is one batched call on views), and mixed lengths (padding costs the padded
batch, not the packed row). Calls timed in turn (``interleaved_medians``), so the ratios come
from one run. Goal (issue 21): packed >= 0.9x the speed of padded.

Model level (``--model``): SmolLM2-135M-Instruct, one forward of its decoder (no cache, no LM
head) of the eight sequences packed into one row, against the ``[8, 512]`` batch, both through
``act_attention`` with the same profile (2 heads in every other layer from 2 to 28); the
packed forward passes ``segment_ids`` from an attention function registered for this
benchmark (the Transformers integration's own detection is not what is timed here).

    python benchmarks/bench_masks.py --threads 1 --cpu-time --model   # appended to RESULTS.md
    python benchmarks/bench_masks.py --threads 1 --no-write  # a quick check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
from bench_attention import ALL_HEADS, D, HKV, HQ, TWO_HEADS, interleaved_medians  # noqa: E402
from common import append_results  # noqa: E402

from act_kernels import act_attention  # noqa: E402

WIDTH = 512
CLOCK = [time.perf_counter]
EQUAL = [WIDTH] * 8
MIXED = [512, 384, 448, 256, 512, 320, 480, 400]


def segment_ids(lengths) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def op_inputs(lengths, seed=0):
    """``(packed q, k, v, segment_ids)`` and ``(padded q, k, v, key_padding_mask or None)``."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, total, HQ, D, generator=gen).transpose(1, 2)
    k = torch.randn(1, total, HKV, D, generator=gen).transpose(1, 2)
    v = torch.randn(1, total, HKV, D, generator=gen).transpose(1, 2)
    u = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0) * (4 * D ** 0.5) ** 0.5
    q += u
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    for a in starts:                       # a planted sink a little after each sequence's start
        k[:, :, a + 3] = u
    padded = [torch.zeros(len(lengths), WIDTH, t.shape[1], D).transpose(1, 2) for t in (q, k, v)]
    kpm = torch.zeros(len(lengths), WIDTH, dtype=torch.bool)
    for b, (a, n) in enumerate(zip(starts, lengths)):
        for dst, src in zip(padded, (q, k, v)):
            dst[b, :, WIDTH - n:] = src[0, :, a:a + n]
        kpm[b, WIDTH - n:] = True
    return (q, k, v, segment_ids(lengths)), (*padded, None if bool(kpm.all()) else kpm)


def op_level(repeat: int) -> str:
    lines = ["| lengths | heads | padded [8, 512] s | packed s | packed speed / padded |",
             "|---|---|---|---|---|"]
    for label, lengths in (("8 x 512", EQUAL), ("mixed", MIXED)):
        (q, k, v, seg), (pq, pk, pv, kpm) = op_inputs(lengths)
        calls = {}
        for name, heads in (("none", None), ("2/9", TWO_HEADS), ("9/9", ALL_HEADS)):
            calls[f"padded {name}"] = (lambda h=heads: act_attention(
                pq, pk, pv, heads=h, key_padding_mask=kpm, backend="torch"))
            calls[f"packed {name}"] = (lambda h=heads: act_attention(
                q, k, v, heads=h, segment_ids=seg, backend="torch"))
        times = interleaved_medians(calls, repeat)
        for name in ("none", "2/9", "9/9"):
            padded, packed = times[f"padded {name}"], times[f"packed {name}"]
            lines.append(f"| {label} | {name} | {padded:.4f} | {packed:.4f} | "
                         f"{padded / packed:.2f}x |")
        print("\n".join(lines[-3:]), flush=True)
    return "\n".join(lines)


def masked_level(repeat: int, n: int) -> str:
    """The exact blocked path (``torch_backend/masked.py``): one prompt of ``n`` tokens with a
    256-token image block, by ``block_ids`` and by the same visibility as a dense ``attn_mask``,
    against the plain causal call (which ignores the block)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, n, HQ, D, generator=gen).transpose(1, 2)
    k = torch.randn(1, n, HKV, D, generator=gen).transpose(1, 2)
    v = torch.randn(1, n, HKV, D, generator=gen).transpose(1, 2)
    blk = torch.full((1, n), -1)
    blk[0, 16:272] = 0
    pos = torch.arange(n)
    mask = (pos[None, :] <= pos[:, None]) | ((blk[0][:, None] >= 0) & (blk[0][:, None] == blk[0]))
    calls = {}
    for name, heads in (("none", None), ("2/9", TWO_HEADS), ("9/9", ALL_HEADS)):
        calls[f"causal {name}"] = lambda h=heads: act_attention(q, k, v, heads=h, backend="torch")
        calls[f"block_ids {name}"] = lambda h=heads: act_attention(q, k, v, heads=h,
                                                                  block_ids=blk, backend="torch")
        calls[f"attn_mask {name}"] = lambda h=heads: act_attention(
            q, k, v, heads=h, attn_mask=mask[None], backend="torch")
    times = interleaved_medians(calls, repeat)
    lines = [f"Masked path, N={n}, one image block of 256 tokens (positions 16..271):", "",
             "| heads | causal s (no block) | block_ids s | attn_mask s | block_ids / causal |",
             "|---|---|---|---|---|"]
    for name in ("none", "2/9", "9/9"):
        c, b, m = (times[f"{kind} {name}"] for kind in ("causal", "block_ids", "attn_mask"))
        lines.append(f"| {name} | {c:.4f} | {b:.4f} | {m:.4f} | {b / c:.1f}x |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# model level
# ---------------------------------------------------------------------------------------------

NAME = "act_bench_packed"
STATE = {"segment_ids": None, "profile": None}


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """``act_attention`` with the benchmark's segment ids (None for the padded batch)."""
    profile = STATE["profile"]
    heads = profile.heads.get(module.layer_idx) or None
    out = act_attention(query, key, value, heads=heads, beta=profile.beta, tau=profile.tau,
                        scale=scaling, segment_ids=STATE["segment_ids"], backend="torch")
    return out.transpose(1, 2), None


def model_level(repeat: int) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    from act_kernels import load_model
    from bench_model import prefill_inputs, typical_profile

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)
    model, tok = load_model()
    model.set_attn_implementation(NAME)
    STATE["profile"] = typical_profile(model)
    ids = prefill_inputs(tok, WIDTH * 8)
    batch = ids.view(8, WIDTH)
    positions = torch.arange(WIDTH).repeat(8)[None]
    seg = segment_ids(EQUAL)

    def padded():
        STATE["segment_ids"] = None
        with torch.no_grad():
            return model.model(input_ids=batch, use_cache=False).last_hidden_state

    def packed():
        STATE["segment_ids"] = seg
        with torch.no_grad():
            return model.model(input_ids=ids, position_ids=positions,
                               use_cache=False).last_hidden_state

    diff = (packed()[0].view(8, WIDTH, -1) - padded()).abs().max().item()
    times = {"padded": [], "packed": []}
    for _ in range(repeat):
        for name, fn in (("padded", padded), ("packed", packed)):
            start = CLOCK[0]()
            fn()
            times[name].append(CLOCK[0]() - start)
    t_pad, t_pack = (statistics.median(times[n]) for n in ("padded", "packed"))
    return (f"SmolLM2-135M-Instruct forward of 8 x {WIDTH} tokens (fp32, no cache, the decoder "
            f"without the LM head; {'CPU' if CLOCK[0] is time.process_time else 'wall'} time), "
            f"the same profile (2 heads in every other layer 2..28); median of {repeat} "
            f"alternated runs: padded [8, {WIDTH}] {t_pad:.3f} s, packed [1, {8 * WIDTH}] with "
            f"segment_ids {t_pack:.3f} s: packed speed / padded = {t_pad / t_pack:.2f}x; "
            f"max |hidden-state difference| packed vs padded {diff:.2e}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", action="store_true", help="also the SmolLM2 forward")
    parser.add_argument("--masked-n", type=int, default=1024,
                        help="prompt length of the masked-path table")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by process CPU time (needs --threads 1; see bench_attention)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-time needs --threads 1 (CPU time of several threads adds up)")
        bench_attention.CLOCK = time.process_time
        CLOCK[0] = time.process_time
    clock = "CPU time" if args.cpu_time else "wall time"
    body = (f"Op level: Hq={HQ}, Hkv={HKV}, D={D}, fp32, torch backend, planted sinks, "
            f"Transformers' layout; median of {args.repeat} interleaved runs ({clock}). Mixed "
            f"lengths: {MIXED}.\n\n"
            + op_level(args.repeat) + "\n\n" + masked_level(args.repeat, args.masked_n))
    if args.model:
        body += "\n\n" + model_level(max(3, args.repeat // 2))
    print(body)
    if not args.no_write:
        append_results("Packed sequences vs a padded batch (bench_masks.py, issue 21)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
