"""Evaluation tasks of the ACT reference protocols: data, prompts, splits and scoring.

Ground level: imports nothing of ``act_kernels`` outside this package.

* Registry: :data:`TASKS`, :func:`get_task` (aliases ``sst2 sst5 mr subj trec agnews cb boolq
  arc_easy arc_challenge piqa hellaswag copa openbookqa commonsense_qa``, plus ``dbpedia`` and
  ``trec_reference``; or a task file path).
* Task files (YAML/JSON, :mod:`.taskfile`): :func:`register_task_file`, :func:`load_task_file`,
  :class:`TaskFileError`.
* Data: :func:`load_examples`, :func:`available_splits`, :class:`DataNotInstalledError`.
* Prompts: :meth:`Task.build_prompt`, :meth:`Task.candidate_token_ids`,
  :meth:`Task.option_token_ids`, :meth:`Task.score_item`, :meth:`Task.loglik_requests`.
* Splits: :func:`make_splits`, :func:`load_splits`, :class:`Splits`.
* Scoring protocols on logits (:mod:`.protocols`): :func:`encode_batch`,
  :func:`prepare_batch`, :func:`truncate_left`, :func:`score_last_logits`,
  :func:`loglik_ids`, :func:`encode_loglik`, :func:`continuation_logprobs`,
  :func:`score_option_logprobs`, :func:`accuracy`, :func:`balanced_accuracy`. The loop that runs
  a model over samples with them is :class:`act_kernels.scoring.PlainScorer`.
"""
from .data import (DataNotInstalledError, available_splits, default_split, load_examples,
                   offline_path)
from .lookup import get_task
from .registry import CLASSIFICATION_TASKS, MULTIPLE_CHOICE_TASKS, TASKS
from .rows import read_rows
from .protocols import (accuracy, balanced_accuracy, continuation_logprobs, encode_batch,
                        encode_loglik, left_pad, loglik_ids, pad_id, prepare_batch,
                        score_last_logits, score_option_logprobs, truncate_left)
from .splits import Splits, load_splits, make_splits
from .task import (CLASSIFICATION, LETTERS, MULTIPLE_CHOICE, Example, ScoreItem, Task,
                   apply_chat, letter_token_ids)
from .taskfile import TaskFileError, load_task_file, register_task_file

__all__ = [
    "CLASSIFICATION", "CLASSIFICATION_TASKS", "DataNotInstalledError", "Example", "LETTERS",
    "MULTIPLE_CHOICE", "MULTIPLE_CHOICE_TASKS", "ScoreItem", "Splits", "TASKS", "Task",
    "TaskFileError", "accuracy", "apply_chat", "available_splits", "balanced_accuracy",
    "continuation_logprobs", "default_split", "encode_batch", "encode_loglik", "get_task",
    "left_pad", "letter_token_ids", "load_examples", "load_splits", "load_task_file",
    "loglik_ids", "make_splits", "offline_path", "pad_id", "prepare_batch", "read_rows",
    "register_task_file", "score_last_logits", "score_option_logprobs", "truncate_left",
]
