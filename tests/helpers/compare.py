"""What several test modules share to judge the op: the tolerances per dtype and ``check``,
the comparison of a backend's output and statistics with the float64 brute force."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from act_kernels import ACTStats, act_attention
from bruteforce import BruteForce, bruteforce_details
from inputs import backend_name, make_qkv

# ----------------------------------------------------------------------------------------------
# tolerances and the comparison helper
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tol:
    out_atol: float    # times max |v|
    out_rtol: float
    score_atol: float
    score_rtol: float
    mass_atol: float


# Half precision: the output is rounded to 11 (fp16) or 8 (bf16) significant bits; the statistics
# are float32 but a fused half kernel may hand back a slightly different log-sum-exp.
TOLS = {
    torch.float64: Tol(1e-12, 1e-12, 1e-5, 1e-6, 1e-5),
    torch.float32: Tol(2e-5, 1e-5, 1e-5, 1e-5, 2e-5),
    torch.float16: Tol(1.5e-3, 2e-3, 2e-4, 1e-3, 5e-4),
    torch.bfloat16: Tol(1e-2, 1e-2, 2e-4, 1e-3, 5e-4),
}

# A float64 non-sink mass this small is zero in float32 (the spec computes P in float32): the
# spec leaves such a row unchanged ("or underflows"), but calibrating it is right too.
UNDERFLOW_REST = 1e-30


def tie_band(tau: float, tol: Tol) -> float:
    """Scores this close to tau may land on either side of it in a float32 backend."""
    return min(tol.score_atol, 0.01 * tau) + tol.score_rtol * tau


def describe(q, k, v, **kw) -> str:
    parts = [f"q{tuple(q.shape)} k{tuple(k.shape)} {str(q.dtype).replace('torch.', '')}"]
    parts += [f"{name}={value}" for name, value in kw.items() if value is not None]
    return " ".join(parts)


def assert_out_close(out: torch.Tensor, bf: BruteForce, v: torch.Tensor, tol: Tol, where: str):
    """``out`` against the brute force on the rows that see a key; others must be finite.

    Rows whose non-sink mass underflows may be either left unchanged or calibrated.
    """
    assert out.shape == bf.out.shape, where
    assert torch.isfinite(out).all(), f"non-finite output: {where}"
    got = out.detach().double().cpu()
    vscale = max(v.detach().double().abs().max().item(), 1e-30)

    def near(want):
        return (got - want).abs() <= tol.out_atol * vscale + tol.out_rtol * want.abs()

    underflow = (bf.changed & (bf.rest < UNDERFLOW_REST))[..., None]
    padded = ~bf.row_valid[:, None, :, None]
    ok = near(bf.out) | (underflow & near(bf.plain)) | padded
    if not bool(ok.all()):
        bad = tuple((~ok).nonzero()[0].tolist())
        worst = ((got - bf.out).abs() * ~padded).max().item()
        raise AssertionError(
            f"output differs from the brute force at [b,h,i,d]={list(bad)}: got {got[bad]:.8g}, "
            f"want {bf.out[bad]:.8g}; max abs error {worst:.3g}, allowed {tol.out_atol:g} * "
            f"{vscale:.3g} + {tol.out_rtol:g} * |want|; {int((~ok).sum())} bad entries: {where}")


def assert_stats_close(stats: ACTStats, bf: BruteForce, heads, tau: float, tol: Tol, where: str):
    """Shapes, dtypes, scores, sinks (up to ties with tau) and the calibrated flags."""
    bsz, hq, nk = bf.scores.shape
    nq = bf.sink_mass.shape[-1]
    assert stats.scores.shape == (bsz, hq, nk) and stats.scores.dtype == torch.float32, where
    assert stats.sinks.shape == (bsz, hq, nk) and stats.sinks.dtype == torch.bool, where
    assert stats.sink_mass.shape == (bsz, hq, nq) and stats.sink_mass.dtype == torch.float32, where
    assert stats.calibrated.shape == (bsz, hq) and stats.calibrated.dtype == torch.bool, where

    scores = stats.scores.double().cpu()
    err = (scores - bf.scores).abs()
    worst = err.max().item()
    assert bool((err <= tol.score_atol + tol.score_rtol * bf.scores.abs()).all()), (
        f"scores: max abs error {worst:.3g} at {err.argmax().item()} (flat): {where}")
    unseen = ~bf.key_seen[:, None, :].expand(bsz, hq, nk)
    assert bool((stats.scores.cpu()[unseen] == 0).all()), f"keys no row sees must score 0: {where}"

    sinks = stats.sinks.cpu()
    differ = sinks != bf.sinks
    near_tau = (bf.scores - tau).abs() <= tie_band(tau, tol)
    assert not bool((differ & ~near_tau).any()), (
        f"sinks differ away from tau at [b,h,j]={(differ & ~near_tau).nonzero()[0].tolist()}: "
        f"{where}")

    want = torch.zeros(bsz, hq, dtype=torch.bool) if heads is None else _as_mask(heads, bsz, hq)
    assert torch.equal(stats.calibrated.cpu(), want), f"calibrated != heads: {where}"


def assert_sink_mass_close(stats: ACTStats, bf: BruteForce, tol: Tol, where: str):
    """m_i on the rows that see a key (``bf`` uses the backend's sinks); finite elsewhere."""
    assert torch.isfinite(stats.sink_mass).all(), f"non-finite sink_mass: {where}"
    valid = bf.row_valid[:, None, :].expand_as(bf.sink_mass)
    err = ((stats.sink_mass.double().cpu() - bf.sink_mass).abs() * valid).max().item()
    assert err <= tol.mass_atol, f"sink_mass: max abs error {err:.3g}: {where}"


def _as_mask(heads, bsz: int, hq: int) -> torch.Tensor:
    if isinstance(heads, torch.Tensor) and heads.dtype == torch.bool:
        return heads.cpu().expand(bsz, hq) if heads.dim() == 1 else heads.cpu()
    row = torch.zeros(hq, dtype=torch.bool)
    row[list(heads)] = True
    return row.expand(bsz, hq)


def check(backend, q, k, v, *, heads=None, beta=0.4, tau=0.1, scale=None, key_padding_mask=None,
          seed=None, tol=None, window=None, **masks):
    """Run the op with and without stats and compare both with the brute force.

    ``masks``: the general masks (``segment_ids``, ``block_ids``, ``attn_mask``), passed to
    both.

    Where the backend decided a key tying with tau the other way, the brute force is recomputed
    with the backend's sinks, so the output is still checked exactly. Returns
    ``(out, stats, bf)``.
    """
    mask = None if heads is None else _as_mask(heads, q.shape[0], q.shape[1])
    pads = None if key_padding_mask is None else (~key_padding_mask).sum(1).tolist()
    where = describe(q, k, v, backend=backend, seed=seed, beta=beta, tau=tau, scale=scale,
                     pads=pads, window=window,
                     heads=None if mask is None else mask.int().tolist())
    tol = tol or TOLS[q.dtype]
    kw = dict(heads=heads, beta=beta, tau=tau, scale=scale, key_padding_mask=key_padding_mask,
              backend=backend_name(backend), window=window, **masks)
    out, stats = act_attention(q, k, v, return_stats=True, **kw)
    out_only = act_attention(q, k, v, **kw)
    assert isinstance(out_only, torch.Tensor) and out_only.dtype == q.dtype, where
    assert out.dtype == q.dtype, where

    bf = bruteforce_details(q, k, v, mask, beta, tau, scale, key_padding_mask, window=window,
                            **masks)
    assert_stats_close(stats, bf, heads, tau, tol, where)
    if not torch.equal(stats.sinks.cpu(), bf.sinks):   # only ties with tau differ (checked above)
        bf = bruteforce_details(q, k, v, mask, beta, tau, scale, key_padding_mask,
                                window=window, force_sinks=stats.sinks, **masks)
    assert_sink_mass_close(stats, bf, tol, where)
    assert_out_close(out, bf, v, tol, where + " [return_stats=True]")
    assert_out_close(out_only, bf, v, tol, where + " [return_stats=False]")
    return out, stats, bf


def assert_stats_calibrated_is_fresh(backend, spelling, nq=9):
    bsz, hq, hkv, nk, dim = 2, 4, 2, 13, 16
    q, k, v = make_qkv(bsz, hq, hkv, nq, nk, dim, seed=41, planted=[5])
    rows = torch.tensor([[True, False, False, True]] * bsz)
    heads = {"bool [B, Hq]": rows.clone(), "bool [Hq]": rows[0].clone(),
             "index list": [0, 3]}[spelling]
    want = act_attention(q, k, v, heads=heads, tau=0.05, backend=backend)
    out, stats = act_attention(q, k, v, heads=heads, tau=0.05, backend=backend,
                               return_stats=True)
    # (Triton's decode without stats is its one-pass kernel: equal up to rounding)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats.calibrated, rows)
    stats.calibrated.zero_()
    assert torch.equal(act_attention(q, k, v, heads=heads, tau=0.05, backend=backend), want)
    stats.calibrated.fill_(True)
    _, again = act_attention(q, k, v, heads=heads, tau=0.05, backend=backend, return_stats=True)
    assert torch.equal(again.calibrated, rows)
    assert not torch.equal(want, act_attention(q, k, v, tau=0.05, backend=backend))
