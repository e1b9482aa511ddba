"""Heads are kept on evidence (issue 20): the one-sided sign-flip bound of the paired
decision-margin change, its error rate on noise, the greedy step's exact comparisons on the
samples it reruns, and a sham search (validation labels shuffled) that keeps nothing."""
from __future__ import annotations

import json

import pytest
import torch

from test_pipeline import _cfg, _files, setup, stop_at  # noqa: F401  (setup is a fixture)
from test_search_screen import LOW_TAU


def test_sign_flip_bound_is_exact_on_few_samples():
    """Six positive changes: one sign pattern in 64 reaches their mean, so the test rejects "no
    effect" at 0.05 but not at 0.05/8; the bound is the mean minus the critical mean."""
    from act_kernels.search.rules import margin_evidence

    diff = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.01, 0.02], dtype=torch.float64)
    strict, loose = margin_evidence(diff, 0.05 / 8), margin_evidence(diff, 0.05)
    assert strict["p"] == loose["p"] == pytest.approx(1 / 64)
    assert strict["lower"] <= 0 < loose["lower"]
    # the 95% critical mean: the 4th largest of the 64 sign-flip means (p = 4/64 > 0.05 fails)
    means = sorted(((torch.tensor([(k >> i) & 1 for i in range(6)]) * 2 - 1).double() @ diff
                    / 6).item() for k in range(64))
    assert loose["lower"] == pytest.approx(float(diff.mean()) - means[-4])
    assert margin_evidence(torch.tensor([]), 0.05)["lower"] is None


