"""Calibration / evaluation samples: tokenised once, batched with left padding, split by rank."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..tasks import ScoreItem, get_task, left_pad, load_splits, pad_id


@dataclass(frozen=True)
class Sample:
    """One prompt, ready to run: global index, task, example id, token ids, score item."""

    index: int
    task: str
    id: str
    ids: tuple[int, ...]
    item: ScoreItem

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
                    max_length: Optional[int], start: int = 0) -> list[Sample]:
    task = get_task(task_name)
    out = []
    for k, ex in enumerate(examples):
        prompt = task.build_prompt(ex, tokenizer, chat_template=chat_template)
        ids = tokenizer.encode(prompt, add_special_tokens=not chat_template)
        if max_length is not None and len(ids) > max_length:
            ids = ids[len(ids) - max_length:]
        out.append(Sample(start + k, task.name, ex.id, tuple(int(i) for i in ids),
                          task.score_item(ex, tokenizer)))
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
                        data: Optional[Mapping[str, str]] = None):
    """The evaluation split of ``task``: disjoint from the first ``n_calib`` calibration
    examples of the same seed (what ``act search`` used), ``samples`` of them (fewer when the
    data has fewer). Returns the :class:`~act_kernels.tasks.Splits`."""
    path = (data or {}).get(task)
    try:
        return load_splits(task, seed, n_calib, samples, path=path)
    except ValueError:
        return load_splits(task, seed, n_calib, None, path=path)


def split_score_val(per_task: Mapping[str, list], val_fraction: float) -> tuple[dict, dict]:
    """Per task, the first part (in seeded order) scores the candidates, the rest validates."""
    score, val = {}, {}
    for task, exs in per_task.items():
        n_val = int(math.floor(len(exs) * val_fraction + 0.5)) if val_fraction > 0 else 0
        if 0 < val_fraction and n_val == 0 and len(exs) >= 2:
            n_val = 1
        n_val = min(n_val, max(len(exs) - 1, 0))
        score[task] = exs[:len(exs) - n_val]
        val[task] = exs[len(exs) - n_val:]
    return score, val


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
