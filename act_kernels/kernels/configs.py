"""Block sizes and autotuning for the Triton kernels.

Two regimes:

* ``TRITON_INTERPRET=1`` (CPU tests): every kernel runs with small fixed blocks (16), no
  autotuning; the interpreter executes one program at a time in numpy, so small tiles keep the
  tests fast and exercise the tail masks at small lengths.
* GPU: the flash forward, column-score and sink-correction kernels are wrapped in
  ``triton.autotune`` keyed on the lengths (bucketed), the head dim and (implicitly, Triton adds
  the tensor dtypes to the key) the dtype. Decode block/split sizes are chosen by a formula, not
  autotuned, so that the plain output is computed the same way in every call with the same shapes
  (uncalibrated heads must stay bit-identical to the plain path).
"""
from __future__ import annotations

import functools
import os

import triton

from . import aot

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Head dims the kernels accept: any D in 1..MAX_HEAD_DIM; the D block is the next power of two
# (at least 16, the smallest tl.dot operand) and the padding lanes are masked.
MAX_HEAD_DIM = 256

# Interpreter tiles (tests). The decode split is small so that short test contexts use several
# splits and exercise the flash-decoding merge.
INTERP_BLOCK = 16
INTERP_DECODE_SPLIT = 32


def head_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a jit function, possibly autotuned) runs through the interpreter."""
    fn = kernel
    while hasattr(fn, "fn"):
        if type(fn).__name__ == "InterpretedFunction":
            return True
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def len_bucket(n: int) -> int:
    """Autotune key for a length: the next power of two, so nearby lengths share a config."""
    return triton.next_power_of_2(max(int(n), 1))


def _gpu_configs(kind: str):
    """Candidate configs; ``prune_configs`` drops the ones too large for the head dim."""
    out = []
    if kind == "forward":
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4),
                             (64, 128, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    elif kind == "column":
        # key block outer (BLOCK_N), query block inner (BLOCK_M)
        for bn, bm, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3),
                             (128, 32, 4, 4), (64, 32, 4, 4)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    elif kind == "correction":
        for bm, bs, w, s in [(64, 16, 4, 2), (128, 16, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2),
                             (32, 16, 4, 2)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_S": bs, "BLOCK_N": 64},
                                     num_warps=w, num_stages=s))
    else:
        raise ValueError(kind)
    return out


# Shared memory one thread block may use (the opt-in maximum), bytes, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
              103: 232448, 120: 101376}


def smem_bytes(kind: str, meta: dict, block_d: int, elsize: int, num_stages: int) -> int:
    """Estimated shared memory (bytes) of one program of an autotuned kernel.

    Triton's pipeliner keeps ``num_stages`` copies of every tile a loop streams in from global
    memory for a dot, and the dot operands that stay resident (the Q tile) in shared memory too:

    * forward: K^T and V tiles [BLOCK_N, BLOCK_D] per stage, plus the Q tile [BLOCK_M, BLOCK_D];
    * column: Q tiles [BLOCK_M, BLOCK_D] per stage, plus the K^T tile [BLOCK_D, BLOCK_N];
    * correction: the gathered sink rows of K and V [BLOCK_S, BLOCK_D] per stage, the guard's
      K and V tiles [BLOCK_N, BLOCK_D] per stage (the two loops do not overlap in time, so the
      larger one counts), plus the Q tile.

    The element size is the input's (fp32 inputs take twice the space of fp16/bf16).
    ``tests/test_gpu_compile.py`` checks on sm_80/90/100 that the compiled ``metadata.shared``
    never exceeds this estimate and that every config it drops really does not fit.
    """
    bm, bn = meta.get("BLOCK_M", 64), meta.get("BLOCK_N", 64)
    tile = block_d * elsize
    if kind == "forward":
        return (num_stages * 2 * bn + bm) * tile
    if kind == "column":
        return (num_stages * bm + bn) * tile
    if kind == "correction":
        return (num_stages * 2 * max(meta.get("BLOCK_S", 16), bn) + bm) * tile
    raise ValueError(kind)


def smem_limit() -> int:
    """Per-block shared memory of the device the kernels compile for (the compile_only target,
    else the current CUDA device)."""
    arch = aot.target_arch()
    if arch is not None:
        return SMEM_LIMIT[arch]
    return _device_smem_limit()


@functools.lru_cache(maxsize=None)
def _device_smem_limit() -> int:
    import torch
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = getattr(props, "shared_memory_per_block_optin", None)
    return int(limit) if limit else SMEM_LIMIT.get(props.major * 10 + props.minor, 101376)


def prune_configs(configs, named_args, kind=None, **kwargs):
    """Keep the configs whose estimated shared memory (``smem_bytes``) fits the device.

    If none fits, the smallest is kept (Triton needs one; it would then fail to launch with a
    clear out-of-resources error rather than silently doing something else)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    q = named_args.get("Q")
    elsize = q.element_size() if q is not None else 2
    limit = smem_limit()
    sizes = [smem_bytes(kind, c.kwargs, block_d, elsize, c.num_stages) for c in configs]
    kept = [c for c, size in zip(configs, sizes) if size <= limit]
    return kept or [configs[sizes.index(min(sizes))]]


