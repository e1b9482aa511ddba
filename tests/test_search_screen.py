"""The screened head search (``--strategy screen``) on a tiny random Llama.

Checks: the first-order estimate equals the exact objective change of each head calibrated alone
when the change is small (and its error shrinks as a second-order term); screen and exhaustive
strategies run end to end and agree on the heads both score exactly; the screen stage resumes to
the same files; the greedy and "does no harm" rules keep heads only on evidence and write an
empty profile when the final set does not beat the uncalibrated model.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_pipeline import _cfg, _files, setup, stop_at  # noqa: F401  (setup is a fixture)

LOW_TAU = 0.04     # the tiny model's attention is flat: a lower threshold gives it sinks


def _samples(setup, n: int):
    from act_kernels.scoring import calibration_examples, encode_examples

    samples = []
    for task, exs in calibration_examples(["sst2", "arc_easy"], n, 0, setup["data"]).items():
        samples += encode_examples(task, exs, setup["tok"], False, None, start=len(samples))
    return samples


def _estimate_and_exact(setup, beta: float, layers, batch):
    from act_kernels import head_override
    from act_kernels.search import Scorer
    from act_kernels.scoring import pad_batch
    from act_kernels.search.screen import FirstOrderScreen, objective_values

    model, tok = setup["model"], setup["tok"]
    scorer = Scorer(model, tok, beta=beta, tau=LOW_TAU)
    ids, mask = pad_batch(batch, tok, "cpu")
    items = [s.item for s in batch]
    estimate, value, scored = FirstOrderScreen(scorer).estimate(ids, mask, items, layers)
    exact = torch.zeros_like(estimate)
    with torch.no_grad():
        plain = objective_values(scorer.runner.forward_last(ids, mask), items)
        torch.testing.assert_close(value, plain, atol=1e-4, rtol=0.0)   # SDPA vs plain ACT
        torch.testing.assert_close(scored["decision_margin"], value, atol=1e-6, rtol=0.0)
        for i, layer in enumerate(layers):
            for head in range(scorer.num_heads):
                with head_override(model, {layer: [head]}, beta=beta, tau=LOW_TAU,
                                   backend="torch"):
                    calibrated = objective_values(scorer.runner.forward_last(ids, mask), items)
                exact[:, i, head] = calibrated - plain
    return estimate, exact


def test_first_order_estimate_equals_small_exact_change(setup):
    batch = _samples(setup, 8)[:6]
    layers = [1, 2, 3]
    errors = {}
    for beta in (0.9, 0.99):          # 1 - beta scales the calibration's change of the output
        estimate, exact = _estimate_and_exact(setup, beta, layers, batch)
        scale = exact.abs().max().item()
        assert scale > 0, "no head changes the margin: the test would be vacuous"
        assert int((exact.abs() > 1e-3 * scale).sum()) >= 10
        errors[beta] = (estimate - exact).abs().max().item()
        if beta == 0.99:
            assert errors[beta] <= 0.02 * scale, (errors[beta], scale)
            torch.testing.assert_close(estimate, exact, atol=0.02 * scale, rtol=0.0)
    # second order: ten times smaller a change, about a hundred times smaller an error
    assert errors[0.99] < errors[0.9] / 30, errors


def test_objective_gradient_is_finite_on_mixed_batches(setup):
    """A batch mixing two-option and three-option items (padded options) gives finite grads."""
    from act_kernels.search import Scorer
    from act_kernels.scoring import pad_batch
    from act_kernels.search.screen import FirstOrderScreen

    samples = _samples(setup, 8)
    batch = [samples[0], samples[-1]]
    assert {s.task for s in batch} == {"sst2", "arc_easy"}
    scorer = Scorer(setup["model"], setup["tok"], tau=LOW_TAU)
    ids, mask = pad_batch(batch, setup["tok"], "cpu")
    for objective in ("decision", "margin", "logprob"):
        est, value, _ = FirstOrderScreen(scorer, objective).estimate(
            ids, mask, [s.item for s in batch], [1, 3])
        assert torch.isfinite(est).all() and est.abs().sum() > 0, objective
        assert torch.isfinite(value).all(), objective


def test_decision_margin_sign_is_correctness():
    """The screen's default objective: its sign is the answer's correctness, for label
    classification and for greedy multiple choice over the whole vocabulary (where the option
    margin is not: a non-option token can win)."""
    from act_kernels.tasks import score_last_logits
    from act_kernels.tasks.task import ScoreItem

    gen = torch.Generator().manual_seed(0)
    items = ([ScoreItem("multiple_choice", ((5, 6), (7, 8), (9,), (10, 11)), g)
              for g in range(4)] * 40 + [ScoreItem("classification", ((5,), (7,)), g)
                                         for g in range(2)] * 40)
    logits = torch.randn(len(items), 30, generator=gen) * 2
    logits[::3, 5:12] += 4                   # options often win, sometimes an outsider does
    out = score_last_logits(logits, items)
    assert ((out["decision_margin"] > 0) == out["correct"]).all()
    mc = torch.tensor([it.kind == "multiple_choice" for it in items])
    option_wrong = mc & ((out["gold_logprob_margin"] > 0) != out["correct"])
    assert option_wrong.any(), "no outsider token wins: the MC case would be untested"


def test_screen_and_exhaustive_end_to_end(setup, tmp_path):
    from act_kernels.search import run_search

    model, tok = setup["model"], setup["tok"]
    exhaustive = run_search(model, tok, _cfg(setup, tau=LOW_TAU), tmp_path / "exhaustive")
    screen = run_search(model, tok, _cfg(setup, tau=LOW_TAU, strategy="screen", screen_top=3,
                                         exact_check="all"), tmp_path / "screen")
    assert len(exhaustive["rows"]) == 8 and not exhaustive["estimates"]
    assert len(screen["rows"]) == 3 and len(screen["estimates"]) == 8
    # the exactly scored heads are the screen's top 3 (predicted answers gained, then mean
    # estimate), recomputed here from the checkpoint's per-sample records
    gained = _predicted_gains(tmp_path / "screen", screen)
    top = sorted(gained, key=lambda k: (-gained[k], -screen["estimates"][k], k))[:3]
    assert sorted((r["layer"], r["head"]) for r in screen["rows"]) == sorted(top)
    by_key = {(r["layer"], r["head"]): r for r in exhaustive["rows"]}
    for r in screen["rows"]:
        ref = by_key[(r["layer"], r["head"])]
        for k in ("acc", "bal_acc", "margin", "changed", "sink_samples"):
            assert r[k] == pytest.approx(ref[k], abs=1e-6), (k, r, ref)
    lines = (tmp_path / "screen" / "heads.csv").read_text().splitlines()
    cols = lines[0].split(",")
    assert cols[:8] == ["layer", "head", "acc", "d_acc", "bal_acc", "d_bal_acc", "margin",
                        "d_margin"] and cols[8] == "estimate"
    body = [dict(zip(cols, l.split(","))) for l in lines[1:]]
    assert len(body) == 8 and all(b["estimate"] for b in body)
    assert sum(b["status"] == "screened out" for b in body) == 5
    assert all((b["acc"] == "") == (b["status"] == "screened out") for b in body)
    summary_md = (tmp_path / "screen" / "summary.md").read_text()
    assert "strategy: screen" in summary_md and "paired bootstrap" in summary_md
    prov = json.loads((tmp_path / "screen" / "profile.json").read_text())["provenance"]
    assert prov["strategy"] == "screen" and prov["screen_top"] == 3


def _predicted_gains(out, summary) -> dict:
    """Per candidate: scoring samples whose decision margin the estimate makes positive minus
    those it makes negative, from the screen records of ``out``'s checkpoint."""
    from act_kernels.search.core import CHECKPOINT

    recs = [json.loads(l) for l in (out / CHECKPOINT).read_text().splitlines()]
    keys = summary["candidates"]
    gained = dict.fromkeys(keys, 0)
    for rec in (r for r in recs if r["kind"] == "screen"):
        for index, value, row in zip(rec["index"], rec["value"], rec["estimate"]):
            if index in summary["score_index"]:
                for key, est in zip(keys, row):
                    gained[key] += int(value + est > 0) - int(value > 0)
    return gained


