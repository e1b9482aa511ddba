"""``benchmarks/hf_model_tests.py`` (Transformers' model tests with ``act_torch`` forced): how it
reads the plugin's records, classifies failures, builds the test tree, and what the plugin
forces. The suites themselves are not run here (minutes of CPU; see the README)."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import hf_model_tests as harness  # noqa: E402
import hf_model_tests_plugin as plugin  # noqa: E402

GRAD = ("RuntimeError: act_attention: the 'torch' backend is forward-only, but gradients were "
        "asked for (q, k or v requires grad and grad mode is on)")
MASK = "act_kernels.hf.masks.ACTMaskError: act attention: unsupported attention mask: query row 3"


def line(nodeid, when="call", outcome="passed", message="", tail="", **counts):
    return json.dumps({"nodeid": nodeid, "when": when, "outcome": outcome, "wasxfail": False,
                       "message": message, "act_frames": "act_kernels/" in tail, "tail": tail,
                       "duration": 0.1, **counts})


def record(nodeid="t.py::C::test_x", message="", tail="", **counts):
    rec = {"nodeid": nodeid, "outcome": "failed", "message": message, "tail": tail,
           "act_frames": "act_kernels/" in tail, **{k: 0 for k in harness.COUNTERS}}
    rec.update(counts)
    return rec


def test_load_results_takes_the_worst_phase_and_sums_evidence():
    lines = [line("a::C::t1"),
             line("a::C::t1", outcome="failed", message="AssertionError: subtest", packed=2),
             line("a::C::t1"),                                  # the parent report after it
             line("a::C::t2", when="setup", outcome="failed", message="boom"),
             line("a::C::t3", when="setup", outcome="skipped", message="no GPU"),
             json.dumps({**json.loads(line("a::C::t4", outcome="skipped")), "wasxfail": True}),
             ""]
    tests = harness.load_results(lines)
    assert tests["a::C::t1"]["outcome"] == "failed"
    assert tests["a::C::t1"]["message"] == "AssertionError: subtest"
    assert tests["a::C::t1"]["packed"] == 2
    assert tests["a::C::t2"]["outcome"] == "error"
    assert tests["a::C::t3"]["outcome"] == "skipped"
    assert tests["a::C::t4"]["outcome"] == "xfailed"


@pytest.mark.parametrize("rec, cause", [
    (record("t.py::C::test_training_gradient_checkpointing", GRAD, train_calls=1),
     "gradient refusal: gradient checkpointing"),
    (record("t.py::C::test_training", GRAD, train_calls=3), "gradient refusal: training "
     "(model in train())"),
    (record("t.py::C::test_model", GRAD, grad_calls=1),
     "gradient refusal: eval() forward outside no_grad"),
    (record(message=MASK, mask_4d=1, packed=1), "refusal: custom 4-D mask"),
    (record(message=MASK, packed=1), "refusal: packed sequences"),
    (record(message=MASK, blocks=2), "refusal: image blocks"),
    (record(message=MASK), "refusal: other mask"),
    (record(message="NotImplementedError: act_torch attention does not support `softcap`",
            tail="x\n/r/act_kernels/hf/attention.py:50: NotImplementedError"),
     "refusal: other feature"),
    (record(message="AssertionError: False is not true",
            tail="    def check(e):\n        self.assertTrue(cfg._attn_implementation == e)\n"
                 "E   AssertionError: False is not true\n"), "asserts the implementation's name"),
    (record(message="AssertionError: 'act_torch' != 'sdpa'"), "asserts the implementation's name"),
    (record(message="AssertionError: Tensor-likes are not close!",
            tail=">       torch.testing.assert_close(a, b)\nE   AssertionError: not close\n"),
     "other"),
    (record(message="ValueError: bad", tail="/w/act_kernels/op.py:10: ValueError"),
     "other (through act_kernels)"),
])
def test_classify(rec, cause):
    assert harness.classify(rec) == cause


def test_compare_separates_new_failures_from_the_baseline_ones(tmp_path):
    act = harness.load_results([
        line("m/test_modeling_x.py::XTest::test_a", outcome="failed", message=GRAD, grad_calls=1,
             packed=1, blocks=2),
        line("m/test_modeling_x.py::XTest::test_b", outcome="failed", message="E1"),
        line("m/test_modeling_x.py::XTest::test_c", act_calls=4),
        line("m/test_modeling_x.py::XTest::test_d")])
    base = harness.load_results([
        line("m/test_modeling_x.py::XTest::test_a"),
        line("m/test_modeling_x.py::XTest::test_b", outcome="failed", message="E1"),
        line("m/test_modeling_x.py::XTest::test_c"),
        line("m/test_modeling_x.py::XTest::test_d", outcome="failed", message="E2\nmore")])
    rows = {r["test"].rsplit("::", 1)[-1]: r for r in harness.compare(act, base)}
    assert rows["test_a"]["cause"] == "gradient refusal: eval() forward outside no_grad"
    assert rows["test_a"]["masks"] == "packed, image blocks"
    assert rows["test_c"]["masks"] == ""
    assert rows["test_b"]["cause"] == "fails with sdpa too"
    assert rows["test_c"]["cause"] == "" and rows["test_c"]["act_calls"] == 4
    assert rows["test_d"]["cause"] == "fails with sdpa only"
    assert rows["test_d"]["sdpa_message"] == "E2" and rows["test_d"]["message"] == ""
    assert harness.compact(list(rows.values())) == [
        ("gradient refusal: eval() forward outside no_grad", "test_a", 1, "X")]
    more = [{"test": f"m/x.py::{c}::test_e_{i:02d}_fp16_pad", "cause": "refusal: image blocks"}
            for c in ("Gemma3Vision2TextModelTest", "LlamaModelTest") for i in range(3)]
    assert harness.compact(more) == [("refusal: image blocks", "test_e", 3,
                                      "Gemma3Vision2Text, Llama")]
    text = harness.write_report(list(rows.values()), tmp_path, ["# header"])
    assert "| `test_modeling_x.py::XTest` | 4 | 2 / 2 / 0 | 2 / 2 / 0 | 1 |" in text
    assert "| gradient refusal: eval() forward outside no_grad | 1 |" in text
    assert "| **total** | **1** |" in text
    assert (tmp_path / "report.csv").read_text().count("\n") == 5


def _tarball(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_tree_extracts_overlays_and_shims(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for rel, text in {"tests/__init__.py": "", "tests/test_modeling_common.py": "old = 1\n",
                      "tests/models/llama/test_modeling_llama.py": "x = 1\n",
                      "utils/test_module/__init__.py": "", "setup.py": ""}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    sdist = tmp_path / "transformers-9.9.9.tar.gz"
    _tarball(sdist, {"transformers-9.9.9/tests/test_modeling_common.py": "new = 1\n",
                     "transformers-9.9.9/tests/deep/x.py": "no = 1\n",
                     "transformers-9.9.9/src/transformers/__init__.py": ""})
    package = tmp_path / "site" / "transformers"
    package.mkdir(parents=True)
    monkeypatch.setattr(harness, "installed_transformers", lambda: ("9.9.9", package))

    tree = harness.prepare_tree(tmp_path / "cache", str(src / ".git"), "HEAD", None, str(sdist))
    assert (tree / "tests/test_modeling_common.py").read_text() == "new = 1\n"
    assert (tree / "tests/models/llama/test_modeling_llama.py").exists()
    assert (tree / "utils/test_module/__init__.py").exists()
    assert not (tree / "setup.py").exists() and not (tree / "tests/deep").exists()
    assert (tree / "src/transformers").resolve() == package.resolve()
    assert "flash_attn_test" in (tree / "pytest.ini").read_text()
    assert "shim" in (tree / "SOURCE.txt").read_text()
    shim = (tree / "tests/distributed_testing_utils.py").read_text()
    namespace = {}
    exec(compile(shim, "shim", "exec"), namespace)
    with pytest.raises(Exception, match="run_distributed"):
        namespace["__getattr__"]("run_distributed")()
    # reused without a source; a missing tree without a source is an error naming the options
    assert harness.prepare_tree(tmp_path / "cache", None, "HEAD", None, None) == tree
    with pytest.raises(SystemExit, match="--git-dir"):
        harness.prepare_tree(tmp_path / "other", None, "HEAD", None, None)


def test_plugin_forces_act_torch_on_text_decoders_only(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers import PreTrainedModel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert plugin._is_text_decoder(transformers.LlamaConfig())
    assert plugin._is_text_decoder(transformers.Gemma3TextConfig())
    assert not plugin._is_text_decoder(transformers.Gemma3Config())      # composite parent
    assert not plugin._is_text_decoder(transformers.SiglipVisionConfig())
    saved = (PreTrainedModel.get_correct_attn_implementation,
             dict(ALL_ATTENTION_FUNCTIONS._global_mapping))
    try:
        plugin._force_attention("act_torch")
        tiny = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
        assert transformers.LlamaModel(transformers.LlamaConfig(**tiny)) \
            .config._attn_implementation == "act_torch"
        eager = transformers.LlamaConfig(**tiny, attn_implementation="eager")
        assert transformers.LlamaModel(eager).config._attn_implementation == "eager"
        # an eval() forward in grad mode is counted (and differentiable), also when diagnosing
        import torch

        model = transformers.LlamaModel(transformers.LlamaConfig(**tiny)).eval()
        ids = torch.tensor([[1, 2, 3]])
        plugin._reset()
        out = model(ids).last_hidden_state
        assert out.requires_grad
        assert plugin._seen["grad_calls"] == 1 and plugin._seen["train_calls"] == 0
        monkeypatch.setattr(plugin, "NOGRAD_EVAL", True)
        assert model(ids).last_hidden_state.shape == (1, 3, 16)
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=16,
                                                 num_hidden_layers=1, num_attention_heads=2)
        assert transformers.SiglipVisionModel(vision).config._attn_implementation == "sdpa"
    finally:
        PreTrainedModel.get_correct_attn_implementation = saved[0]
        ALL_ATTENTION_FUNCTIONS._global_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._global_mapping.update(saved[1])
