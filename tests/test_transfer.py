"""``act eval --transfer``: a profile evaluated, by option log-likelihood, on the built-in tasks
it was not searched on (tiny random Llama of ``test_pipeline``, the offline task data).

Checks: the transfer tasks are exactly the built-in ones the profile's provenance does not name
and whose data is installed; each one's log-likelihood accuracy, with and without the profile,
equals the model run on every (context, option) pair alone; the report has every task and the
mean, each with its paired interval, in the table and the md/json/csv files.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_pipeline import TAU, setup  # noqa: F401  (setup is a fixture)


def test_transfer_tasks_are_the_unsearched_installed_ones(monkeypatch):
    import act_kernels.tasks as tasks_pkg
    from act_kernels.evaluate import TRANSFER_TASKS, transfer_tasks
    from act_kernels.profiles import ACTProfile

    def profile(searched):
        return ACTProfile(heads={}, provenance={"tasks": searched} if searched else {})

    assert transfer_tasks(profile(["sst2", "mr", "subj", "arc_easy"])) == list(TRANSFER_TASKS)
    # aliases and other spellings of a searched task count as that task
    assert transfer_tasks(profile(["sst2", "piqa", "obqa", "ARC-Challenge"])) == [
        "hellaswag", "commonsense_qa", "boolq", "copa"]
    # a task whose data is not installed is left out (unless a data file is given)
    real = tasks_pkg.available_splits
    monkeypatch.setattr(tasks_pkg, "available_splits",
                        lambda t: {} if str(t) in ("copa", "boolq") else real(t))
    assert transfer_tasks(profile(["sst2"])) == [
        "piqa", "hellaswag", "openbookqa", "commonsense_qa", "arc_challenge"]
    assert "copa" in transfer_tasks(profile(["sst2"]), data={"copa": "copa.jsonl"})
    with pytest.raises(ValueError, match="does not record the tasks it was searched on"):
        transfer_tasks(profile(None))
    monkeypatch.setattr(tasks_pkg, "available_splits", lambda t: {})
    with pytest.raises(ValueError, match="no transfer task left"):
        transfer_tasks(profile(["sst2"]))


def _alone_correct(model, tok, task, ex) -> bool:
    """Option log-likelihood, each (context, continuation) run alone without padding."""
    from act_kernels.tasks import loglik_ids

    sums = []
    for ctx, cont in task.loglik_requests(ex, tok):
        ids, n = loglik_ids(tok, ctx, cont)
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        sums.append(sum(float(lp[p - 1, ids[p]]) for p in range(len(ids) - n, len(ids))))
    return max(range(len(sums)), key=sums.__getitem__) == ex.gold


def test_transfer_eval_equals_each_prompt_alone(setup, tmp_path):
    from act_kernels import head_override
    from act_kernels.evaluate import (TRANSFER, TRANSFER_PROTOCOLS, EvalConfig, run_eval,
                                      transfer_tasks)
    from act_kernels.profiles import ACTProfile
    from act_kernels.tasks import get_task, load_examples

    model, tok = setup["model"], setup["tok"]
    heads = {1: [0, 2], 2: [1]}
    profile = ACTProfile(heads=heads, tau=TAU, provenance={
        "tasks": ["sst2", "arc_easy", "hellaswag", "commonsense_qa", "boolq"], "seed": 0})
    tasks = transfer_tasks(profile)
    assert tasks == ["piqa", "openbookqa", "copa", "arc_challenge"]
    cfg = EvalConfig(tasks=tasks, samples=6, batch_size=4, bootstrap=300,
                     protocols=TRANSFER_PROTOCOLS)
    out = tmp_path / "ev"
    report = run_eval(model, tok, profile, cfg, out, name=TRANSFER)
    assert list(report["tasks"]) == tasks and report["protocols"] == list(TRANSFER_PROTOCOLS)
    for name, row in report["tasks"].items():
        task = get_task(name)
        by_id = {e.id: e for e in load_examples(task, split=row["eval_split"].split(":")[-1])}
        exs = [by_id[i] for i in row["ids"]]
        assert len(exs) == 6
        base = sum(_alone_correct(model, tok, task, ex) for ex in exs) / len(exs)
        with head_override(model, heads, tau=TAU, backend="torch"):
            act = sum(_alone_correct(model, tok, task, ex) for ex in exs) / len(exs)
        assert (row["base"], row["act"]) == (pytest.approx(base), pytest.approx(act)), name
        for p, r in row["protocols"].items():
            lo, hi = r["ci95"]
            assert lo <= r["delta"] <= hi, (name, p)
    avg = report["average"]
    assert avg["n"] == 6 * len(tasks)
    assert avg["delta"] == pytest.approx(sum(r["delta"] for r in report["tasks"].values())
                                         / len(tasks))
    assert avg["ci95"][0] <= avg["delta"] <= avg["ci95"][1]
    # the files: every task and the mean, each with its interval
    md = (out / f"{TRANSFER}.md").read_text()
    assert "not searched on" in md and "searched on: sst2, arc_easy" in md
    csv = (out / f"{TRANSFER}.csv").read_text().splitlines()
    assert len(csv) == 1 + (len(tasks) + 1) * len(TRANSFER_PROTOCOLS)
    for name in tasks + ["average"]:
        assert f"| {name} |" in md and name in report["table"]
        lines = [l for l in csv if l.startswith(name + ",")]
        assert len(lines) == 2 and all(l.split(",")[5] and l.split(",")[6] for l in lines)
    assert json.loads((out / f"{TRANSFER}.json").read_text())["tasks"].keys() == set(tasks)
    assert not (out / "eval.json").exists()        # its own files, beside act eval's


def test_transfer_cli_errors(tmp_path):
    from act_kernels import cli
    from act_kernels.profiles import ACTProfile

    ACTProfile(heads={}).save(tmp_path / "p.json")
    with pytest.raises(SystemExit, match="does not record the tasks"):
        cli.main(["eval", "--profile", str(tmp_path / "p.json"), "--transfer",
                  "--model", "/nonexistent"])
    ACTProfile(heads={}, provenance={"tasks": ["sst2"]}).save(tmp_path / "q.json")
    with pytest.raises(SystemExit, match="drop --tasks"):
        cli.main(["eval", "--profile", str(tmp_path / "q.json"), "--transfer", "--tasks",
                  "piqa", "--model", "/nonexistent"])
