"""TEMPORARY shim during the issue-10 move (removed before the session ends): use
act_kernels.profiles and act_kernels.hf."""
from .hf.api import (apply_profile, get_profile, head_override, remove_profile,  # noqa: F401
                     _attention_configs, _set_attn_implementation)
from .modelinfo import text_config as _text_config  # noqa: F401
from .profiles import PROFILE_FORMAT, ACTProfile, ProfileLike, as_profile  # noqa: F401
