"""``load_model``: a checkpoint from :mod:`act_kernels.model_loader`, with an ACT profile."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from ..model_loader import load_pretrained
from ..profiles import ACTProfile
from .api import apply_profile
from .attention import ACT_ATTENTION_BACKENDS


def load_model(name_or_path: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa",
               profile: Union[None, str, os.PathLike, dict, ACTProfile] = None,
               ) -> Tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)``, the model in eval mode (see
    :func:`act_kernels.model_loader.load_pretrained` for ``name_or_path`` and ``dtype``).

    ``attn_implementation``: ``"sdpa"``, ``"eager"``, ``"act_torch"``, ``"act_triton"``, ...
    ``profile``: an :class:`~act_kernels.profiles.ACTProfile`, its dict, or the path of its
    JSON file; it is attached with :func:`~act_kernels.hf.apply_profile`, on
    ``attn_implementation`` when that is an ACT one, else on the ACT backend for the model's
    device.
    """
    model, tokenizer = load_pretrained(name_or_path, dtype=dtype,
                                       attn_implementation=attn_implementation)
    if profile is not None:
        apply_profile(model, profile,
                      backend=ACT_ATTENTION_BACKENDS.get(attn_implementation, "auto"))
    return model, tokenizer