def test_candidates_on_chosen_samples_score_as_on_every_sample(setup):
    """With ``only`` the candidate pass probes the sinks in its key/value-recording plain pass
    (no second plain pass); on the samples it runs, the outcomes are those of the pass without
    ``only`` (margins to rounding: fewer rows make other suffix batches), and elsewhere the
    baseline's."""
    from act_kernels.search import Scorer
    from act_kernels.scoring import Results

    samples = _samples(setup, 12)
    n = len(samples)
    scorer = Scorer(setup["model"], setup["tok"], tau=LOW_TAU, batch_size=4)
    baseline = scorer.plain(n, samples)
    todo = {1: [0, 2], 3: [1]}
    every, some = {}, {}
    scorer.candidates(n, samples, baseline, todo,
                      lambda layer, res: every.update({(layer, h): r for h, r in res.items()}))
    only = {(l, h): {s.index for s in samples if (s.index + l + h) % 3} for l, hs in todo.items()
            for h in hs}
    scorer.candidates(n, samples, baseline, todo,
                      lambda layer, res: some.update({(layer, h): r for h, r in res.items()}),
                      only=only)
    ran = 0
    for key, res in some.items():
        for i in range(n):
            ref = every[key] if i in only[key] else baseline
            for f in ("correct", "pred"):
                assert getattr(res, f)[i] == getattr(ref, f)[i], (key, i, f)
            for f in ("margin", "decision"):
                assert float(getattr(res, f)[i]) == pytest.approx(float(getattr(ref, f)[i]),
                                                                 abs=1e-5), (key, i, f)
            ran += int(res.ran[i] > 0)
            assert not res.ran[i] or i in only[key]
    assert ran > 0 and any(every[k].ran.sum() > some[k].ran.sum() for k in every)


