"""The lm-evaluation-harness model type ``act``, offline: a task YAML written here that reads a
local JSONL file, run through lm-eval's own entry points with the default model (SmolLM2)."""
import importlib
import importlib.metadata
import importlib.util
import json
import sys

import pytest
import torch
from conftest import require

TASK = "act_lmeval_test_mc"
DOCS = [  # a handful of multiple-choice documents; the log-likelihoods are what is compared
    ("The capital of France is", ["Paris", "a banana", "the ocean"], 0),
    ("Water freezes at zero degrees", ["Celsius", "happiness", "Tuesday"], 0),
    ("A cat is a kind of", ["table", "animal", "cloud"], 1),
    ("The sun rises in the", ["west", "kitchen", "east"], 2),
    ("Two plus two equals", ["four", "seven", "purple"], 0),
    ("Bees make", ["steel", "honey", "glass"], 1),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def lm_eval():
    require(importlib.util.find_spec("lm_eval") is not None,
            "lm-evaluation-harness is not installed (pip install 'act-kernels[lmeval]')")
    with pytest.MonkeyPatch.context() as env:
        # the task reads a local file through Hugging Face datasets: never the hub
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        import lm_eval

        import act_kernels.lmeval  # noqa: F401  (registers the "act" model)
        yield lm_eval


@pytest.fixture(scope="module")
def checkpoint():
    """The default model's checkpoint folder (dequantised SmolLM2), as lm-eval's ``hf`` reads it."""
    from act_kernels.model_loader import default_gguf_path, resolve_model_path

    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        require(False, f"the default model is not installed: {exc}")
    return resolve_model_path(None)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval_task")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": g}) + "\n"
                            for q, c, g in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def calibrating_profile(checkpoint, tmp_path_factory):
    """Every head of layers 1..10 calibrated: SmolLM2 has sinks there on every prompt."""
    from act_kernels.profiles import ACTProfile

    path = tmp_path_factory.mktemp("profile") / "profile.json"
    ACTProfile(heads={layer: list(range(9)) for layer in range(1, 11)}).save(str(path))
    return str(path)


def logliks_of(samples) -> torch.Tensor:
    """``[doc, choice]`` log-likelihoods from lm-eval's logged samples."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                        dtype=torch.float64)


def evaluate(lm_eval, task_dir, model, model_args):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model, model_args=dict(model_args, device=DEVICE, dtype="float32"), tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=8, log_samples=True, bootstrap_iters=0)
    return out["results"][TASK]["acc,none"], logliks_of(out["samples"][TASK]), out


@pytest.fixture(scope="module")
def hf_run(lm_eval, task_dir, checkpoint):
    return evaluate(lm_eval, task_dir, "hf", {"pretrained": checkpoint})


def test_empty_profile_equals_lm_evals_hf_model(lm_eval, task_dir, hf_run, tmp_path):
    from act_kernels.profiles import ACTProfile

    empty = tmp_path / "empty.json"
    ACTProfile(heads={}).save(str(empty))
    acc, logliks, out = evaluate(lm_eval, task_dir, "act",
                                 {"profile": str(empty), "backend": "torch"})
    hf_acc, hf_logliks, _ = hf_run
    assert logliks.shape == (len(DOCS), 3)
    assert acc == hf_acc
    torch.testing.assert_close(logliks, hf_logliks, atol=2e-4, rtol=1e-5)
    assert out["config"]["model_args"]["profile"] == str(empty)


def test_act_lm_eval_command_line_with_a_profile(lm_eval, task_dir, hf_run, calibrating_profile,
                                                 tmp_path, monkeypatch):
    """``act lm-eval`` is lm-eval's own command line with ``--model act`` available; the
    profile changes the log-likelihoods."""
    from lm_eval.tasks.manager import TaskManager

    from act_kernels.cli import main

    # lm-eval's command line indexes its thousands of built-in task files first (over 20 s on
    # two cores); this test's task is the only one it needs
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **k: init(self, *a, **dict(k, include_defaults=False)))
    out = tmp_path / "results"
    main(["lm-eval", "run", "--model", "act", "--model_args",
          f"pretrained=smollm2-135m-instruct-q4_1,profile={calibrating_profile},backend=torch,"
          "dtype=float32", "--device", DEVICE, "--batch_size", "8",
          "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out),
          "--log_samples"])
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    samples = [json.loads(line) for p in out.rglob(f"samples_{TASK}_*.jsonl")
               for line in p.read_text().splitlines()]
    assert len(results) == 1 and results[0]["config"]["model"] == "act"
    assert 0.0 <= results[0]["results"][TASK]["acc,none"] <= 1.0
    assert results[0]["config"]["act_profile"]["heads"]["5"] == list(range(9))
    logliks = logliks_of(samples)
    assert logliks.shape == (len(DOCS), 3) and torch.isfinite(logliks).all()
    assert (logliks - hf_run[1]).abs().max() > 1e-2


def test_bad_model_arguments_fail_before_loading(lm_eval, tmp_path):
    from act_kernels.lmeval import ACTLM

    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ACTLM(backend="cuda")
    with pytest.raises(FileNotFoundError):
        ACTLM(profile=str(tmp_path / "missing.json"))


def test_registered_and_declared_as_entry_point(lm_eval):
    from lm_eval.api.registry import get_model

    from act_kernels.lmeval import ACTLM

    assert get_model("act") is ACTLM
    points = importlib.metadata.entry_points(group="lm_eval.models")
    assert [p.load() for p in points if p.name == "act"] == [ACTLM]


def test_act_lm_eval_passes_every_argument_to_lm_eval(lm_eval):
    """Options included: ``act lm-eval --model act -h`` hands all of them to lm-eval."""
    from act_kernels import cli

    args = cli.build_parser(["lm-eval"]).parse_args(["lm-eval", "--model", "act", "-h"])
    assert args.lm_eval_args == ["--model", "act", "-h"]


def test_without_lm_eval_the_import_says_what_to_install(lm_eval, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "act_kernels.lmeval")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'act-kernels\[lmeval\]'"):
        importlib.import_module("act_kernels.lmeval")
