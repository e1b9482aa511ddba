"""Samples: prompts drawn from the tasks' seeded splits, tokenised once, batched with left
padding (the calibration samples of ``act search`` and the evaluation samples of ``act eval``)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..tasks import (ScoreItem, get_task, left_pad, load_splits, loglik_ids, pad_id,
                     truncate_left)


@dataclass(frozen=True)
class Sample:
    """One prompt, ready to run: global index, task, example id, token ids, score item.

    ``options`` (filled when encoded for the log-likelihood protocol, else empty): per option,
    ``(ids, n_cont, n_chars)``: the tokens of the context followed by the option's
    continuation, the continuation's token count (its tokens are the last ``n_cont``) and its
    character count (for length normalisation)."""

    index: int
    task: str
    id: str
    ids: tuple[int, ...]
    item: ScoreItem
    options: tuple[tuple[tuple[int, ...], int, int], ...] = ()

    @property
    def gold(self) -> int:
        return self.item.gold


def parse_tasks(spec) -> list[str]:
    """``"sst2,arc_easy"`` or a list -> canonical task names (``KeyError`` names unknown ones)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError("no task given")
    out = []
    for name in names:
        canon = get_task(name).name
        if canon not in out:
            out.append(canon)
    return out


def share(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers (the first ones get the remainder)."""
    base, extra = divmod(int(total), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def encode_examples(task_name: str, examples, tokenizer, chat_template: bool,
                    max_length: Optional[int], start: int = 0,
                    loglik: bool = False) -> list[Sample]:
    """The examples as :class:`Sample` s numbered from ``start``: the prompt for next-token
    scoring and, with ``loglik``, each option's context + continuation for log-likelihood
    scoring (:meth:`~act_kernels.tasks.Task.loglik_requests`); both truncated on the left to
    ``max_length`` tokens."""
    task = get_task(task_name)
    special = not chat_template
    out = []
    for k, ex in enumerate(examples):
        prompt = task.build_prompt(ex, tokenizer, chat_template=chat_template)
        ids = truncate_left(tokenizer.encode(prompt, add_special_tokens=special), max_length)
        options = ()
        if loglik:
            options = tuple(
                (tuple(seq), n_cont, len(cont))
                for ctx, cont in task.loglik_requests(ex, tokenizer, chat_template)
                for seq, n_cont in [loglik_ids(tokenizer, ctx, cont, add_special_tokens=special,
                                               max_length=max_length)])
        out.append(Sample(start + k, task.name, ex.id, tuple(int(i) for i in ids),
                          task.score_item(ex, tokenizer), options))
    return out


def calibration_examples(tasks: Sequence[str], samples: int, seed: int,
                         data: Optional[Mapping[str, str]] = None) -> dict[str, list]:
    """``{task: examples}``: ``samples`` calibration examples in all, shared evenly by the tasks,
    from each task's calibration pool in seeded order (:func:`act_kernels.tasks.load_splits`)."""
    out = {}
    for task, n in zip(tasks, share(samples, len(tasks))):
        splits = load_splits(task, seed, n, 0, path=(data or {}).get(task))
        out[task] = list(splits.calib)
    return out


def evaluation_examples(task: str, samples: int, seed: int, n_calib: int,
                        data: Optional[Mapping[str, str]] = None,
                        calib_seed: Optional[int] = None):
    """The evaluation split of ``task``: ``samples`` examples (fewer when the data has fewer)
    in ``seed``'s order, none of them among the first ``n_calib`` calibration examples of
    ``calib_seed`` (default ``seed``), i.e. what ``act search --seed calib_seed`` calibrated on:
    they are excluded by identity, whatever ``seed`` is. Returns the
    :class:`~act_kernels.tasks.Splits`."""
    path = (data or {}).get(task)
    try:
        return load_splits(task, seed, n_calib, samples, path=path, calib_seed=calib_seed)
    except ValueError:
        return load_splits(task, seed, n_calib, None, path=path, calib_seed=calib_seed)


def make_batches(samples: Sequence[Sample], batch_size: int,
                 max_pad: float = 0.15) -> list[list[Sample]]:
    """Batches of similar lengths: samples sorted by (length, index), cut when a batch is full
    or when a sample is longer than the batch's first by more than ``max_pad`` of it (and 8
    tokens), so padding wastes little. Deterministic and independent of the number of
    processes: every batch computes the same numbers everywhere."""
    order = sorted(samples, key=lambda s: (len(s.ids), s.index))
    batches: list[list[Sample]] = []
    for s in order:
        if batches:
            cur = batches[-1]
            first = len(cur[0].ids)
            if len(cur) < max(1, batch_size) and len(s.ids) - first <= max(8, max_pad * first):
                cur.append(s)
                continue
        batches.append([s])
    return batches


def pad_batch(batch: Sequence[Sample], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` (:func:`act_kernels.tasks.left_pad`)."""
    enc = left_pad([s.ids for s in batch], pad_id(tokenizer), device)
    return enc["input_ids"], enc["attention_mask"]


def fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of the samples' ids and tokens (a checkpoint is only reused for the same data)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, list(s.ids), s.item.gold]).encode())
    return h.hexdigest()[:16]
