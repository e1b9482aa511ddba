"""Facts about a Transformers model that several layers need: its text decoder's config,
its device, its number of layers and query heads. Duck-typed: nothing here imports
Transformers."""
from __future__ import annotations

import torch


def text_config(model_or_config):
    """The config of the text decoder: ``config.get_text_config()`` where it exists (composite
    models such as vision-language models), else the config itself."""
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def num_layers(model) -> int:
    value = getattr(text_config(model), "num_hidden_layers", None)
    if not isinstance(value, int):
        raise ValueError(f"cannot tell the number of layers of {type(model).__name__}")
    return value


def num_query_heads(model) -> int:
    value = getattr(text_config(model), "num_attention_heads", None)
    if not isinstance(value, int):
        raise ValueError(f"cannot tell the number of query heads of {type(model).__name__}")
    return value
