"""The portable torch backend of ACT: exact, and never more than a block of rows of P in memory.

Data path for a prefill (``Nq > 1``)::

    q, k, v --plain pass--> out, lse          (fused SDPA kernel; every head)
            --column pass--> sum_i P_ij       (calibrated heads only; q k^T again, against lse)
            --sink selection--> S             (tiny: per key)
            --sink correction--> out          (calibrated heads, sink keys only, by the identity)

A decode step (``Nq == 1``) is one short vectorised pass over all heads at once: its single row
of P is as small as the output, so it is calibrated directly, without the identity.
"""
from __future__ import annotations

import torch

from .sinks import calibrate_rows, first_valid_index, seen_counts, select_sinks, stable_rest

# Upper bound on the floats of one block of q k^T (rows x keys) held by the column pass and the
# sink correction: 2**18 floats = 1 MiB, small enough to stay in a CPU core's L2 cache.
BLOCK_FLOATS = 1 << 18
MIN_BLOCK_ROWS = 16


def _block_rows(width: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_FLOATS // max(width, 1))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# plain pass
# --------------------------------------------------------------------------------------------

def visibility_bias(nq: int, nk: int, key_padding_mask, dtype, device) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, Nq, Nk]``: 0 where row i sees key j, -inf elsewhere."""
    rows = torch.arange(nk - nq, nk, device=device)[:, None]
    sees = (torch.arange(nk, device=device)[None, :] <= rows)[None]
    if key_padding_mask is not None:
        sees = sees & key_padding_mask[:, None, :] & key_padding_mask[:, nk - nq:, None]
    bias = torch.zeros(sees.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~sees, float("-inf"))[:, None]


def _plain_blocked(q, k, v, scale, key_padding_mask):
    """Exact plain attention with its log-sum-exp by blocks of rows, on any device."""
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = _work_dtype(q.dtype)
    out = torch.empty(bsz, hq, nq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=work, device=q.device)
    qg = q.reshape(bsz, hkv, group, nq, dim)
    rows = _block_rows(nk)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1
        bias = visibility_bias(r1 - r0, kend, None if key_padding_mask is None
                               else key_padding_mask[:, :kend], work, q.device)
        s = torch.matmul(qg[:, :, :, r0:r1].to(work), k[:, :, None, :kend].transpose(-1, -2).to(work))
        s = s * scale + bias[:, :, None]
        block_lse = torch.logsumexp(s, dim=-1)
        alive = torch.isfinite(block_lse)
        p = torch.exp(s - torch.where(alive, block_lse, torch.zeros_like(block_lse))[..., None])
        o = torch.matmul(p, v[:, :, None, :kend].to(work))
        out[:, :, r0:r1] = o.reshape(bsz, hq, r1 - r0, dim).to(q.dtype)
        lse[:, :, r0:r1] = torch.where(alive, block_lse, torch.zeros_like(block_lse)).reshape(
            bsz, hq, r1 - r0)
    return out, lse


def plain_attention(q, k, v, scale, key_padding_mask):
    """``(out [B, Hq, Nq, D], lse [B, Hq, Nq] float32)``, bottom-right causal, GQA unrepeated.

    Rows that see no key (padded queries) give 0 output and 0 lse.
    """
    nq, nk = q.shape[2], k.shape[2]
    if q.device.type == "cpu" and q.dtype != torch.float64:
        causal = key_padding_mask is None and nq == nk
        bias = None if causal else visibility_bias(nq, nk, key_padding_mask, q.dtype, q.device)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _plain_blocked(q, k, v, scale, key_padding_mask)


# --------------------------------------------------------------------------------------------
# column pass
# --------------------------------------------------------------------------------------------

def _future_mask(rows: int, device) -> torch.Tensor:
    """``[rows, rows - 1]`` bool: row i of a block must not see the c-th key after the block's
    first row position when ``c >= i`` (the causal triangle at the block's right edge)."""
    return torch.ones(rows, max(rows - 1, 0), dtype=torch.bool, device=device).triu_()


def column_sums(q, k, neg_lse, b_idx, h_idx, scale):
    """``[P, Nk]`` float32: ``sum_i P_ij`` over the rows that see ``j``, for each (b, h) pair.

    ``P_ij = exp(scale q_i.k_j - lse_i)``; ``neg_lse`` is ``-lse`` with ``-inf`` on rows that must
    not count (padded queries), so they add exact zeros. Keys past a block's last row are never
    computed and only the right-edge triangle is masked. Padded keys get garbage sums, which the
    caller discards (no row sees them, so they have no score).
    """
    nq, dim = q.shape[2], q.shape[3]
    nk = k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = _work_dtype(q.dtype)
    sums = torch.zeros(len(b_idx), nk, dtype=work, device=q.device)
    rows = _block_rows(nk)
    tri = _future_mask(rows, q.device)
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        qp = q[b, h].to(work)
        kt = k[b, h // group].to(work).t()
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            kend = nk - nq + r1
            s = torch.addmm(neg_lse[p, r0:r1, None], qp[r0:r1], kt[:, :kend], alpha=scale)
            edge = r1 - r0 - 1            # keys after the block's first row position
            if edge > 0:
                s[:, kend - edge:].masked_fill_(tri[: r1 - r0, :edge], float("-inf"))
            sums[p, :kend] += s.exp_().sum(0)
    return sums.float()


# --------------------------------------------------------------------------------------------
# sink correction
# --------------------------------------------------------------------------------------------

def _nonsink_rows(qp, kp, vp, neg_lse_rows, positions, skip_keys, scale):
    """Exact ``(sum_{j not in S} P_ij v_j, sum_{j not in S} P_ij)`` for a few rows, by blocks.

    ``skip_keys [Nk]`` marks the sinks and the padded keys."""
    nk = kp.shape[0]
    outs, rests = [], []
    rows = _block_rows(nk)
    for r0 in range(0, qp.shape[0], rows):
        r1 = min(qp.shape[0], r0 + rows)
        s = torch.addmm(neg_lse_rows[r0:r1, None], qp[r0:r1], kp.t(), alpha=scale)
        hidden = (torch.arange(nk, device=qp.device)[None, :] > positions[r0:r1, None]) | skip_keys
        pr = s.masked_fill_(hidden, float("-inf")).exp_()
        outs.append(pr @ vp)
        rests.append(pr.sum(1, keepdim=True))
    return torch.cat(outs), torch.cat(rests)


def sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated, beta, scale,
                    key_padding_mask):
    """Rewrite ``out`` in place for calibrated pairs; return ``sink_mass [P, Nq]`` for all pairs.

    For each row: ``m_i`` and ``w_i`` from the sink keys only, then the identity. Rows whose
    non-sink mass is below ``stable_rest`` lose too many digits in ``u - w``; their non-sink part
    is recomputed directly.
    """
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    work = _work_dtype(q.dtype)
    threshold = stable_rest(q.dtype)
    mass = torch.zeros(len(b_idx), nq, dtype=torch.float32, device=q.device)
    positions = torch.arange(nk - nq, nk, device=q.device)
    for p, (b, h) in enumerate(zip(b_idx.tolist(), h_idx.tolist())):
        idx = sinks[p].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        kp, vp = k[b, h // group], v[b, h // group]
        ks, vs = kp[idx].to(work), vp[idx].to(work)
        qp = q[b, h].to(work)
        first_row = max(0, int(idx[0]) - (nk - nq))   # earlier rows see no sink
        rows = _block_rows(idx.numel())
        for r0 in range(first_row, nq, rows):
            r1 = min(nq, r0 + rows)
            s = torch.addmm(neg_lse[p, r0:r1, None], qp[r0:r1], ks.t(), alpha=scale)
            s.masked_fill_(idx[None, :] > positions[r0:r1, None], float("-inf"))
            ps = s.exp_()
            m = ps.sum(1, keepdim=True)
            mass[p, r0:r1] = m.squeeze(1).float()
            if not calibrated[p]:
                continue
            w = ps @ vs
            u = out[b, h, r0:r1].to(work)
            new = calibrate_rows(u, w, m, beta)
            shaky = ((1.0 - m) < threshold).squeeze(1) & (m.squeeze(1) > 0)
            if bool(shaky.any()):
                sel = shaky.nonzero().squeeze(1)
                skip = sinks[p].clone()
                if key_padding_mask is not None:
                    skip |= ~key_padding_mask[b]
                rest_out, rest = _nonsink_rows(qp[r0:r1][sel], kp.to(work), vp.to(work),
                                               neg_lse[p, r0:r1][sel], positions[r0:r1][sel],
                                               skip, scale)
                ms = m[sel]
                fixed = beta * w[sel] + (1.0 - beta * ms) / rest.clamp(min=1e-300) * rest_out
                new[sel] = torch.where(rest > 0, fixed, u[sel])
            out[b, h, r0:r1] = new.to(out.dtype)
    return mass


# --------------------------------------------------------------------------------------------
# decode: one row per head, all heads at once
# --------------------------------------------------------------------------------------------

def _decode(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats):
    bsz, hq, _, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = _work_dtype(q.dtype)
    # [B, Hkv, group, Nk]: the query heads of a group read their kv head once, unrepeated.
    logits = torch.matmul(q.reshape(bsz, hkv, group, dim).to(work), k.to(work).transpose(-1, -2))
    logits.mul_(scale)
    alive = None
    if key_padding_mask is not None:
        alive = key_padding_mask[:, -1]                       # is the query itself real?
        hidden = ~key_padding_mask | ~alive[:, None]
        logits.masked_fill_(hidden[:, None, None, :], float("-inf"))
        logits.masked_fill_(~alive[:, None, None, None], 0.0)   # a dead row: finite, zeroed below
    probs = torch.softmax(logits, dim=-1).view(bsz, hq, nk)

    stats = None
    if heads is not None or return_stats:
        seen = probs if alive is None else probs * alive[:, None, None]
        if key_padding_mask is not None:
            seen = seen * key_padding_mask[:, None, :]
        first = first_valid_index(key_padding_mask, bsz, q.device)
        not_first = torch.arange(nk, device=q.device)[None, :] != first[:, None]
        sinks = (seen > tau) & not_first[:, None, :]
        sink_probs = torch.where(sinks, probs, torch.zeros_like(probs))
        mass = sink_probs.sum(-1, keepdim=True)
        rest = (probs - sink_probs).sum(-1, keepdim=True)
        if heads is not None:
            change = heads[:, :, None] & (mass > 0) & (rest > 0)
            gain = (1.0 - beta * mass) / torch.where(change, rest, torch.ones_like(rest))
            moved = torch.where(sinks, beta * probs, probs * gain)
            probs = torch.where(change, moved, probs)
        if return_stats:
            stats = {"scores": seen.float(), "sinks": sinks, "sink_mass": mass.float(),
                     "calibrated": _calibrated(heads, bsz, hq, q.device)}
    out = torch.matmul(probs.view(bsz, hkv, group, nk), v.to(work)).reshape(bsz, hq, 1, dim)
    if alive is not None:
        out = out * alive[:, None, None, None]
    return out.to(q.dtype), stats


def _calibrated(heads, bsz, hq, device):
    if heads is None:
        return torch.zeros(bsz, hq, dtype=torch.bool, device=device)
    return heads.clone()


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------

def act_attention_torch(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats):
    """Backend entry point (arguments normalised by :func:`act_kernels.op.act_attention`)."""
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    if nq == 1:
        return _decode(q, k, v, heads, beta, tau, scale, key_padding_mask, return_stats)

    out, lse = plain_attention(q, k, v, scale, key_padding_mask)
    wanted = torch.ones(bsz, hq, dtype=torch.bool, device=q.device) if return_stats else heads
    if wanted is None:
        return out, None

    b_idx, h_idx = wanted.nonzero(as_tuple=True)
    neg_lse = -lse[b_idx, h_idx].to(_work_dtype(q.dtype))
    if key_padding_mask is not None:   # padded query rows count for nothing
        dead = ~key_padding_mask[:, nk - nq:]
        neg_lse.masked_fill_(dead[b_idx], float("-inf"))
    sums = column_sums(q, k, neg_lse, b_idx, h_idx, scale)
    counts = seen_counts(nq, nk, key_padding_mask, bsz, q.device)[b_idx]
    first = first_valid_index(key_padding_mask, bsz, q.device)[b_idx]
    scores, sinks = select_sinks(sums[:, None], counts, tau, first)
    scores, sinks = scores[:, 0], sinks[:, 0]

    calibrated = (heads[b_idx, h_idx] if heads is not None
                  else torch.zeros(len(b_idx), dtype=torch.bool, device=q.device))
    out = out.contiguous() if not out.is_contiguous() else out
    mass = sink_correction(out, q, k, v, neg_lse, b_idx, h_idx, sinks, calibrated.tolist(),
                           beta, scale, key_padding_mask)
    if not return_stats:
        return out, None
    stats = {
        "scores": scores.reshape(bsz, hq, nk),
        "sinks": sinks.reshape(bsz, hq, nk),
        "sink_mass": mass.reshape(bsz, hq, nq),
        "calibrated": _calibrated(heads, bsz, hq, q.device),
    }
    return out, stats