def test_boundary_check_runs_only_samples_that_may_flip(setup, tmp_path, monkeypatch):
    """``exact_check="boundary"``: each screened head runs exactly only on the scoring samples
    with ``|margin| <= 3 |estimate| + 0.05`` and keeps the baseline outcome elsewhere; with a
    boundary wide enough to hold every sample it equals ``exact_check="all"``."""
    from act_kernels.search import run_search, screen
    from act_kernels.search.core import CHECKPOINT

    model, tok = setup["model"], setup["tok"]
    cfg = lambda check: _cfg(setup, tau=LOW_TAU, strategy="screen", screen_top=4,  # noqa: E731
                             exact_check=check)
    every = run_search(model, tok, cfg("all"), tmp_path / "all")
    near = run_search(model, tok, cfg("boundary"), tmp_path / "boundary")
    recs = lambda d: [json.loads(l) for l in (d / CHECKPOINT).read_text().splitlines()]  # noqa
    base = next(r for r in recs(tmp_path / "all") if r["kind"] == "baseline")
    est = {}
    for rec in (r for r in recs(tmp_path / "boundary") if r["kind"] == "screen"):
        for index, row in zip(rec["index"], rec["estimate"]):
            est[index] = row
    keys = near["candidates"]
    full = {(r["layer"], r["head"]): r for r in recs(tmp_path / "all") if r["kind"] == "candidate"}
    partial = [r for r in recs(tmp_path / "boundary") if r["kind"] == "candidate"]
    assert [(r["layer"], r["head"]) for r in partial] == sorted(full)   # same screened heads
    checked = skipped = 0
    for rec in partial:
        k = keys.index((rec["layer"], rec["head"]))
        for i in near["score_index"]:
            near_it = abs(base["decision"][i]) <= 3 * abs(est[i][k]) + 0.05
            ran = rec["ran"][i] == "1"
            assert not ran or near_it, (rec["layer"], rec["head"], i)
            ref = full[(rec["layer"], rec["head"])] if near_it else base
            assert rec["correct"][i] == ref["correct"][i]
            assert rec["margin"][i] == pytest.approx(ref["margin"][i], abs=1e-5)
            checked += near_it
            skipped += not near_it
    assert checked and skipped, (checked, skipped)    # both kinds of samples occur
    monkeypatch.setattr(screen, "BOUNDARY_SLACK", float("inf"))
    wide = run_search(model, tok, cfg("boundary"), tmp_path / "wide")
    assert [r["d_acc"] for r in wide["rows"]] == [r["d_acc"] for r in every["rows"]]
    assert [s["val"] for s in wide["steps"]] == [s["val"] for s in every["steps"]]
    assert wide["final"]["val"] == every["final"]["val"]


def test_screen_stage_resumes(setup, tmp_path, monkeypatch):
    from act_kernels.search import run_search, screen
    from act_kernels.search.core import CHECKPOINT

    monkeypatch.setattr(screen, "SCREEN_CHUNK", 4)      # 16 samples (score + val): 4 records
    cfg = _cfg(setup, tau=LOW_TAU, strategy="screen", screen_top=2)
    model, tok = setup["model"], setup["tok"]
    run_search(model, tok, cfg, tmp_path / "full")
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_search(model, tok, cfg, part, on_record=stop_at("screen", 2))
    kinds = [json.loads(l)["kind"] for l in (part / CHECKPOINT).read_text().splitlines()]
    assert kinds.count("screen") == 2 and "candidate" not in kinds
    resumed = []
    run_search(model, tok, cfg, part, on_record=lambda rec: resumed.append(rec["kind"]))
    assert resumed.count("screen") == 2             # only the missing chunks were screened
    assert _files(part) == _files(tmp_path / "full")


