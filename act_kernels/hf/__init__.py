"""Hugging Face Transformers integration: ACT as the attention implementations ``"act_torch"``
and ``"act_triton"``, and the functions that attach profiles to models.

Importing this package registers both implementations with Transformers. Layout:

- :mod:`.attention`: the attention function and its registration;
- :mod:`.masks`: the masks Transformers passes, checked and turned into the op's arguments (key
  padding, packed-sequence and image-block ids, or the dense ``attn_mask``);
- :mod:`.mask_functions`: Transformers' own mask functions, read from their construction;
- :mod:`.state`: the per-model state (profile, head overrides, recorders);
- :mod:`.api`: ``apply_profile``, ``head_override``, ``recording``, ``using_profile``, ...;
- :mod:`.loading`: ``load_model`` with an optional profile.
"""
from .api import (apply_profile, attn_implementation_for, get_profile, head_override,
                  recording, remove_profile, using_profile)
from .attention import (ACT_ATTENTION_BACKENDS, act_torch_attention_forward,
                        act_triton_attention_forward, register)
from .loading import load_model
from .masks import ACTMaskError, DensePathWarning, MaskPlan, mask_plan, mask_to_key_padding

register()

__all__ = ["ACT_ATTENTION_BACKENDS", "ACTMaskError", "DensePathWarning", "MaskPlan",
           "act_torch_attention_forward", "act_triton_attention_forward", "apply_profile",
           "attn_implementation_for", "get_profile", "head_override", "load_model", "mask_plan",
           "mask_to_key_padding", "recording", "register", "remove_profile", "using_profile"]
