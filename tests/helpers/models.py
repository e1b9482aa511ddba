"""Tiny random Transformers models shared by the integration tests (no checkpoint needed)."""
from __future__ import annotations

import torch
import transformers

from act_kernels import ACTProfile, apply_profile

PROFILE = ACTProfile(heads={1: [0, 2], 2: [1]}, tau=0.05)
"""Two layers of a three-layer model calibrated, tau low enough that the tiny models have sinks."""


def _sharpened(config) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():      # sharper attention than the random init gives: sinks exist
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model.eval()


def tiny_llama(seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """A Llama of ``layers`` layers, 4 query and 2 kv heads, SDPA attention, in eval mode."""
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return _sharpened(config)


def profiled_llama(backend: str = "torch") -> torch.nn.Module:
    """:func:`tiny_llama` with :data:`PROFILE` applied through ``backend``."""
    return apply_profile(tiny_llama(0), PROFILE, backend=backend)


def tiny_sliding(kind: str) -> torch.nn.Module:
    """A three-layer model with sliding-window layers: ``"gemma3"`` (sliding, full, sliding;
    window 5) or ``"mistral"`` (window 6 in every layer)."""
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(
            head_dim=8, sliding_window=5, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)
    else:
        config = transformers.MistralConfig(sliding_window=6, **common)
    torch.manual_seed(0)
    return _sharpened(config)
