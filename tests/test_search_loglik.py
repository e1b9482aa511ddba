"""The search's log-likelihood objective (``act search --objective loglik``) on the tiny random
Llama of ``test_pipeline``: candidates, screen and baseline score option log-likelihoods.

Checks: the candidate engine's option rows (prefix reuse, sinkless rows skipped, chosen samples
only) give each candidate the outcome of the plain scorer run with that head calibrated; the
screen's first-order estimate of the decision margin (gold option's log-likelihood minus the best
other's) matches the exact change for small changes; a search's baseline is the plain scorer's
log-likelihood scoring.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_pipeline import _cfg, setup  # noqa: F401  (setup is a fixture)

LOW_TAU = 0.04


def _samples(setup, n: int):
    from act_kernels.scoring import calibration_examples, encode_examples

    samples = []
    for task, exs in calibration_examples(["sst2", "arc_easy"], n, 0, setup["data"]).items():
        samples += encode_examples(task, exs, setup["tok"], False, None, start=len(samples),
                                   loglik=True)
    return samples


@pytest.mark.parametrize("objective", ["loglik", "loglik/char"])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_candidates_score_as_the_plain_scorer(setup, objective, reuse_prefix):
    from act_kernels.scoring import PlainScorer
    from act_kernels.search import Scorer

    model, tok = setup["model"], setup["tok"]
    samples = _samples(setup, 10)
    n = len(samples)
    plain = PlainScorer(model, tok, tau=LOW_TAU, batch_size=3)
    scorer = Scorer(model, tok, tau=LOW_TAU, batch_size=3, max_rows=5, objective=objective,
                    reuse_prefix=reuse_prefix)
    baseline = scorer.plain(n, samples)
    ref_base = plain.plain(n, samples, protocol=objective)
    assert torch.equal(baseline.correct, ref_base.correct)
    torch.testing.assert_close(baseline.decision, ref_base.decision, atol=1e-4, rtol=0)
    todo = {1: [0, 1, 2, 3], 2: [1, 3]}
    got = {}
    scorer.candidates(n, samples, baseline, todo,
                      lambda layer, res: got.update({(layer, h): r for h, r in res.items()}))
    assert set(got) == {(l, h) for l, hs in todo.items() for h in hs}
    changed = 0
    for (layer, head), res in got.items():
        ref = plain.plain(n, samples, {layer: [head]}, protocol=objective)
        assert torch.equal(res.correct, ref.correct), (layer, head)
        assert torch.equal(res.pred, ref.pred), (layer, head)
        torch.testing.assert_close(res.decision, ref.decision, atol=1e-4, rtol=0)
        changed += int((ref.decision - ref_base.decision).abs().gt(1e-3).sum())
    assert changed > 10, "no candidate changes a margin: the test would be vacuous"
    # on chosen samples only: those run, the others keep the baseline's outcome
    only = {key: {s.index for s in samples[::3]} for key in got}
    part = {}
    scorer.candidates(n, samples[::3], baseline, todo,
                      lambda layer, res: part.update({(layer, h): r for h, r in res.items()}),
                      only=only)
    for key, res in part.items():
        pick = torch.as_tensor(sorted(only[key]))
        torch.testing.assert_close(res.decision[pick], got[key].decision[pick], atol=1e-5, rtol=0)
        rest = torch.ones(n, dtype=torch.bool)
        rest[pick] = False
        assert torch.equal(res.decision[rest], baseline.decision[rest])


def test_first_order_estimate_of_the_loglik_margin(setup):
    """Estimate vs exact change of the log-likelihood decision margin, every head of three
    layers calibrated alone, on two-option and three-option (multi-token options) samples."""
    from act_kernels.scoring import PlainScorer
    from act_kernels.search import Scorer
    from act_kernels.search.screen import FirstOrderScreen

    model, tok = setup["model"], setup["tok"]
    samples = _samples(setup, 8)
    batch = samples[:2] + samples[-3:]
    assert {s.task for s in batch} == {"sst2", "arc_easy"}
    assert max(n for s in batch for _, n, _ in s.options) > 1      # multi-token continuations
    layers = [1, 2, 3]
    n = len(samples)
    for beta, rel in ((0.99, 0.03), (0.9, None)):
        scorer = Scorer(model, tok, beta=beta, tau=LOW_TAU, objective="loglik")
        est, value, scored = FirstOrderScreen(scorer).estimate_options(batch, layers)
        plain = PlainScorer(model, tok, beta=beta, tau=LOW_TAU)
        base = plain.plain(n, batch, protocol="loglik")
        idx = torch.as_tensor([s.index for s in batch])
        torch.testing.assert_close(value.double(), base.decision[idx], atol=1e-3, rtol=0)
        assert torch.equal(scored["correct"].double(), base.correct[idx])
        exact = torch.zeros_like(est, dtype=torch.float64)
        for i, layer in enumerate(layers):
            for head in range(scorer.num_heads):
                res = plain.plain(n, batch, {layer: [head]}, protocol="loglik")
                exact[:, i, head] = res.decision[idx] - base.decision[idx]
        scale = exact.abs().max().item()
        assert scale > 0 and int((exact.abs() > 1e-3 * scale).sum()) >= 10
        err = (est.double() - exact).abs().max().item()
        if rel is not None:
            assert err <= rel * scale, (err, scale)
            # the sign of every clear change is predicted
            clear = exact.abs() > 0.1 * scale
            assert torch.equal(torch.sign(est.double()[clear]), torch.sign(exact[clear]))
        else:
            assert err > 0          # a larger change: first order is no longer exact


def test_search_baseline_is_plain_loglik_scoring(setup, tmp_path):
    from act_kernels.runtime import Dist
    from act_kernels.scoring import PlainScorer, Results
    from act_kernels.search import run_search
    from act_kernels.search.core import CHECKPOINT, load_data, new_state

    model, tok = setup["model"], setup["tok"]
    for strategy in ("screen", "exhaustive"):
        cfg = _cfg(setup, objective="loglik", strategy=strategy, screen_top=3, tau=LOW_TAU,
                   exact_check="all" if strategy == "exhaustive" else "boundary")
        out = tmp_path / strategy
        summary = run_search(model, tok, cfg, out)
        rec = next(json.loads(l) for l in (out / CHECKPOINT).read_text().splitlines()
                   if json.loads(l)["kind"] == "baseline")
        st = new_state(model, tok, cfg, tmp_path / f"samples_{strategy}", Dist(), None)
        load_data(st, tok)
        ref = PlainScorer(model, tok, tau=LOW_TAU, batch_size=3).plain(
            st.n, st.samples, protocol="loglik")
        assert torch.equal(Results.from_record(rec).correct, ref.correct), strategy
        assert summary["profile"].provenance["objective"] == "loglik"
        assert summary["baseline"]["val"]["acc"] == pytest.approx(
            float(ref.correct[[s.index for s in st.val]].mean()))
