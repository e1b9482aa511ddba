"""Tasks defined in a YAML/JSON file: same prompts and scoring as the built-in tasks, seeded
disjoint splits, the search/eval data path, and one clear error per bad field."""
import csv
import json

import pytest
import torch
import yaml

from act_kernels import tasks as T

REVIEWS = [("a gorgeous, witty film", "positive"), ("dull and far too long", "negative"),
           ("the best thing this year", "positive"), ("I walked out", "negative"),
           ("a warm, funny story", "positive"), ("flat acting, no plot", "negative"),
           ("pure joy from start to end", "positive"), ("a mess", "negative"),
           ("moving and smart", "positive"), ("tedious", "negative")]



@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Every test registers its task files in an empty registry (tmp paths differ per test)."""
    from act_kernels.tasks import taskfile
    monkeypatch.setattr(taskfile, "_FILE_TASKS", {})
    monkeypatch.setattr(taskfile, "_READ", {})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task(path, spec):
    path.write_text(json.dumps(spec) if path.suffix == ".json" else yaml.safe_dump(spec))
    return str(path)


def sentiment_spec(data="reviews.jsonl", **extra):
    """A file task with SST-2's instruction, template and label words."""
    sst2 = T.get_task("sst2")
    return {"name": "my_sentiment", "kind": "classification", "instruction": sst2.instruction,
            "template": "Sentence: {review} \nSentiment: ", "label_words": [" negative", " positive"],
            "data": data, **extra}


@pytest.fixture
def sentiment(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl",
                [{"review": r, "label": lab} for r, lab in REVIEWS])
    return write_task(tmp_path / "sentiment.yaml", sentiment_spec())


@pytest.fixture
def goals(tmp_path):
    """A multiple-choice task in JSON with CSV train/test files, options in two columns."""
    rows = [("Open a jar", "Twist the lid.", "Eat the lid.", "A"),
            ("Dry wet hair", "Use a towel.", "Use a sponge full of water.", "A"),
            ("Cool hot soup", "Heat it.", "Blow on it.", "B"),
            ("Light a dark room", "Close the blinds.", "Switch on a lamp.", "B"),
            ("Sharpen a pencil", "Use a sharpener.", "Use a spoon.", "0"),
            ("Cross a river", "Take the bridge.", "Swim in a suit of armour.", "0")]
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["goal", "sol1", "sol2", "answer"])
            w.writerows(part)
    spec = {"name": "my_goals", "kind": "multiple_choice",
            "instruction": T.get_task("piqa").instruction, "template": "{goal}",
            "choices": ["sol1", "sol2"], "label_field": "answer",
            "data": {"train": "train.csv", "test": "test.csv"}}
    return write_task(tmp_path / "goals.json", spec)


# the SmolLM2 tokenizer and a tiny Llama on its vocabulary, shared with the built-in tasks' tests
from helpers.smollm import tiny_model, tokenizer  # noqa: E402,F401


# ---------------------------------------------------------------------- same prompts and scoring
def test_classification_file_task_matches_the_builtin_prompts(sentiment):
    task = T.get_task(sentiment)
    assert task.name == "my_sentiment" and task.kind == T.CLASSIFICATION
    assert T.get_task("my_sentiment") is task and T.get_task("My-Sentiment") is task
    assert T.get_task(sentiment) is task  # the unchanged file is not read again
    examples = T.load_examples(task)
    sst2 = T.get_task("sst2")
    assert len(examples) == len(REVIEWS)
    for ex, (review, label) in zip(examples, REVIEWS):
        builtin = sst2.example_from_row({"sentence": review, "label": label}, id="x")
        assert ex.prompt == builtin.prompt
        assert ex.options == builtin.options and ex.gold == builtin.gold
    assert examples[3].id == "my_sentiment/file:reviews.jsonl:data/3"
    assert T.available_splits(task) == {"data": "file"} and T.default_split(task) == "data"


def test_multiple_choice_file_task_matches_the_builtin_prompts(goals):
    task = T.get_task(goals)
    piqa = T.get_task("piqa")
    train = T.load_examples(task, split="train")
    test = T.load_examples(task)  # default: the evaluation split
    assert [e.split for e in test] == ["test", "test"] and len(train) == 4
    builtin = piqa.example_from_row({"goal": "Open a jar", "sol1": "Twist the lid.",
                                     "sol2": "Eat the lid.", "label": 0}, id="x")
    assert train[0].prompt == builtin.prompt and train[0].options == builtin.options
    assert [e.gold for e in train + test] == [0, 0, 1, 1, 0, 0]
    assert task.loglik_requests(train[0]) == piqa.loglik_requests(builtin)