def test_evidence_rejects_a_tiny_noisy_gain_and_accepts_a_clear_one():
    from act_kernels.search.rules import improves, margin_evidence, step_level

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(80, generator=gen, dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std()              # mean 0, sd 1 exactly
    same = {"acc": 0.5, "bal_acc": 0.5, "margin": 0.0}
    level = step_level(0.05, 12)
    tiny = margin_evidence(0.01 + 1.5 * noise, level)          # +0.01, sd 1.5
    assert tiny["mean"] == pytest.approx(0.01) and tiny["lower"] < 0
    assert not improves(same, same, tiny)
    clear = margin_evidence(0.4 + 0.5 * noise, level)          # +0.4, sd 0.5: t = 7.2
    assert clear["lower"] > 0.2
    assert improves(same, same, clear)
    assert not improves({**same, "acc": 0.45}, same, clear)     # accuracy falls: rejected
    assert margin_evidence(torch.tensor([5.0]), 0.05)["lower"] <= 0     # one sample: none


def test_evidence_error_rate_on_noise_is_its_level():
    """On noise (changes of random sign and very unequal sizes, where a t bound errs) the bound
    is above zero at most ``level`` of the time, and not far below it."""
    from act_kernels.search.rules import margin_evidence

    gen = torch.Generator().manual_seed(1)
    sizes = torch.rand(1500, 10, generator=gen, dtype=torch.float64) ** 4
    signs = torch.randint(0, 2, (1500, 10), generator=gen) * 2 - 1
    rate = sum(margin_evidence(d, 0.05)["lower"] > 0 for d in sizes * signs) / 1500
    assert 0.03 <= rate <= 0.06, rate          # binomial sd 0.0056 around 0.05


def _samples(setup, n):
    from act_kernels.scoring import calibration_examples, encode_examples

    out = []
    for task, exs in calibration_examples(["sst2", "arc_easy"], n, 0, setup["data"]).items():
        out += encode_examples(task, exs, setup["tok"], False, None, start=len(out))
    return out


def test_sham_labels_shuffle_within_task(setup):
    from act_kernels.search.core import sham_labels

    samples = _samples(setup, 32)
    a, b = sham_labels(samples, 3), sham_labels(samples, 3)
    assert [s.gold for s in a] == [s.gold for s in b]           # seeded
    assert [s.gold for s in a] != [s.gold for s in samples]     # shuffled
    for task in ("sst2", "arc_easy"):
        old = sorted(s.gold for s in samples if s.task == task)
        assert sorted(s.gold for s in a if s.task == task) == old   # a permutation per task
    assert [(s.index, s.ids, s.item.option_token_ids) for s in a] == \
        [(s.index, s.ids, s.item.option_token_ids) for s in samples]


def test_greedy_evidence_compares_exact_values(setup, tmp_path, monkeypatch):
    """With boundary checks, each greedy step's evidence is the mean over the samples it ran
    of (kept set + head) minus (kept set), both run exactly there, whatever outcomes the kept
    set carried over from earlier sets; an interrupted greedy step resumes to the same files."""
    from act_kernels.search import Scorer, core, run_search, screen
    from act_kernels.search.rules import as_heads

    # every screened head is tried and kept; a boundary wide enough that the samples run
    # change from step to step (so kept outcomes go stale), not so wide that all run
    monkeypatch.setattr(core, "EPS", -1.0)
    monkeypatch.setattr(core, "improves", lambda trial, current, evidence: True)
    monkeypatch.setattr(screen, "BOUNDARY_SLACK", 0.5)
    cfg = _cfg(setup, tau=LOW_TAU, beta=0.5, strategy="screen", screen_top=12,
               exact_check="boundary", samples=32, val_fraction=0.5, layers=[1, 2, 3],
               max_greedy=6)
    model, tok = setup["model"], setup["tok"]
    summary = run_search(model, tok, cfg, tmp_path / "full")
    steps = summary["steps"]
    assert len(steps) >= 3, "too few heads tried: the test would be vacuous"
    assert any(st["refreshed"] for st in steps), "no kept outcome was stale: vacuous"
    samples = {s.index: s for s in _samples(setup, 32)}
    scorer = Scorer(model, tok, beta=0.5, tau=LOW_TAU, batch_size=3)
    kept = []
    for st in steps:
        run = [samples[i] for i in st["run"]]
        assert st["evidence"]["n"] == len(run) == st["runs"]
        if run:
            n = len(samples)
            trial = scorer.plain(n, run, as_heads(kept + [(st["layer"], st["head"])]))
            before = scorer.plain(n, run, as_heads(kept))
            idx = torch.as_tensor(st["run"])
            diff = trial.decision[idx] - before.decision[idx]
            assert st["evidence"]["mean"] == pytest.approx(float(diff.mean()), abs=1e-5)
        kept.append((st["layer"], st["head"]))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_search(model, tok, cfg, part, on_record=stop_at("greedy", 3))
    run_search(model, tok, cfg, part)
    assert _files(part) == _files(tmp_path / "full")


def test_sham_search_keeps_nothing(setup, tmp_path, monkeypatch):
    """Validation labels shuffled: every screened head is tried (the tiny model has few heads
    that gain an answer, so all count as good here), none is kept, the profile is empty and
    says why (summary.md, provenance)."""
    from act_kernels.profiles import ACTProfile
    from act_kernels.search import core, run_search

    monkeypatch.setattr(core, "EPS", -1.0)
    cfg = _cfg(setup, tau=LOW_TAU, beta=0.5, strategy="screen", screen_top=12, samples=32,
               val_fraction=0.5, layers=[1, 2, 3], max_greedy=12, sham_labels=5,
               exact_check="all")
    out = tmp_path / "sham"
    summary = run_search(setup["model"], setup["tok"], cfg, out)
    steps = summary["steps"]
    assert len(steps) == 12 and all(st["runs"] == summary["n_val"] for st in steps)
    # the rule that was replaced (a tie with any margin gain) would have kept heads here
    base = summary["baseline"]["val"]
    assert any(st["evidence"]["mean"] > 0 and st["val"]["acc"] >= base["acc"]
               and st["val"]["bal_acc"] >= base["bal_acc"] for st in steps)
    assert not summary["best_set"] and not summary["no_gain"]
    assert ACTProfile.load(out / "profile.json").num_calibrated() == 0
    text = (out / "summary.md").read_text()
    assert "sham data" in text and "sign-flip" in text
    prov = json.loads((out / "profile.json").read_text())["provenance"]
    assert prov["sham_labels"] == 5 and prov["evidence_level"] == 0.05
