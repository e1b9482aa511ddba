"""The calibrated rows of a CPU decode step as one compiled loop (numba), after the plain step.

At decode sizes a torch op costs its dispatch, not its arithmetic: finding a calibrated row's
sinks and calibrating it take about ten small ops per layer in the torch step (logits, softmax,
the comparison, the host read, the shift, the masked SDPA call), 5-7% of a SmolLM2 step with the
typical profile on a 2-core CPU (``benchmarks/RESULTS.md``, issue 22). Here the plain step runs
as for ``heads=None`` (so every uncalibrated row is that step bit for bit, and so is every
calibrated row without a sink) and one numba function then walks the calibrated rows only, each
over its kv head's keys:

1. ``s_j = scale q . k_j``, the dot product in the input's dtype (float32 or float64, as the
   torch step's logits), kept in float64, and the row's max ``M``;
2. ``e_j = exp(s_j - M)`` and ``Z = sum_j e_j`` in float64; the sinks are the keys ``j >= 1``
   with ``e_j > tau Z`` (``P_j > tau``; the first key is never a sink). A row without a sink
   keeps the plain output;
3. the non-sink mass ``r``, exact however close the sink mass ``m`` is to 1:
   ``log r = (M' + log Z') - (M + log Z)`` with ``Z'`` the sum of ``exp(s_j - M')`` over the
   non-sink keys and ``M'`` their max (pass 2's ``e_j`` serve for it while ``M' - M`` keeps
   them normal numbers). A row whose ``log r`` is below
   :data:`~act_kernels.calibration.NO_REST_LOG` (no non-sink mass even in float64) keeps the
   plain output, as the spec's rows do;
4. the row ``o = beta w + (1 - beta m) a`` (``docs/spec.md`` step 4; float64 sums), with ``w``
   the sink part. The non-sink average ``a`` comes the two ways of
   :mod:`act_kernels.calibration`: by the identity ``a = (u - w) / r`` from the plain row ``u``
   while ``r`` is at least :func:`~act_kernels.calibration.stable_rest` of its dtype (only the
   sinks' rows of v are read), else recomputed as ``sum_j e'_j v_j / Z'`` over the non-sink
   keys.

The loop is single-threaded and its cost grows with the calibrated rows times the keys, while
the torch step's grows with every row: it is taken while the calibrated rows are at most
``1 / MAX_ROW_SHARE`` of the call's and, times the keys, at most :data:`MAX_ROW_KEYS`. Calls
with masks, padding or statistics, gradients, half precision, other devices and the direct way
(``decode.DIRECT_MIN_KEYS`` keys on) keep the torch step. numba is an optional dependency
(``pip install act-kernels[cpu]``); without it the torch step runs and a warning says so.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..calibration import NO_REST_LOG, stable_rest
from ..tensor_cache import TensorCache

try:
    import numba
except ImportError:          # optional: the torch step runs instead (with a warning)
    numba = None

# Pass 2's ``e_j`` are relative to the row's max. While the largest non-sink one is at least
# exp(-600) ~ 1e-261, every non-sink term that matters is a normal number (a subnormal one is
# < 1e-47 of that largest), so ``Z'`` is summed from them; below, pass 3 recomputes the non-sink
# part against its own max.
_RESCALE = -600.0

# The loop is taken while the calibrated rows are at most 1 / MAX_ROW_SHARE of the call's rows
# and, times the keys, at most MAX_ROW_KEYS: measured against the torch step at 1 and 2 threads
# (benchmarks/RESULTS.md, issue 22), it is then 0.44x-0.79x of it; beyond either it can be slower.
MAX_ROW_SHARE = 4
MAX_ROW_KEYS = 8192

_DTYPES = (torch.float32, torch.float64)


def rows_to_take(q, k, v, heads):
    """The calibrated rows of this call (``[R, 2]``: batch row, head) if the loop takes them, else
    None: CPU, float32 or float64, no gradient to keep, ``R x Nk <=`` :data:`MAX_ROW_KEYS`
    (``heads`` a bool ``[B, Hq]``, read once per heads tensor). Warns (once) when numba is
    missing. Kept to attribute reads: on a decode step's hot path every line runs cold."""
    if not (q.is_cpu and q.dtype in _DTYPES and q.dtype is k.dtype is v.dtype):
        return None
    # gradients.needs_gradients, written out: that module is a layer above the backend
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    rows = _ROWS.get(heads, _listed)
    if len(rows) * k.shape[2] > MAX_ROW_KEYS or len(rows) * MAX_ROW_SHARE > heads.numel():
        return None
    if numba is None:
        warnings.warn("act_kernels: numba is not installed, so CPU decode steps with calibrated "
                      "heads take the unfused torch step (several small ops per layer, about "
                      "5% of a small model's step); install it with "
                      "`pip install act-kernels[cpu]`", RuntimeWarning, stacklevel=2)
        return None
    return rows


