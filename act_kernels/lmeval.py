"""lm-evaluation-harness model type ``act``: a causal LM with an ACT profile applied.

Importing this module registers the model with lm-eval (``register_model("act")``); newer
lm-eval releases also find it through the package entry point ``lm_eval.models: act``. From
the command line, ``act lm-eval ARGS...`` runs lm-eval's own command line with it registered
(:func:`add_arguments` / :func:`run` are that subcommand)::

    act lm-eval run --model act --model_args pretrained=model.gguf,profile=profile.json,backend=torch \\
        --tasks arc_easy

Model arguments: ``pretrained`` (whatever :func:`act_kernels.load_model` reads: omitted or
``smollm2-135m-instruct-q4_1`` for the default model, a ``.gguf`` file, a Transformers model id
or checkpoint folder, or a loaded model in Python), ``profile`` (the ``profile.json`` of
``act search``; omitted: the uncalibrated model), ``backend`` (ACT's: ``auto``, ``torch`` or
``triton``).  Every other argument is lm-eval's ``hf`` model's (``dtype``, ``device``,
``batch_size``, ``revision``, ``peft``, ...) and means what it means there; lm-eval's own
``backend`` argument is always ``causal`` here.  Install with ``pip install act-kernels[lmeval]``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as exc:
    if exc.name is None or not exc.name.startswith("lm_eval"):
        raise
    raise ModuleNotFoundError(
        "act_kernels.lmeval needs lm-evaluation-harness 0.4: "
        "pip install 'act-kernels[lmeval]'", name=exc.name) from None

from .hf import apply_profile, attn_implementation_for, get_profile
from .model_loader import resolve_model_path
from .params import DEFAULT_BACKEND
from .profiles import as_profile

MODEL_NAME = "act"

log = logging.getLogger(__name__)


@register_model(MODEL_NAME)
class ACTLM(HFLM):
    """lm-eval's ``hf`` model with an ACT profile applied to the loaded model (a model object
    passed as ``pretrained`` gets the profile attached: it is the model that is evaluated)."""

    def __init__(self, pretrained=None, profile=None, backend: str = DEFAULT_BACKEND, **kwargs):
        attn_implementation_for(backend)  # an unknown backend fails before any loading
        chosen = None if profile is None else as_profile(profile)
        if (pretrained is None or isinstance(pretrained, str)) and "gguf_file" not in kwargs:
            # the default model and .gguf files: their cached dequantised checkpoint folder;
            # ids and folders as they are (lm-eval's own gguf_file argument is left to it)
            pretrained = resolve_model_path(pretrained)
        super().__init__(pretrained=pretrained, backend="causal", **kwargs)
        if chosen is None:
            log.warning("act: no profile given; evaluating the uncalibrated model "
                        "(backend=%s unused)", backend)
            return
        apply_profile(self.model, chosen, backend=backend)
        log.info("act: profile with %d calibrated heads applied (backend %s)",
                 chosen.num_calibrated(), backend)

    def get_model_info(self) -> dict:
        """lm-eval's model information plus the applied profile (for the results file)."""
        info = super().get_model_info()
        profile = get_profile(self.model)
        info["act_profile"] = None if profile is None else profile.to_dict()
        return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``act lm-eval``: every argument, options included, belongs to lm-eval. None is an option
    of this parser: with a prefix character no argument starts with, ``--model`` is not taken
    for one."""
    parser.prefix_chars = "\0"
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="lm-eval's arguments, e.g. run --model act --model_args "
                             "profile=profile.json --tasks arc_easy (lm-eval's help: "
                             "act lm-eval -h)")


def run(args) -> int:
    return cli_main(args.lm_eval_args)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """lm-eval's command line (``lm-eval ...``) with the ``act`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["act lm-eval"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
