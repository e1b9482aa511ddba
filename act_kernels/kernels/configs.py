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
from .aot import is_interpreted  # noqa: F401  (where it lives: aot.launch needs it, no cycle)

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


def len_bucket(n: int) -> int:
    """Autotune key for a length: the next power of two, so nearby lengths share a config."""
    return triton.next_power_of_2(max(int(n), 1))


def _gpu_configs(kind: str):
    """Candidate configs; ``prune_configs`` keeps the ones that fit the device and head dim.

    Few on purpose: each candidate is compiled and timed on the first call of every shape
    bucket (and compiled for every target by the CI test).
    """
    out = []
    if kind == "forward":
        # (64 x 64 with 4 warps is not a candidate: at D = 128 it spills when Nq is not a
        # multiple of 16, though the register rule gives it the same 96 values as 128 x 64 / 8w)
        # (64 x 32 with 8 warps: the one that fits the registers at D = 256; only for D > 128,
        # see WIDE_HEAD_ONLY)
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 4),
                             (64, 32, 4, 4), (64, 32, 8, 3), FALLBACK["forward"]]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    elif kind == "column":
        # key block outer (BLOCK_N), query block inner (BLOCK_M)
        for bn, bm, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4),
                             FALLBACK["column"]]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    elif kind == "correction":
        # measured spill-free on sm_90 at D = 64 and 128 (bf16); a 64-key guard block or 4 warps
        # at BLOCK_M = 32 spill 72..416 bytes at D = 128
        # (16 rows with 8 warps: the one that fits the registers at D = 256)
        for bm, bs, bn, w, s in [(64, 16, 32, 8, 2), (32, 16, 32, 8, 2), (16, 16, 16, 8, 1),
                                 FALLBACK["correction"]]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_S": bs, "BLOCK_N": bn},
                                     num_warps=w, num_stages=s))
    else:
        raise ValueError(kind)
    return out


# The last candidate of each kind: small tiles that fit every target even in fp32 at D = 256
# (the forward's and the column's (block, block, warps, stages); the correction's
# (BLOCK_M, BLOCK_S, BLOCK_N, warps, stages)). Kept only when no larger candidate fits.
FALLBACK = {"forward": (16, 32, 4, 2), "column": (32, 32, 4, 2),
            "correction": (16, 16, 16, 4, 1)}


# Shared memory one thread block may use (the opt-in maximum), bytes, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
              103: 232448, 120: 101376}

# fp32 tile values one thread may hold (see register_tiles) before ptxas spills: measured on
# sm_90 for the forward kernel at D = 128 (96 per thread: no spill; 128 and more: spills).
REGISTER_TILE_LIMIT = 96


def _blocks(meta: dict):
    return meta.get("BLOCK_M", 64), meta.get("BLOCK_N", 64), meta.get("BLOCK_S", 16)


def smem_bytes(kind: str, meta: dict, block_d: int, elsize: int, num_stages: int) -> int:
    """Estimated shared memory (bytes) of one program of an autotuned kernel: an upper bound.

    Triton's software pipeliner keeps ``num_stages`` copies of every tile a loop streams in from
    global memory for a dot; the operand that stays resident across the loop is in shared
    memory too (rows of ``block_d`` elements of the input dtype):

    * forward: K^T and V tiles [BLOCK_N, D] per stage; resident Q [BLOCK_M, D];
    * column: Q tiles [BLOCK_M, D] per stage; resident K^T [D, BLOCK_N];
    * correction: per stage the gathered sink rows of K and V [BLOCK_S, D] and the guard loop's
      K and V tiles [BLOCK_N, D]; Q [BLOCK_M, D] three times (both loops and a layout copy);

    fp32 operands (``elsize`` 4, dots at ``F32_PREC`` = tf32x3) keep the resident tile twice
    (its high and low TF32 parts); plus the per-row vectors of every stage (LSE, padding flags:
    4 bytes per row). ``tests/test_gpu_compile.py`` checks on sm_80/90/100 that the compiled
    ``metadata.shared`` never exceeds it.
    """
    bm, bn, bs = _blocks(meta)
    twice = 2 if elsize == 4 else 1
    rows = {"forward": num_stages * 2 * bn + twice * bm,
            "column": num_stages * bm + twice * bn,
            "correction": num_stages * 2 * (bs + bn) + 3 * bm}[kind]
    return rows * block_d * elsize + 4 * num_stages * (bm + bn + bs)


def register_tiles(kind: str, meta: dict, block_d: int, num_warps: int, elsize: int) -> float:
    """fp32 tile values per thread that stay live in the kernel's main loop.

    forward: the accumulator [BLOCK_M, D] and the score tile [BLOCK_M, BLOCK_N]; column: the
    score tile; correction: ``w`` and the guard's accumulator [BLOCK_M, D] and its score tile
    [BLOCK_M, BLOCK_N]. Dots with fp32 operands (tf32x3) also hold the high and low TF32 parts:
    those tiles count twice (the correction's always: its products are fp32), and everything
    twice again for fp32 inputs (where the column kernel's Q tile counts too).
    """
    bm, bn, _ = _blocks(meta)
    twice = 2 if elsize == 4 else 1
    values = {"forward": twice * (bm * block_d + bm * bn),
              "column": twice * (bm * bn + (bm * block_d if elsize == 4 else 0)),
              "correction": 2 * twice * (2 * bm * block_d + bm * bn)}[kind]
    return values / (32 * num_warps)


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


