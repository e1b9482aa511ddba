"""The Triton backend of ``act_attention``: fused kernels for the plain pass and the calibration.

Data path (prefill / chunked prefill, ``Nq > 1``), every step one launch:

1. plain pass   ``kernels.flash_forward``   out (input dtype), lse2 (base-2 LSE), u32 (fp32 u of
   the calibrated heads only);
2. column pass  ``kernels.column_scores``   per-key sums of P over the rows that see them, for the
   calibrated (b, h) pairs only (all pairs when ``return_stats``);
3. sink selection (``sinks.select_sinks``, tiny torch tensors) and compaction of each pair's sink
   indices into a padded list (``kernels.sink_correction.compact_sinks``);
4. correction   ``kernels.sink_correction`` m_i, w_i from the sink keys only, ``out`` rewritten
   in place with the spec's identity (direct recompute for rows whose ``1 - m`` is below
   ``calibration.stable_rest(torch.float32)``: the kernels start from the float32 ``u32``).

Decode (``Nq == 1``, some heads calibrated, no stats, ``candidate_slots(tau)`` available):
``kernels.decode`` does plain output, LSE, candidate tracking and the correction in one pass over
K/V plus an epilogue. Otherwise ``Nq == 1`` runs the decode kernel as its plain pass and then the
same steps 2-4 as prefill (so uncalibrated heads are always the decode kernel's plain output).

Sliding windows (``window=W``, ``docs/spec.md``, "Attention windows"): ``W`` is a runtime
argument of every kernel (``Nk`` when there is none, so plain calls run the same code), and each
pass skips the key blocks outside the windows of its rows: the forward and the correction's direct
pass start at the block of the first row's window, the column pass launches no program left of it
and loops only over the rows at positions ``j .. j + W - 1``, decode walks the last ``W`` keys.
The divisor is ``seen_counts(..., window)``; the sequence's first valid key stays excluded.

Bidirectional blocks (``block_ids``, ``SUPPORTS_BLOCKS``; segments are split off by the op): each
row sees one key interval, window and block folded in (``kernels.spans``, derived once per call
on the device); every kernel takes it behind a ``BLOCKS`` constexpr and skips the key (column
pass: query) blocks outside it. The divisor is ``spans.span_counts``; the excluded key is still
the first valid key. A single row at ``Nk - 1`` has no later key: without a window its blocks
change nothing and the call runs as if there were none.

LSE convention: base 2, ``lse2 = log2 sum_j 2^(scale * log2(e) * q.k_j)``; ``+inf`` for rows
that see nothing (padded query rows), whose output is 0.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .calibration import stable_rest
from .params import check_heads, check_key_padding_mask
from .sinks import first_valid_index, seen_counts, select_sinks
from .tensor_cache import TensorCache

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise RuntimeError("act_attention: backend='triton' needs the triton package, which is not "
                       "installed (pip install triton), or use backend='torch'") from exc

from .kernels import aot, configs  # noqa: E402
from .kernels.column_scores import column_scores  # noqa: E402
from .kernels.decode import candidate_slots, decode_attention  # noqa: E402
from .kernels.flash_forward import _flash_forward_kernel, flash_forward  # noqa: E402
from .kernels.sink_correction import sink_correction  # noqa: E402
from .kernels.spans import block_spans, span_counts  # noqa: E402

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CalibratedPairs(NamedTuple):
    """The (batch row, head) pairs that get the column and correction passes, on the device.

    ``pairs`` int32 [P] (``b * Hq + h``, ascending), ``n_cal`` = P (a host int: it sizes buffers
    and grids), ``u_slot`` int32 [B*Hq] (row of the fp32 ``u`` buffer for a calibrated pair, -1
    otherwise), ``cal_i8`` int8 [B*Hq] (the decode kernel's flags). A pair is calibrated when it
    is listed *and* set in the heads mask; a listed pair that is not calibrated only costs work.
    """

    pairs: torch.Tensor
    n_cal: int
    u_slot: torch.Tensor
    cal_i8: torch.Tensor

    @classmethod
    def of_mask(cls, mask: torch.Tensor) -> "CalibratedPairs":
        """Exactly the pairs ``mask`` sets (one host sync: their count sizes the buffers)."""
        pairs = torch.nonzero(mask.reshape(-1)).reshape(-1).to(torch.int32)
        return cls.covering(mask, pairs)

    @classmethod
    def covering(cls, mask: torch.Tensor, pairs: torch.Tensor) -> "CalibratedPairs":
        """The pairs listed in ``pairs`` (int32 [P], ascending), calibrated where ``mask`` is set;
        torch ops on host-known sizes only (traceable: no value is read on the host)."""
        flat = mask.reshape(-1)
        index = pairs.long()
        on = flat[index]
        slot = torch.where(on, torch.arange(pairs.numel(), device=flat.device,
                                            dtype=torch.int32), -1)
        u_slot = torch.full((flat.numel(),), -1, device=flat.device, dtype=torch.int32)
        cal_i8 = torch.zeros(flat.numel(), device=flat.device, dtype=torch.int8)
        return cls(pairs, pairs.numel(), u_slot.scatter(0, index, slot),
                   cal_i8.scatter(0, index, on.to(torch.int8)))

    @classmethod
    def none(cls, n_bh: int, device) -> "CalibratedPairs":
        return cls(torch.empty(0, device=device, dtype=torch.int32), 0,
                   torch.full((n_bh,), -1, device=device, dtype=torch.int32),
                   torch.zeros(n_bh, device=device, dtype=torch.int8))


# CalibratedPairs per heads mask: found once (one host sync), then reused without touching the
# device, since a layer's mask is the same tensor (or a fresh view of it) from call to call
_PAIRS = TensorCache()


@functools.lru_cache(maxsize=64)
def _no_pairs(n_bh: int, device: torch.device) -> CalibratedPairs:
    return CalibratedPairs.none(n_bh, device)


def calibrated_pairs(heads, n_bh: int, device) -> CalibratedPairs:
    """The ``CalibratedPairs`` of ``heads`` (None: nothing calibrated), cached."""
    if heads is None:
        return _no_pairs(n_bh, torch.device(device))
    return _PAIRS.get(heads, CalibratedPairs.of_mask)


def check_can_run(q: torch.Tensor) -> None:
    """Raise one clear RuntimeError if these kernels cannot run on ``q``.

    (CPU tensors are also accepted inside ``kernels.aot.compile_only``, which compiles the
    kernels for a GPU target and launches nothing.)"""
    dev = q.device.type
    interpreted = configs.is_interpreted(_flash_forward_kernel)
    if dev == "cpu" and not interpreted and aot.target_arch() is None:
        raise RuntimeError(
            "act_attention: backend='triton' got CPU tensors but Triton is not in interpreter "
            "mode; set TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    if dev not in ("cpu", "cuda"):
        raise RuntimeError(f"act_attention: backend='triton' runs on CUDA tensors (or CPU with "
                           f"TRITON_INTERPRET=1), got device {q.device}; use backend='torch'")
    if q.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"act_attention: backend='triton' supports float16, bfloat16 and "
                           f"float32, got {q.dtype}; use backend='torch'")
    dim = q.shape[-1]
    if not 1 <= dim <= configs.MAX_HEAD_DIM:
        raise RuntimeError(
            f"act_attention: backend='triton' does not support head dim D={dim}; supported head "
            f"dims are 1..{configs.MAX_HEAD_DIM} (powers of two 16..{configs.MAX_HEAD_DIM} run "
            "unpadded, other sizes are padded to the next power of two); use backend='torch'")


def act_attention_triton(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats,
                         window=None, block_ids=None):
    """The Triton backend (see the module docstring); ``window``: None or ``W >= 1``, a
    sliding window (``docs/spec.md``, "Attention windows"), a runtime argument of every kernel;
    ``block_ids``: None or integer ``[B, Nk]`` on q's device, bidirectional blocks (negative:
    no block; each block one contiguous run of positions, as the op checks), taken by the
    kernels as per-row key intervals (``kernels.spans``)."""
    check_can_run(q)
    if aot.is_stand_in(q):      # its caches would keep traced tensors; nonzero() cannot trace
        raise RuntimeError("act_attention: the eager Triton backend cannot be traced; inside "
                           "torch.compile use triton_backend.compiled_call (the registered op)")
    # the calibrated (b, h) pairs, computed once per heads mask and kept on the device
    n_bh = q.shape[0] * q.shape[1]
    cal = calibrated_pairs(heads, n_bh, q.device)
    return _attend(q, k, v, cal, _no_pairs(n_bh, q.device).u_slot, heads, beta, tau, scale,
                   key_padding_mask, return_stats, window, block_ids)


def _attend(q, k, v, cal: CalibratedPairs, no_slot, heads, beta, tau, scale, key_padding_mask,
            return_stats, window, block_ids=None):
    """The launches of one call, the pairs given; ``no_slot`` int32 ``[B*Hq]`` of -1 (no fp32
    copy of ``u``, for the one-pass decode); ``heads`` is only read for the statistics."""
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    dev = q.device
    n_bh = bsz * hq
    kpm_i8 = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    first_valid = first_valid_index(key_padding_mask, bsz, dev)
    first_valid_i32 = first_valid.to(torch.int32)
    # Bidirectional blocks: per-row key intervals. A single row at position Nk - 1 has no later
    # key, so a block only moves its window's start: without a window it sees what it sees
    # without blocks, and runs today's kernels.
    spans = None
    if block_ids is not None and (nq > 1 or window is not None):
        spans = block_spans(block_ids, nq, window, first_valid)
    win_lo = None if spans is None or nq > 1 else spans.row_lo[:, 0].contiguous()

    # Decode with calibration: one pass over K/V, candidates kept on the fly, exact (decode.py).
    if nq == 1 and cal.n_cal > 0 and not return_stats and candidate_slots(tau):
        out, _, _, _ = decode_attention(q, k, v, scale, kpm_i8, first_valid_i32, no_slot, 0,
                                        calibrated=cal.cal_i8, beta=beta, tau=tau,
                                        stable_rest=stable_rest(torch.float32), window=window,
                                        win_lo=win_lo)
        return out, None

    # Which (b, h) pairs get column work: the listed ones (all of them for stats).
    cal_pairs, n_cal, u_slot = cal.pairs, cal.n_cal, cal.u_slot

    # 1. plain pass: out, base-2 LSE, fp32 u of the calibrated heads
    if nq == 1:
        out, lse2, u32, _ = decode_attention(q, k, v, scale, kpm_i8, first_valid_i32, u_slot,
                                             n_cal, window=window, win_lo=win_lo)
    else:
        out, lse2, u32 = flash_forward(q, k, v, scale, kpm_i8, first_valid_i32, u_slot, n_cal,
                                       window=window, spans=spans)
    if return_stats:
        pairs = torch.arange(n_bh, device=dev, dtype=torch.int32)
    else:
        pairs = cal_pairs
    if pairs.numel() == 0:
        return out, None

    # 2. column pass: sum_i P_ij per key, calibrated pairs only
    colsum = column_scores(q, k, lse2, scale, kpm_i8, pairs, window=window, spans=spans)

    # 3. sink selection on [P, Nk] (tiny tensors, torch)
    pair_b = pairs.long() // hq
    if spans is None:
        counts = seen_counts(nq, nk, key_padding_mask, bsz, dev, window)[pair_b]
    else:
        counts = span_counts(spans, key_padding_mask)[pair_b]
    scores, sinks = select_sinks(colsum[:, None, :], counts, tau, first_valid[pair_b])
    scores, sinks = scores[:, 0], sinks[:, 0]

    # 4. correction of the calibrated rows, in place (stats-only pairs just get m_i)
    slots = u_slot[pairs.long()]
    mass = sink_correction(q, k, v, out, lse2, u32, pairs, slots, sinks, beta, scale, kpm_i8,
                           first_valid_i32, stable_rest(torch.float32), window=window,
                           spans=spans)
    if not return_stats:
        return out, None
    calibrated = torch.zeros(bsz, hq, dtype=torch.bool, device=dev)
    if heads is not None:       # a copy: the stats never alias the caller's (or a cached) mask
        calibrated.copy_(heads)
    stats = {
        "scores": scores.reshape(bsz, hq, nk),
        "sinks": sinks.reshape(bsz, hq, nk),
        "sink_mass": mass.reshape(bsz, hq, nq),
        "calibrated": calibrated,
    }
    return out, stats


act_attention_triton.SUPPORTS_WINDOW = True
act_attention_triton.SUPPORTS_BLOCKS = True


# ---------------------------------------------------------------------------------------------
# torch.library: the backend as an op whose kernels a compiler sees
# ---------------------------------------------------------------------------------------------
# Every launch goes through ``kernels.aot.launch``, which, while a graph is traced, launches
# through ``torch.library.wrap_triton``: Inductor gets one triton kernel node per launch, and
# the torch ops between them (sink selection, compaction) as ordinary graph nodes. Nothing in the
# body reads a device value on the host, and every buffer is sized from shapes and host ints, so
# the traced graph has static shapes and can be captured in a CUDA graph.
#
# Under the Triton interpreter the kernels are plain Python functions that no tracer can record
# (``wrap_triton`` hands them back unwrapped): there the same body is registered as an opaque
# ``custom_op`` (same name, same schema), so that torch.compile still works on CPU; its fake
# implementation is the body itself, whose launches ``aot.launch`` skips on fake tensors.

OP_NAME = "act_kernels::act_attention_triton"
INTERPRETED = configs.is_interpreted(_flash_forward_kernel)


def _register(body):
    if INTERPRETED:
        op = torch.library.custom_op(OP_NAME, mutates_args=())(body)
        op.register_fake(body)
        return op
    return torch.library.triton_op(OP_NAME, mutates_args=())(body)


@_register
def act_attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            heads: Optional[torch.Tensor], pairs: Optional[torch.Tensor],
                            key_padding_mask: Optional[torch.Tensor], beta: float, tau: float,
                            scale: float, window: Optional[int] = None,
                            block_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.act_kernels.act_attention_triton``: the backend's output (no statistics).

    ``heads`` bool ``[B, Hq]`` or None; ``pairs`` int32 ``[P]`` ascending ``b * Hq + h``, the
    pairs given the column and correction passes: a head is calibrated when it is set in
    ``heads`` and listed in ``pairs``, so ``pairs`` must list every calibrated pair (the exact
    list where it is known on the host, every pair otherwise: correct, with column work for the
    uncalibrated heads too). ``key_padding_mask`` bool ``[B, Nk]`` or None; ``block_ids``
    integer ``[B, Nk]`` or None (bidirectional blocks, as ``act_attention_triton`` takes them).
    The arguments are assumed valid (see ``compiled_call``).
    """
    check_can_run(q)
    none = CalibratedPairs.none(q.shape[0] * q.shape[1], q.device)   # fresh: traced tensors
    cal = none if heads is None or pairs is None else CalibratedPairs.covering(heads, pairs)
    out, _ = _attend(q, k, v, cal, none.u_slot, None, beta, tau, scale, key_padding_mask, False,
                     window, block_ids)
    return out