def test_option_format(tmp_path, goals):
    spec = json.loads(open(goals).read())
    spec.update(name="goals_paren", option_format="({letter}) {choice}")
    task = T.load_task_file(write_task(tmp_path / "paren.json", spec))
    ex = T.load_examples(task, split="train")[0]
    assert ex.prompt.endswith("Open a jar\n(A) Twist the lid.\n(B) Eat the lid.\nAnswer:")


def test_file_task_scores_like_the_builtin(sentiment, goals, tokenizer, tiny_model):
    """Same score items and the same next-token and log-likelihood scores as the built-ins."""
    from act_kernels.scoring import PROTOCOLS, PlainScorer, encode_examples

    for path, builtin, rows in (
            (sentiment, "sst2", [{"sentence": r, "label": lab} for r, lab in REVIEWS]),
            (goals, "piqa", None)):
        task = T.get_task(path)
        exs = T.load_examples(task, split=None if rows else "train")
        ref_task = T.get_task(builtin)
        ref = [ref_task.example_from_row(r, id=str(i)) for i, r in enumerate(rows)] if rows else [
            ref_task.example_from_row({"goal": e.fields["question"], "sol1": e.options[0],
                                       "sol2": e.options[1], "label": e.gold}, id=str(i))
            for i, e in enumerate(exs)]
        assert task.score_items(exs, tokenizer) == ref_task.score_items(ref, tokenizer)
        scorer = PlainScorer(tiny_model, tokenizer)
        got, want = (scorer.score(len(e), encode_examples(t, e, tokenizer, False, None,
                                                          loglik=True), protocols=PROTOCOLS)
                     for t, e in ((task, exs), (ref_task, ref)))
        for protocol in PROTOCOLS:      # next token and option log-likelihood alike
            assert torch.equal(got[protocol].pred, want[protocol].pred)
            assert torch.allclose(got[protocol].margin, want[protocol].margin)


# ---------------------------------------------------------------------- splits
def test_one_file_is_split_by_the_seed(sentiment):
    s = T.load_splits(sentiment, seed=3, n_calib=4, n_eval=5)
    assert len(s.calib) == 4 and len(s.eval) == 5 and s.task == "my_sentiment"
    assert not set(s.calib_ids) & set(s.eval_ids)
    assert T.load_splits("my_sentiment", seed=3, n_calib=4, n_eval=5).to_record() == s.to_record()
    other = T.load_splits("my_sentiment", seed=4, n_calib=4, n_eval=5)
    assert other.calib_ids != s.calib_ids


def test_two_files_calibrate_and_evaluate(goals):
    s = T.load_splits(goals, seed=0, n_calib=3, n_eval=2)
    assert {e.split for e in s.calib} == {"train"} and {e.split for e in s.eval} == {"test"}
    assert s.calib_split == "file:train.csv:train" and s.eval_split == "file:test.csv:test"


# ---------------------------------------------------------------------- search and eval
def test_search_and_eval_data_path_accepts_a_task_file(sentiment):
    """``--tasks path.yaml`` through the search's own helpers: parse_tasks resolves the path to
    the task's name, and every later lookup by that name finds it."""
    from act_kernels.scoring import calibration_examples, evaluation_examples, parse_tasks

    assert parse_tasks(f"sst2,{sentiment}") == ["sst2", "my_sentiment"]
    calib = calibration_examples(["my_sentiment"], 4, seed=1)["my_sentiment"]
    ev = evaluation_examples("my_sentiment", 100, seed=1, n_calib=4)
    assert len(calib) == 4 and len(ev.eval) == len(REVIEWS) - 4
    assert not {e.id for e in calib} & set(ev.eval_ids)


def test_act_eval_runs_a_file_task(sentiment, tokenizer, tiny_model, tmp_path):
    from act_kernels.evaluate import EvalConfig, run_eval
    from act_kernels.profiles import ACTProfile

    profile = ACTProfile(heads={0: [1], 1: [0, 3]})
    cfg = EvalConfig(tasks=[sentiment], samples=6, seed=0, bootstrap=20)
    report = run_eval(tiny_model, tokenizer, profile, cfg, tmp_path / "eval")
    row = report["tasks"]["my_sentiment"]
    assert row["n"] == 6 and all(i.startswith("my_sentiment/file:") for i in row["ids"])
    again = run_eval(tiny_model, tokenizer, profile, cfg, tmp_path / "eval")  # resumes
    assert again["tasks"]["my_sentiment"] == row