# the autotuned kernels by kind (tests switch their pruning off to check the rule)
AUTOTUNED = {}


def maybe_autotune(kind: str, key):
    """Decorator: autotune on GPU, identity under the interpreter (fixed blocks are passed)."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        tuned = triton.autotune(
            configs=_gpu_configs(kind), key=key,
            prune_configs_by={"early_config_prune": functools.partial(prune_configs, kind=kind)},
        )(kernel)
        AUTOTUNED[kind] = tuned
        return tuned
    return wrap


def interp_meta(kind: str) -> dict:
    """Fixed meta-parameters under the interpreter (autotuning supplies them on GPU)."""
    if kind == "correction":
        return {"BLOCK_M": INTERP_BLOCK, "BLOCK_S": INTERP_BLOCK, "BLOCK_N": INTERP_BLOCK}
    return {"BLOCK_M": INTERP_BLOCK, "BLOCK_N": INTERP_BLOCK}


@functools.lru_cache(maxsize=None)
def _num_sms() -> int:
    try:
        import torch
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    except Exception:  # no CUDA: a typical large GPU
        return 132


def decode_config(batch_heads: int, nk: int, dim: int, split_size=None):
    """(BLOCK_N, split size in keys, number of splits, num_warps) for the decode kernel.

    Flash-decoding: a long context is cut into splits (at least 256 keys each) so that about eight
    programs per SM run even for a single sequence; each split is a multiple of BLOCK_N keys.
    """
    if INTERPRET:
        block_n = INTERP_BLOCK
        split = split_size or INTERP_DECODE_SPLIT
    else:
        block_n = 64 if dim <= 128 else 32
        if split_size is None:
            # about 8 programs (32 warps) per SM in flight to hide memory latency
            target_programs = 8 * _num_sms()
            splits = max(1, min(triton.cdiv(nk, 256), triton.cdiv(target_programs, batch_heads)))
            split = triton.cdiv(nk, splits)
        else:
            split = split_size
    split = triton.cdiv(max(split, 1), block_n) * block_n
    num_splits = triton.cdiv(nk, split)
    num_warps = 4 if dim <= 128 else 8
    return block_n, split, num_splits, num_warps


def dot_flags(dtype) -> dict:
    """Meta-parameters of ``common.mma``: fp32 inputs use true fp32 dots (no TF32), like torch's
    default matmul; bf16 under the interpreter is upcast (see ``common.mma``)."""
    import torch
    upcast = INTERPRET and dtype == torch.bfloat16
    return {"IN_PREC": "ieee" if (dtype == torch.float32 or upcast) else "tf32",
            "UPCAST": upcast}
