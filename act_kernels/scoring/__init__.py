"""Scoring, the one home that ``act search``, ``act eval`` and ``act demo`` stand on.

* :mod:`.samples`: :class:`Sample` (a prompt tokenised once, with its score item, and its
  options' continuations for log-likelihood scoring), :func:`parse_tasks`,
  :func:`encode_examples`, the calibration and evaluation draws
  (:func:`calibration_examples`, :func:`evaluation_examples`: disjoint by identity),
  :func:`make_batches`, :func:`pad_batch`, :func:`fingerprint`;
* :mod:`.results`: per-sample :class:`Results`, :func:`metrics`, :func:`paired_bootstrap`;
* :mod:`.plain`: :class:`PlainScorer`, one scorer for both protocols (next token, option
  log-likelihood, :data:`PROTOCOLS`).

It sits between the Transformers integration and the pipeline: it imports nothing of the
search, the evaluation or the command lines (``tests/test_architecture.py``).
"""
from .plain import (LOGLIK, NEXT_TOKEN, PROTOCOLS, PlainScorer, check_protocol, parse_protocols,
                    profile_masks, score_options)
from .results import Results, metrics, paired_bootstrap
from .samples import (Sample, calibration_examples, encode_examples, evaluation_examples,
                      fingerprint, make_batches, pad_batch, parse_tasks, share)

__all__ = ["LOGLIK", "NEXT_TOKEN", "PROTOCOLS", "PlainScorer", "Results", "Sample",
           "calibration_examples", "check_protocol", "encode_examples", "evaluation_examples",
           "fingerprint", "make_batches", "metrics", "pad_batch", "paired_bootstrap", "parse_protocols",
           "parse_tasks", "profile_masks", "score_options", "share"]