# ---------------------------------------------------------------------- bad task files
BAD = [
    (lambda s: s.pop("name"), "name", "missing"),
    (lambda s: s.update(name="sst2"), "name", "built-in"),
    (lambda s: s.update(name="my task"), "name", "letters"),
    (lambda s: s.update(kind="regression"), "kind", "regression"),
    (lambda s: s.update(lable_words=["a", "b"]), "lable_words", "unknown field"),
    (lambda s: s.update(label_words=[" yes"]), "label_words", "at least 2"),
    (lambda s: s.update(label_words=" yes no"), "label_words", "list"),
    (lambda s: s.update(label_names=["a", "b", "c"]), "label_names", "3 names for 2"),
    (lambda s: s.update(label_names=["neg", "pos"]), "label_names", "neither a class index"),
    (lambda s: s.pop("template"), "template", "missing"),
    (lambda s: s.update(template="Sentence: {} "), "template", "placeholders"),
    (lambda s: s.update(template="Sentence: {review "), "template", "format string"),
    (lambda s: s.update(template="Sentence: {text} "), "template", "no column 'text'"),
    (lambda s: s.update(instruction=3), "instruction", "expected text"),
    (lambda s: s.pop("data"), "data", "missing"),
    (lambda s: s.update(data="nowhere.jsonl"), "data", "does not exist"),
    (lambda s: s.update(data="reviews.txt"), "data", "end with"),
    (lambda s: s.update(data={"train": "reviews.jsonl", "dev": "reviews.jsonl"}), "eval_split",
     "no data split 'test'"),
    (lambda s: s.update(calib_split="train"), "calib_split", "only with data given as"),
    (lambda s: s.update(label_field="gold"), "label_field", "no column 'gold'"),
    (lambda s: s.update(option_format="{letter}"), "option_format", "unknown field"),
]


@pytest.mark.parametrize("mutate,field,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_task_file_names_the_field(tmp_path, mutate, field, words):
    write_jsonl(tmp_path / "reviews.jsonl", [{"review": "fine", "label": "positive"}])
    (tmp_path / "reviews.txt").write_text("x")
    spec = sentiment_spec()
    mutate(spec)
    path = write_task(tmp_path / "bad.yaml", spec)
    with pytest.raises(T.TaskFileError) as info:
        T.get_task(path)
    message = str(info.value)
    assert f"field {field!r}" in message and words in message and path in message


BAD_MC = [
    (lambda s: s.update(option_format="{choice}"), "option_format", "needs both"),
    (lambda s: s.update(option_format="{letter}. {choice} {x}"), "option_format", "only"),
    (lambda s: s.update(choices=3), "choices", "column name"),
    (lambda s: s.update(choices=["sol1", "nope"]), "choices", "no column 'nope'"),
    (lambda s: s.update(label_field="goal"), "label_field", "neither an option index"),
    (lambda s: s.update(label_words=["a", "b"]), "label_words", "unknown field"),
]


@pytest.mark.parametrize("mutate,field,words", BAD_MC,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_MC)])
def test_bad_multiple_choice_file_names_the_field(goals, tmp_path, mutate, field, words):
    spec = json.loads(open(goals).read())
    mutate(spec)
    with pytest.raises(T.TaskFileError, match=f"field '{field}'.*{words}"):
        T.load_task_file(write_task(tmp_path / "bad.json", spec))


def test_unreadable_task_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.get_task(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.json").write_text("{name: ")
    with pytest.raises(T.TaskFileError, match="not valid JSON"):
        T.get_task(str(tmp_path / "broken.json"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(T.TaskFileError, match="mapping of fields"):
        T.get_task(str(tmp_path / "list.yaml"))
    with pytest.raises(KeyError, match="task file"):
        T.get_task("no_such_task")


def test_two_files_cannot_share_a_name(sentiment, tmp_path):
    T.get_task(sentiment)
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_jsonl(other / "reviews.jsonl", [{"review": "ok", "label": 1}])
    with pytest.raises(T.TaskFileError, match="field 'name'.*already defined by"):
        T.get_task(write_task(other / "sentiment.yaml", sentiment_spec()))


def test_a_bad_row_later_in_the_file_names_its_row(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [{"review": "fine", "label": "positive"},
                                            {"review": "meh", "label": "so-so"}])
    task = T.get_task(write_task(tmp_path / "rows.yaml", sentiment_spec(name="rows")))
    with pytest.raises(ValueError, match="row 1 .*label_names: label 'so-so'"):
        T.load_examples(task)
