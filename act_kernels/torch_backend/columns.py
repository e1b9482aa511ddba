"""Pass 2, the exact column pass: ``sum_i P_ij`` of every key over the rows that see it.

``return_stats`` runs it over every key (it reports every score); the pruned prefill runs
:mod:`.bounds` instead and sums exactly only the keys that could be sinks. On large CPU inputs
the block of the pass is ``torch.compile``'d (:class:`CompiledBlock`), which fuses the mask, the
exponential and the column sum into one sweep after the matmul.
"""
from __future__ import annotations

import os
import warnings

import torch

from .blocks import key_span, kv_groups, work_dtype

# The column pass is matmul-bound: larger blocks (4 MiB, at least 64 rows a head) run faster.
COLUMN_BLOCK_FLOATS = 1 << 20
COLUMN_MIN_ROWS = 64
# Below this many q k^T entries per head the compiled block is not worth its compile time.
COMPILE_MIN_ENTRIES = 1 << 20


def column_block(q_rows, k_t, neg_lse_rows, first_pos: int, scale: float, window: int):
    """``sum_i P_ij`` over one block of rows of ``G`` heads sharing a kv head: ``[G, span]``.

    ``q_rows [G, R, D]``, ``k_t [D, span]``, ``neg_lse_rows [G, R]``; ``P_ij = exp(scale q_i.k_j -
    lse_i)``; row ``i`` sits at column ``first_pos + i`` of the span and sees the ``window``
    columns up to it. One matmul for the ``G`` heads; plain tensor code so that
    ``torch.compile`` fuses mask, exp and the column sum into one sweep after it.
    """
    heads, rows, dim = q_rows.shape
    s = torch.addmm(neg_lse_rows.reshape(-1, 1), q_rows.reshape(heads * rows, dim), k_t,
                    alpha=scale).view(heads, rows, -1)
    pos = first_pos + torch.arange(rows, device=q_rows.device)
    behind = pos[:, None] - torch.arange(k_t.shape[1], device=q_rows.device)[None, :]
    s = torch.where((behind >= 0) & (behind < window), s, float("-inf"))
    return torch.exp(s).sum(1)



def compile_errors() -> tuple:
    """The exceptions by which ``torch.compile`` reports that it could not compile (no working
    C++ compiler, an inductor or dynamo failure): every other error is the call's own."""
    from torch._dynamo import exc as dynamo_exc
    from torch._inductor import exc as inductor_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "InternalTorchDynamoError"),
             (inductor_exc, "InductorError"), (inductor_exc, "CppCompileError"),
             (inductor_exc, "InvalidCxxCompiler"), (inductor_exc, "LoweringException")]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


class CompiledBlock:
    """``torch.compile(column_block)``, compiled on first use.

    If compiling fails (:func:`compile_errors`) it warns once, switches itself off for the rest
    of the process (``enabled`` is False, ``failure`` says why) and the call is answered by the
    eager block. Any other error (a wrong shape, out of memory) is raised as it is.
    """

    def __init__(self):
        self.fn = None
        self.failure = None

    @property
    def enabled(self) -> bool:
        return self.failure is None

    def __call__(self, *args):
        if self.fn is None:
            self.fn = torch.compile(column_block, dynamic=True)
        try:
            return self.fn(*args)
        except Exception as err:
            if not isinstance(err, compile_errors()):
                raise
            self.failure = f"{err!r:.200}"
            self.fn = None
            warnings.warn(f"act_kernels: torch.compile of the column pass failed "
                          f"({self.failure}); using the slower eager column pass for the rest "
                          "of this process. Set ACT_KERNELS_COMPILE=0 to silence.", stacklevel=2)
            return column_block(*args)


COMPILED = CompiledBlock()


def pick_column_block(nq: int, nk: int):
    """The compiled block for large inputs (``ACT_KERNELS_COMPILE=0`` turns it off, ``=1`` forces
    it) while it has not failed to compile, else the eager one."""
    mode = os.environ.get("ACT_KERNELS_COMPILE", "auto").lower()
    if (mode in ("0", "false", "off") or (mode == "auto" and nq * nk < COMPILE_MIN_ENTRIES)
            or not COMPILED.enabled):
        return column_block
    return COMPILED


def column_sums(q, k, neg_lse, b_idx, h_idx, scale, window=None):
    """``[P, Nk]`` float32: ``sum_i P_ij`` over the rows that see ``j``, for each (b, h) pair.

    The exact column pass over every key (``return_stats`` uses it: it reports every score).
    ``neg_lse`` is ``-lse`` with ``-inf`` on rows that must not count (padded queries), so they
    add exact zeros. Pairs reading the same kv head share one matmul per block of rows; keys
    outside a block's :func:`key_span` are never computed. Padded keys get garbage sums, which
    the caller discards (no row sees them, so they have no score).
    """
    nq = q.shape[2]
    nk = k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = work_dtype(q.dtype)
    sums = torch.empty(len(b_idx), nk, dtype=work, device=q.device)
    block = pick_column_block(nq, nk)
    for (b, kv_head), members in kv_groups(b_idx, h_idx, group).items():
        pairs = [p for p, _ in members]
        q_heads = q[b, [h for _, h in members]].to(work)          # [G, Nq, D]
        kt = k[b, kv_head].to(work).t()
        nl = neg_lse[pairs]
        acc = torch.zeros(len(pairs), nk, dtype=work, device=q.device)
        width = nk if window is None else min(nk, 2 * window)        # about a span's keys
        rows = max(COLUMN_MIN_ROWS, COLUMN_BLOCK_FLOATS // (width * len(pairs)))
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            lo, hi = key_span(nk - nq + r0, nk - nq + r1 - 1, window)
            acc[:, lo:hi] += block(q_heads[:, r0:r1], kt[:, lo:hi], nl[:, r0:r1],
                                   nk - nq + r0 - lo, scale, window or nk + 1)
        sums[pairs] = acc
    return sums.float()