def test_greedy_rule_needs_evidence_and_no_loss():
    """A head (or the final set) is kept only when the decision margin rises with evidence and
    neither accuracy nor class-balanced accuracy falls."""
    from act_kernels.search.rules import beats, improves

    cur = {"acc": 0.5, "bal_acc": 0.5, "margin": 0.2}
    yes, no, none = {"lower": 0.01}, {"lower": -0.01}, {"lower": None}
    assert improves({"acc": 0.5, "bal_acc": 0.5, "margin": 0.25}, cur, yes)  # evidence, tie
    assert improves({"acc": 0.6, "bal_acc": 0.6, "margin": 0.25}, cur, yes)
    assert not improves({"acc": 0.6, "bal_acc": 0.6, "margin": 0.3}, cur, no)   # gain, no proof
    assert not improves({"acc": 0.6, "bal_acc": 0.6, "margin": 0.3}, cur, none)
    assert not improves({"acc": 0.4, "bal_acc": 0.5, "margin": 0.9}, cur, yes)   # accuracy lost
    assert not improves({"acc": 0.6, "bal_acc": 0.4, "margin": 0.3}, cur, yes)   # balance lost
    assert beats({"acc": 0.6, "bal_acc": 0.5, "margin": 0.0}, cur, yes)
    assert not beats({"acc": 0.6, "bal_acc": 0.5, "margin": 0.3}, cur, no)
    assert not beats({"acc": 0.4, "bal_acc": 0.5, "margin": 0.9}, cur, yes)


def _write_sst2(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_no_harm_writes_an_empty_profile(setup, tmp_path, monkeypatch):
    """Data where any scoring gain is a validation loss (the validation half repeats the scoring
    half's texts with the labels flipped), labelled so that a head is individually good; the
    greedy rule forced to keep it: the final set loses to the uncalibrated model on the
    validation part, so the profile is empty, the set is reported and the CLI line says so."""
    from act_kernels.profiles import ACTProfile
    from act_kernels.search import core, run_search
    from act_kernels.search.core import CHECKPOINT
    from act_kernels.scoring import calibration_examples
    from act_kernels.search.core import split_score_val

    from helpers.search_data import WORDS

    gen = torch.Generator().manual_seed(3)
    rows = [{"id": f"m{i}", "text": " ".join(WORDS[int(j)] for j in
                                             torch.randint(len(WORDS), (4,), generator=gen)),
             "label": i % 2} for i in range(24)]
    path = tmp_path / "mirror.jsonl"
    _write_sst2(path, rows)
    cfg = _cfg(setup, tasks=["sst2"], samples=24, val_fraction=0.5, layers=[1, 2, 3], beta=0.0,
               tau=LOW_TAU, max_greedy=1, data={"sst2": str(path)})
    score, val = split_score_val(calibration_examples(["sst2"], 24, 0, cfg.data), 0.5)
    by_id = {r["id"]: r for r in rows}
    raw = lambda example: by_id[example.id.rsplit("/", 1)[-1]]  # noqa: E731  (ids get a prefix)
    for a, b in zip(score["sst2"], val["sst2"]):
        raw(b)["text"] = raw(a)["text"]
    _write_sst2(path, rows)
    # the head that changes most scoring predictions; label the scoring half with its answers
    draft = run_search(setup["model"], setup["tok"], cfg, tmp_path / "draft")
    best = max(draft["rows"], key=lambda r: (r["changed"], -r["layer"], -r["head"]))
    assert best["changed"] > 0, "no head changes a prediction: the test would be vacuous"
    recs = [json.loads(l) for l in (tmp_path / "draft" / CHECKPOINT).read_text().splitlines()]
    pred = next(r["pred"] for r in recs if r.get("kind") == "candidate"
                and (r["layer"], r["head"]) == (best["layer"], best["head"]))
    for k, (a, b) in enumerate(zip(score["sst2"], val["sst2"])):   # sample k is score[k]
        raw(a)["label"], raw(b)["label"] = pred[k], 1 - pred[k]
    _write_sst2(path, rows)

    monkeypatch.setattr(core, "improves", lambda trial, current, evidence: True)
    out = tmp_path / "forced"
    summary = run_search(setup["model"], setup["tok"], cfg, out)
    base, final = summary["baseline"]["val"], summary["final"]["val"]
    assert len(summary["best_set"]) == 1
    assert final["acc"] < base["acc"], (base, final)          # the set does harm here
    # the final set ran on every validation sample and on no scoring sample (it chose the heads)
    ran = summary["final"]["results"]["ran"]
    assert summary["final"]["score"] is None and final["n"] == summary["n_val"] > 0
    assert {i for i, r in enumerate(ran) if r == "1"} == (set(range(summary["n"]))
                                                          - set(summary["score_index"]))
    assert summary["no_gain"]
    profile = ACTProfile.load(out / "profile.json")
    assert profile.num_calibrated() == 0
    assert profile.provenance["best_set"] == [list(k) for k in summary["best_set"]]
    assert "does not beat the uncalibrated model" in (out / "summary.md").read_text()
    # the real rule never keeps that head: an empty profile without a no-gain verdict
    monkeypatch.undo()
    honest = run_search(setup["model"], setup["tok"], cfg, tmp_path / "honest")
    assert honest["good"] and not honest["best_set"] and not honest["no_gain"]