# candidates kept only for head dims above 128 (kind, BLOCK_M, BLOCK_N, warps): the forward's
# 64 x 32 with 8 warps spills 304 bytes at D = 128 in fp32 (tf32x3), where the rule counts 80
WIDE_HEAD_ONLY = {("forward", 64, 32, 8)}


def fits(kind: str, config, block_d: int, elsize: int, smem: int) -> bool:
    """The pruning rule: the config's estimated shared memory fits ``smem`` bytes and its live
    fp32 tiles fit the registers without spilling (``register_tiles`` <=
    ``REGISTER_TILE_LIMIT``), at every head dim (D > 128 keeps the 8-warp candidates with
    narrow tiles; ``WIDE_HEAD_ONLY`` ones only there)."""
    if smem_bytes(kind, config.kwargs, block_d, elsize, config.num_stages) > smem:
        return False
    bm, bn, _ = _blocks(config.kwargs)
    if block_d <= 128 and (kind, bm, bn, config.num_warps) in WIDE_HEAD_ONLY:
        return False
    return (register_tiles(kind, config.kwargs, block_d, config.num_warps, elsize)
            <= REGISTER_TILE_LIMIT)


def prune_configs(configs, named_args, kind=None, **kwargs):
    """``early_config_prune`` of the autotuned kernels: keep the configs that ``fits``.

    If none fits, the one with the smallest shared memory is kept (Triton needs one; it would
    then fail to launch with a clear out-of-resources error rather than silently doing
    something else)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    q = named_args.get("Q")
    elsize = q.element_size() if q is not None else 2
    return kept_configs(kind, configs, block_d, elsize, smem_limit())


def kept_configs(kind: str, configs, block_d: int, elsize: int, smem: int):
    """The rule of ``prune_configs`` on a list of candidates (``candidates(kind)`` or the
    autotuner's), in their order."""
    kept = [c for c in configs if fits(kind, c, block_d, elsize, smem)]
    if len(kept) > 1:
        kept = kept[:-1] if kept[-1] is configs[-1] else kept    # the fallback only if alone
    if kept:
        return kept
    return [min(configs, key=lambda c: smem_bytes(kind, c.kwargs, block_d, elsize,
                                                  c.num_stages))]


def candidates(kind: str):
    """The autotune candidates of a kernel kind (the GPU list, whatever the mode)."""
    return _gpu_configs(kind)


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


# query rows of one decode program: a GQA group padded to a power of two, at least 16 (the
# smallest tl.dot operand), at most this (larger groups are cut into chunks of this many rows;
# with 8 warps a 32-row chunk holds as many fp32 values per thread as 16 rows with 4)
MIN_BLOCK_G = 16
MAX_BLOCK_G = 32


def decode_group_block(group: int):
    """(BLOCK_G, chunks per group) of the GQA-packed decode kernels for ``group = Hq / Hkv``."""
    block_g = min(max(MIN_BLOCK_G, triton.next_power_of_2(group)), MAX_BLOCK_G)
    return block_g, triton.cdiv(group, block_g)


def decode_config(programs: int, nk: int, dim: int, block_g: int = MIN_BLOCK_G,
                  split_size=None, elsize: int = 2):
    """(BLOCK_N, split size in keys, number of splits, num_warps) for the decode kernels.

    ``programs``: programs per split (one per group chunk, ``B * Hkv * chunks``). Flash-decoding:
    a long context is cut into splits (at least 256 keys each) so that about eight programs per
    SM run even for a single sequence; each split is a multiple of BLOCK_N keys. BLOCK_N: 64
    keys of 256 bytes (D <= 128 in 16 bits), fewer for wider rows (D > 128, fp32 inputs): the
    K/V tiles and the epilogue's guard pass then fit the registers (compile test: no spills).
    """
    if INTERPRET:
        block_n = INTERP_BLOCK
        split = split_size or INTERP_DECODE_SPLIT
    else:
        block_n = max(16, min(64, 16384 // (head_block(dim) * elsize)))
        if split_size is None:
            # about 8 programs (32 warps) per SM in flight to hide memory latency
            target_programs = 8 * _num_sms()
            splits = max(1, min(triton.cdiv(nk, 256), triton.cdiv(target_programs, programs)))
            split = triton.cdiv(nk, splits)
        else:
            split = split_size
    split = triton.cdiv(max(split, 1), block_n) * block_n
    num_splits = triton.cdiv(nk, split)
    # the [BLOCK_G, BLOCK_D] fp32 accumulator: 16 values per thread at 4 warps up to 16 x 128
    num_warps = 4 if block_g * head_block(dim) <= 16 * 128 else 8
    return block_n, split, num_splits, num_warps


# Precision of the dots whose operands are fp32 (fp32 inputs; the fp32 products of the
# calibration): on GPU three TF32 tensor-core products ("tf32x3", about fp32 accuracy); an IEEE
# fp32 dot runs on the FMA units and spills registers at these tile sizes (measured on sm_90:
# 2-8 KiB of stack per thread). The interpreter computes in fp32 either way.
F32_PREC = "ieee" if INTERPRET else "tf32x3"


def dot_flags(dtype) -> dict:
    """Meta-parameters of ``common.mma``: fp32 inputs use ``F32_PREC`` (not plain TF32), close
    to torch's default fp32 matmul; bf16 under the interpreter is upcast (see ``common.mma``)."""
    import torch
    upcast = INTERPRET and dtype == torch.bfloat16
    return {"IN_PREC": F32_PREC if (dtype == torch.float32 or upcast) else "tf32",
            "UPCAST": upcast}
