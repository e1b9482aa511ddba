"""Deterministic, seeded, disjoint calibration / evaluation splits.

The order is a keyed hash of ``(seed, example id)``: the same seed and ids give the same splits on
every machine and Python version, and adding or removing examples does not reshuffle the others.
Calibration and evaluation never share an example id, nor (when they come from different source
splits) an identical prompt.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from .task import Example


def _order(examples: Sequence[Example], seed: int) -> list[Example]:
    def key(e: Example) -> tuple[bytes, str]:
        return hashlib.sha256(f"{int(seed)}\x00{e.id}".encode()).digest(), e.id
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids are not unique")
    return sorted(examples, key=key)


@dataclass(frozen=True)
class Splits:
    """A calibration / evaluation split; :meth:`to_record` is what outputs should store."""

    seed: int
    calib: list[Example] = field(repr=False)
    eval: list[Example] = field(repr=False)
    task: str = ""
    calib_split: str = ""
    eval_split: str = ""
    calib_seed: int | None = None     # the calibration's own seed when it is not ``seed``

    @property
    def calib_ids(self) -> list[str]:
        return [e.id for e in self.calib]

    @property
    def eval_ids(self) -> list[str]:
        return [e.id for e in self.eval]

    def to_record(self) -> dict:
        """JSON-serialisable description: task, seed, source splits, sizes and the ids in order."""
        seeds = {} if self.calib_seed is None else {"calib_seed": self.calib_seed}
        return {"task": self.task, "seed": self.seed, **seeds, "calib_split": self.calib_split,
                "eval_split": self.eval_split, "n_calib": len(self.calib),
                "n_eval": len(self.eval), "calib_ids": self.calib_ids, "eval_ids": self.eval_ids}


def make_splits(examples: Sequence[Example], seed: int, n_calib: int, n_eval: int | None = None,
                *, eval_examples: Sequence[Example] | None = None,
                calib_seed: int | None = None) -> Splits:
    """Pick ``n_calib`` calibration and ``n_eval`` evaluation examples, disjoint by id.

    One pool (``eval_examples=None``): the examples are ordered by the seeded hash; the first
    ``n_calib`` calibrate, the next ``n_eval`` (all the rest when ``None``) evaluate.
    Two pools: calibration from ``examples`` (e.g. train), evaluation from ``eval_examples``
    (e.g. validation), each in seeded-hash order.  Either way evaluation skips any example whose
    id or prompt text is also in the calibration set (duplicate sentences exist in SST-2 etc.).
    Raises ``ValueError`` when there are not enough examples.

    ``calib_seed`` (default ``seed``): the calibration examples are the first ``n_calib`` in
    this seed's order, while evaluation is drawn in ``seed``'s order from everything else. So an
    evaluation may use another seed than the search that calibrated (``act eval --seed``) and
    still never see a calibration example: they are excluded by identity, not by position.
    """
    if n_calib < 0 or (n_eval is not None and n_eval < 0):
        raise ValueError("n_calib and n_eval must be >= 0")
    pool = _order(examples, seed if calib_seed is None else calib_seed)
    if n_calib > len(pool):
        raise ValueError(f"asked for {n_calib} calibration examples, only {len(pool)} available")
    calib = pool[:n_calib]
    if calib_seed is not None and calib_seed != seed:
        pool = _order(examples, seed)
    else:
        calib_seed = None
    candidates = pool if eval_examples is None else _order(eval_examples, seed)
    taken_ids = {e.id for e in calib}
    taken_prompts = {e.prompt for e in calib}
    rest = [e for e in candidates if e.id not in taken_ids and e.prompt not in taken_prompts]
    if n_eval is not None and n_eval > len(rest):
        raise ValueError(f"asked for {n_calib} calibration + {n_eval} evaluation examples, only "
                         f"{len(rest)} evaluation examples left after the calibration ones")
    ev = rest if n_eval is None else rest[:n_eval]
    task = calib[0].task if calib else (ev[0].task if ev else "")
    split_of = lambda xs: ",".join(sorted({f"{e.source}:{e.split}" for e in xs}))  # noqa: E731
    return Splits(seed=int(seed), calib=list(calib), eval=list(ev), task=task,
                  calib_split=split_of(calib), eval_split=split_of(ev),
                  calib_seed=None if calib_seed is None else int(calib_seed))


def load_splits(task, seed: int, n_calib: int, n_eval: int | None = None, *, source: str = "auto",
                path=None, eval_path=None, calib_seed: int | None = None) -> Splits:
    """Load ``task``'s data and split it with :func:`make_splits`.

    Calibration comes from the task's train split and evaluation from its validation/test split
    when both are available (offline: SST-2 only; with ``source="hf"``: every task); otherwise
    both come, disjointly, from the one installed split.  ``path`` / ``eval_path``: local files
    for calibration / evaluation (one file alone is split in two).  A task defined in a task
    file: its ``calib_split`` and ``eval_split`` data files when they differ, else its one data
    file split in two. ``calib_seed``: as for :func:`make_splits`.
    """
    from .data import available_splits, load_examples
    from .lookup import get_task

    t = get_task(task)
    if path is not None:
        calib_pool = load_examples(t, split="calib" if eval_path else "file", path=path)
        eval_pool = load_examples(t, split="eval", path=eval_path) if eval_path else None
        return make_splits(calib_pool, seed, n_calib, n_eval, eval_examples=eval_pool,
                           calib_seed=calib_seed)
    installed = available_splits(t) if source != "hf" else {}
    two_pools = t.calib_split != t.eval_split and {t.calib_split, t.eval_split} <= set(installed)
    if source == "hf" or two_pools:
        calib_pool = load_examples(t, split=t.calib_split, source=source)
        eval_pool = load_examples(t, split=t.eval_split, source=source)
        return make_splits(calib_pool, seed, n_calib, n_eval, eval_examples=eval_pool,
                           calib_seed=calib_seed)
    return make_splits(load_examples(t, source=source), seed, n_calib, n_eval,
                       calib_seed=calib_seed)
