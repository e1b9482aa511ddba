"""The traffic model of ``benchmarks/gpu_model.py`` against hand-counted small cases.

Under the interpreter the launchers use the fixed test blocks (16 keys / rows, 32-key decode
splits, 16 query rows per decode program), so every loop can be counted on paper."""
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="hand counts use the interpreter's block sizes")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import gpu_model  # noqa: E402


def test_decode_hand_count(monkeypatch):
    # B=1, Hq=4, Hkv=2 (groups of 2 rows in 16-row tiles), D=16, Nk=40, bf16, head 0 calibrated
    monkeypatch.setitem(gpu_model.MODELS, "tiny", (4, 2, 16))
    case = gpu_model.decode_case("tiny", 1, 40, 0.25)
    split, epilogue = case["launches"]
    assert split["kernel"] == "decode_split" and split["grid"] == [2, 2]    # 2 splits x 2 groups
    # splits [0, 32) and [32, 40): 3 key blocks and 40 keys per group; q of 4 rows per split
    assert split["read"] == 2 * 4 * 16 * 2 + 2 * 40 * 16 * 2 * 2 + 2 * 4    # q, K+V, Cal flags
    # partial m, l, acc [16 lanes] per row and split; 16 candidates of the calibrated row, flags
    assert split["write"] == 2 * 4 * (8 + 16 * 4) + 2 * (1 * 16 * 8 + 4 * 4)
    assert split["flops"] == 2 * 3 * 4 * 16 * 16 * 16                     # two 16x16x16 dots
    assert epilogue["grid"] == [2] and epilogue["flops"] == 0
    # partials, slots; flags, the calibrated row's candidates, its sinks' V rows (9 at tau 0.1)
    assert epilogue["read"] == 2 * 4 * 72 + 4 * 4 + 4 + 2 * 16 * 8 + 9 * 16 * 2
    assert epilogue["write"] == 4 * (16 * 2 + 4) + 4 * 4                  # out, lse, mass
    assert case["min_bytes"] == (2 * 4 * 16 + 2 * 2 * 40 * 16) * 2
    total = 5384 + 864 + 1140 + 160
    assert case["total"]["bytes"] == total
    assert case["bytes_vs_min"] == pytest.approx(total / 5376)
    h100_bw, h100_peak = gpu_model.DEVICES["H100 SXM"]
    assert case["total"]["seconds"]["H100 SXM"] == pytest.approx(
        (5384 + 864 + 1140 + 160) / h100_bw)                  # memory-bound launches


def test_prefill_hand_count(monkeypatch):
    # B=1, Hq=2, Hkv=1, D=16, N=20, bf16, both heads calibrated; 16-row/16-key tiles
    monkeypatch.setitem(gpu_model.MODELS, "tiny", (2, 1, 16))
    case = gpu_model.prefill_case("tiny", 20, 1.0)
    kernels = [launch["kernel"] for launch in case["launches"]]
    assert kernels == ["forward", "column", "correction"]
    fwd, col = case["launches"][:2]
    assert fwd["grid"] == [2, 2]
    # query block 0: 16 rows, key block 0; block 1: 4 rows, key blocks 0 and 1 (20 keys)
    assert fwd["read"] == 2 * (16 * 32 + 16 * 64 + 4) + 2 * (4 * 32 + 20 * 64 + 4)
    assert fwd["write"] == 2 * 20 * (32 + 4) + 2 * 20 * 16 * 4           # out + lse, fp32 u
    assert fwd["flops"] == 2 * 3 * 4 * 16 * 16 * 16
    # key block 0 is seen by query blocks 0 and 1 (20 rows), key block 1 (4 keys) by block 1
    assert col["grid"] == [2, 2]
    assert col["read"] == 2 * (4 + 16 * 32 + 20 * 36) + 2 * (4 + 4 * 32 + 4 * 36)
    assert col["write"] == 2 * 20 * 4
    assert col["flops"] == 2 * 3 * 2 * 16 * 16 * 16
    assert case["flash_flops"] == 4 * 2 * 16 * (20 * 21 // 2)
    assert case["flops_vs_flash"] == pytest.approx(case["total"]["flops"] / (4 * 2 * 16 * 210))


def test_report_and_goals(monkeypatch):
    monkeypatch.setitem(gpu_model.MODELS, "tiny", (4, 2, 16))
    cases = gpu_model.run(decode_nk=(40,), decode_b=(1,), prefill_n=(20,), models=("tiny",))
    assert {(c["path"], c["calibrated"]) for c in cases} == {
        (p, f) for p in ("decode", "prefill") for f in ("0%", "25%", "100%")}
    plain = next(c for c in cases if c["path"] == "prefill" and c["calibrated"] == "0%")
    assert plain["flops_vs_plain"] == 1.0 and plain["bytes_vs_plain"] == 1.0
    goals = gpu_model.goals(cases)
    assert set(goals) == set(gpu_model.GOALS)
    text = gpu_model.markdown(cases, decode_nk=(40,), decode_b=(1,))
    assert text.count("| tiny | 1 | 40 |") == 3 and "| 20 | 100% |" in text
    assert torch.tensor([g["modelled_worst"] for g in goals.values()]).isfinite().all()
