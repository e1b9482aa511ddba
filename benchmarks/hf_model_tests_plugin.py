"""pytest plugin that ``hf_model_tests.py`` loads into Transformers' own test suites.

Environment:

* ``ACT_HF_FORCE``: an attention implementation (``act_torch``) to put in place of the default
  and of an explicit ``"sdpa"`` wherever a causal-LM text decoder resolves its attention
  (``PreTrainedModel.get_correct_attn_implementation``). ``"eager"`` and every other explicit
  request are left alone, so eager-vs-sdpa parity tests compare eager with ACT. Vision towers
  and composite (vision-language) parents keep theirs: only the text decoder runs ACT, as
  ``act_kernels.apply_profile`` does. Empty or unset: nothing is changed (the baseline run).
  No ``act_profile`` is set: every layer calibrates no head, which is what an empty profile
  gives.
* ``ACT_HF_NOGRAD_EVAL=1`` (diagnosis only): an ACT call in grad mode on a module in ``eval()``
  runs under ``torch.no_grad()`` instead of meeting the forward-only refusal, to show what the
  tests would meet behind it (the attention output then carries no gradient).
* ``ACT_HF_RESULTS``: the JSON-lines file each test's outcome is appended to (node id, phase,
  outcome, exception line, whether the traceback passes through ``act_kernels``, the mask
  structures seen and the number of ACT attention calls made during the test: all of them,
  those in grad mode on a module in ``train()`` and those in grad mode on a module in ``eval()``).
"""
from __future__ import annotations

import json
import os

import pytest

FORCE = os.environ.get("ACT_HF_FORCE", "").strip()
RESULTS = os.environ.get("ACT_HF_RESULTS", "").strip()
NOGRAD_EVAL = os.environ.get("ACT_HF_NOGRAD_EVAL", "") == "1"

# Per-test evidence, reset before each test.
_seen = {"mask_4d": 0, "packed": 0, "blocks": 0, "overlay": 0, "act_calls": 0,
         "grad_calls": 0, "train_calls": 0}


def _reset():
    for key in _seen:
        _seen[key] = 0


def _is_text_decoder(config) -> bool:
    """A leaf config (no sub-configs) whose model type Transformers maps to a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "sub_configs", None):
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _force_attention(name: str) -> None:
    import act_kernels  # noqa: F401  (registers act_torch / act_triton with Transformers)
    from transformers import PreTrainedModel

    original = PreTrainedModel.get_correct_attn_implementation

    def get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
        if requested_attention in (None, "sdpa") and _is_text_decoder(self.config):
            requested_attention = name
        return original(self, requested_attention, is_init_check)

    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation

    # Count the ACT attention calls (not inside a compiled graph: no side effect there).
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    forward = ALL_ATTENTION_FUNCTIONS[name]

    def counted(module, *args, **kwargs):
        if not torch.compiler.is_compiling():
            _seen["act_calls"] += 1
            if torch.is_grad_enabled():    # module.training: a training step, else eval()
                _seen["train_calls" if module.training else "grad_calls"] += 1
                if NOGRAD_EVAL and not module.training:
                    with torch.no_grad():
                        return forward(module, *args, **kwargs)
        return forward(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS._global_mapping[name] = counted


def _watch_masks() -> None:
    """Record the mask structures the models build (Transformers' own mask functions)."""
    import sys

    from transformers import masking_utils

    preprocess = masking_utils._preprocess_mask_arguments

    def watched_preprocess(config, inputs_embeds, attention_mask, *args, **kwargs):
        if getattr(attention_mask, "ndim", 0) == 4:
            _seen["mask_4d"] += 1
        out = preprocess(config, inputs_embeds, attention_mask, *args, **kwargs)
        if out[2] is not None:
            _seen["packed"] += 1
        return out

    masking_utils._preprocess_mask_arguments = watched_preprocess

    overlay = masking_utils.blockwise_overlay

    def watched_overlay(*args, **kwargs):
        _seen["blocks"] += 1
        return overlay(*args, **kwargs)

    masking_utils.blockwise_overlay = watched_overlay
    for module in list(sys.modules.values()):   # model files import it by name
        if getattr(module, "__name__", "").startswith("transformers.models.") and \
                getattr(module, "blockwise_overlay", None) is overlay:
            module.blockwise_overlay = watched_overlay

    for combine in ("or_masks", "and_masks"):
        original = getattr(masking_utils, combine)

        def watched(*fns, _original=original):
            _seen["overlay"] += 1
            return _original(*fns)

        setattr(masking_utils, combine, watched)


def pytest_configure(config):
    if FORCE:
        _force_attention(FORCE)


def pytest_collection_finish(session):
    _watch_masks()          # after the model files are imported


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _reset()


def _crash_line(report) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None:
        return crash.message
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):          # skips: (path, line, reason)
        return str(longrepr[-1])
    return str(longrepr or "")


def pytest_runtest_logreport(report):
    if not RESULTS:
        return
    if report.when != "call" and report.outcome == "passed":
        return
    text = str(report.longrepr) if report.failed else ""
    record = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "wasxfail": hasattr(report, "wasxfail"),
        "message": _crash_line(report)[:2000],
        "act_frames": "act_kernels/" in text,
        "tail": text[-1500:],
        "duration": round(report.duration, 3),
        **_seen,
    }
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