def _listed(heads: torch.Tensor) -> np.ndarray:
    return heads.nonzero().numpy().astype(np.int64)


_ROWS = TensorCache(views=False)     # keyed by the heads tensor itself: a third of the lookup


def calibrate(q, k, v, out, rows, beta: float, tau: float, scale: float) -> None:
    """Calibrate in place the ``rows`` (from :func:`rows_to_take`) of ``out [B, Hq, 1, D]``, the
    plain step of ``q [B, Hq, 1, D]`` over ``k, v [B, Hkv, Nk, D]``."""
    if len(rows):          # numpy views of the data (detached: no graph, as checked)
        _calibrate_rows((q.detach() if q.requires_grad else q).numpy(),
                        (k.detach() if k.requires_grad else k).numpy(),
                        (v.detach() if v.requires_grad else v).numpy(), out.numpy(), rows,
                        beta, tau, scale, NO_REST_LOG, _STABLE[out.dtype])


_STABLE = {dtype: stable_rest(dtype) for dtype in _DTYPES}


def _loop(q, k, v, out, rows, beta, tau, scale, no_rest_log, stable):
    group = q.shape[1] // k.shape[1]
    nk, dim = k.shape[2], k.shape[3]
    s = np.empty(nk, np.float64)
    e = np.empty(nk, np.float64)
    sink = np.empty(nk, np.bool_)
    acc = np.empty(dim, np.float64)
    qr = np.empty(dim, q.dtype)
    zero = np.zeros(1, q.dtype)[0]        # the dot products' sums in the input's dtype
    for r in range(rows.shape[0]):
        b, h = rows[r, 0], rows[r, 1]
        kv = h // group
        kr, vr = k[b, kv], v[b, kv]
        qr[:] = q[b, h, 0]                   # a contiguous copy: the dot products vectorize
        top = -np.inf                                   # pass 1: logits and their max M
        for j in range(nk):
            dot = zero
            for d in range(dim):
                dot += qr[d] * kr[j, d]
            s[j] = dot * scale
            top = max(top, s[j])
        total = 0.0                                     # pass 2: Z, then the sinks
        for j in range(nk):
            e[j] = math.exp(s[j] - top)
            total += e[j]
        found = False
        top_rest = s[0]
        rest = e[0]
        sink[0] = False
        for j in range(1, nk):
            sink[j] = e[j] > tau * total
            found |= sink[j]
            if not sink[j]:
                top_rest = max(top_rest, s[j])
                rest += e[j]
        if not found:
            continue
        if top_rest - top < _RESCALE:        # pass 3: the non-sink part against its own max
            rest = 0.0
            for j in range(nk):
                if not sink[j]:
                    e[j] = math.exp(s[j] - top_rest)
                    rest += e[j]
        else:                                # e_j are normal numbers: no need to recompute
            top_rest = top
        log_r = (top_rest + math.log(rest)) - (top + math.log(total))
        if log_r < no_rest_log:
            continue
        r_mass = math.exp(log_r)
        acc[:] = 0.0
        if r_mass >= stable:     # the identity from the plain row u: only the sinks' v is read
            mass = 0.0
            for j in range(1, nk):
                if sink[j]:
                    p = e[j] / total
                    mass += p
                    for d in range(dim):
                        acc[d] += p * vr[j, d]
            keep = (1.0 - beta * mass) / r_mass
            for d in range(dim):
                out[b, h, 0, d] = beta * acc[d] + keep * (out[b, h, 0, d] - acc[d])
            continue
        keep = ((1.0 - beta) + beta * r_mass) / rest          # (1 - beta m) / Z'
        on_sink = beta / total
        for j in range(nk):                  # recomputed: the whole row of v
            w = e[j] * (on_sink if sink[j] else keep)
            for d in range(dim):
                acc[d] += w * vr[j, d]
        for d in range(dim):
            out[b, h, 0, d] = acc[d]


def compiled(fn):
    """``fn`` compiled by numba (None without numba): reassociation lets the dot products and
    the row sums use vector lanes, no other fast-math flag (infinities are real values here).
    Cached on disk where numba finds a writable place, else compiled once per process (numba
    refuses ``cache=True`` outright when it finds none; a read-only install must still import)."""
    if numba is None:
        return None
    options = dict(nogil=True, fastmath={"reassoc", "contract"})
    try:
        return numba.njit(fn, cache=True, **options)
    except RuntimeError:
        return numba.njit(fn, **options)


_calibrate_rows = compiled(_loop)
