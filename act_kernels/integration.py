"""TEMPORARY shim during the issue-10 move (removed before the session ends): use act_kernels.hf."""
from .hf import *  # noqa: F401,F403
from .hf import (ACT_ATTENTION_BACKENDS, ACTMaskError, act_torch_attention_forward,  # noqa: F401
                 act_triton_attention_forward, attn_implementation_for, mask_to_key_padding,
                 recording, register)