def compiled_call(q, k, v, heads, key_padding_mask, beta: float, tau: float, scale: float,
                  window: Optional[int], block_ids=None) -> torch.Tensor:
    """``act_attention`` inside torch.compile with ``backend="triton"``: the registered op, its
    arguments built from host-known facts only. ``heads``: None, head indices (then exactly the
    listed pairs get column work) or a bool tensor ``[Hq]`` / ``[B, Hq]`` (its values are not
    known while tracing: every pair gets column work, the correction only the set ones).
    ``key_padding_mask``: None or bool ``[B, Nk]`` (its values are not checked here; an
    all-real mask runs the padded kernels). ``beta``, ``tau``, ``window``, ``block_ids``
    already checked (``block_ids``: None or integer ``[B, Nk]``, each block one run)."""
    bsz, hq = q.shape[0], q.shape[1]
    mask, pairs = _compiled_heads(heads, bsz, hq, q.device)
    if check_key_padding_mask(key_padding_mask, bsz, k.shape[2], q.device) is not None \
            and key_padding_mask.dtype != torch.bool:
        raise TypeError("act_attention: inside torch.compile, backend='triton' needs a bool "
                        "key_padding_mask [B, Nk] (True = real token)")
    return act_attention_triton_op(q, k, v, mask, pairs, key_padding_mask, beta, tau, scale,
                                   window, block_ids)


def _compiled_heads(heads, bsz: int, hq: int, device):
    """``(mask [B, Hq] or None, pairs int32 [P] or None)`` without reading device values (the
    argument read by ``params.check_heads``, its one home)."""
    heads = check_heads(heads, bsz, hq)
    if isinstance(heads, torch.Tensor):
        if heads.dtype != torch.bool:
            raise TypeError("act_attention: inside torch.compile, heads must be a bool tensor "
                            f"or a list of head indices, not a {heads.dtype} tensor")
        mask = heads.to(device).expand(bsz, hq)
        return mask, torch.arange(bsz * hq, device=device, dtype=torch.int32)
    if not heads:
        return None, None
    pairs = torch.tensor([b * hq + h for b in range(bsz) for h in heads], dtype=torch.int32,
                         device=device)
    return torch.ones(bsz, hq, dtype=torch.bool, device=device), pairs
