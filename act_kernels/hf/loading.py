"""``load_model``: a model from anywhere (the default model, a ``.gguf`` file, a model id or
folder, or a model already in memory), with an ACT profile attached."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple, Union

import torch

from ..model_loader import load_pretrained, prepare_tokenizer
from ..params import DEFAULT_BACKEND
from ..profiles import ACTProfile
from .api import apply_profile
from .attention import ACT_ATTENTION_BACKENDS

ModelLike = Union[None, str, os.PathLike, torch.nn.Module]


def _tokenizer_of(model):
    """The tokenizer saved with an in-memory model's checkpoint, if it can be found."""
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if source:
        try:
            from transformers import AutoTokenizer

            return prepare_tokenizer(AutoTokenizer.from_pretrained(source))
        except (OSError, ValueError):
            pass
    warnings.warn("load_model: no tokenizer found for the model passed in (pass tokenizer=...); "
                  "returning None as the tokenizer", stacklevel=3)
    return None


def load_model(name_or_path: ModelLike = None, *, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa",
               profile: Union[None, str, os.PathLike, dict, ACTProfile] = None,
               tokenizer=None) -> Tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)``, the model in eval mode.

    ``name_or_path``: ``None`` / ``"smollm2-135m-instruct-q4_1"`` (the default model), the path
    of a ``.gguf`` file, a Transformers model id or checkpoint folder (see
    :func:`act_kernels.model_loader.load_pretrained`), or a model already loaded (used as it
    is: ``dtype`` does not apply; its tokenizer is ``tokenizer`` or the one saved beside its
    checkpoint).
    ``attn_implementation``: ``"sdpa"``, ``"eager"``, ``"act_torch"``, ``"act_triton"``, ...
    ``profile``: an :class:`~act_kernels.profiles.ACTProfile`, its dict, or the path of its
    JSON file; it is attached with :func:`~act_kernels.hf.apply_profile`, on
    ``attn_implementation`` when that is an ACT one, else on the ACT backend for the model's
    device.
    """
    if isinstance(name_or_path, torch.nn.Module):
        model = name_or_path.eval()
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model)
    else:
        model, loaded = load_pretrained(name_or_path, dtype=dtype,
                                        attn_implementation=attn_implementation)
        tokenizer = tokenizer if tokenizer is not None else loaded
    if profile is not None:
        apply_profile(model, profile,
                      backend=ACT_ATTENTION_BACKENDS.get(attn_implementation, DEFAULT_BACKEND))
    return model, tokenizer
