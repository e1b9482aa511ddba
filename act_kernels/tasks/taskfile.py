"""Tasks defined in a small YAML or JSON file, used wherever a built-in task name is.

``get_task("path/to/task.yaml")`` (and so ``act search --tasks path/to/task.yaml``) reads the
file, checks it, and registers the task under its ``name``; later ``get_task(name)`` finds it.
The prompts and the scoring are the built-in ones (see :mod:`.task`); the data comes from the
file's JSONL/CSV files.  Fields (unknown fields are refused, so a typo is an error):

========================  ========================================================================
``name``                  the task's name (letters, digits, ``_``, ``-``; not a built-in name)
``kind``                  ``classification`` or ``multiple_choice``
``instruction``           text put before every example (classification: as is, so end it with
                          ``"\\n\\n"``; multiple choice: followed by a blank line)
``data``                  one data file (split in two by the seed) or ``{split: file}``; JSONL,
                          JSON list, CSV or TSV; relative paths are relative to the task file
``calib_split``           with ``{split: file}``: the calibration split (default ``train``)
``eval_split``            with ``{split: file}``: the evaluation split (default ``validation``,
                          else ``test``)
``label_field``           the data column holding the answer (default ``label``)
``description``           free text
``template``              classification (required): the example's text, ``{column}`` placeholders;
                          multiple choice: the question's text (default ``"{question}"``)
``label_words``           classification: the words scored after the prompt (>= 2)
``label_names``           classification: the classes as the data writes them (default: the label
                          words without their spaces); an integer label is a class index
``choices``               multiple choice: the column holding the list of options (default
                          ``choices``; in CSV a JSON list) or a list of columns, one per option
``option_format``         multiple choice: one option line (default ``"{letter}. {choice}"``)
========================  ========================================================================

Multiple-choice labels are an option index or an answer letter.  Any problem is one
:class:`TaskFileError` naming the file and the field.
"""
from __future__ import annotations

import csv
import json
import os
import re
import string
from typing import Any, Mapping

from .registry import builtin_task
from .rows import choices_list, gold_from_key, label_index, read_rows
from .task import CLASSIFICATION, LETTERS, MULTIPLE_CHOICE, Task

TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
SINGLE_SPLIT = "data"

_COMMON = ("name", "kind", "instruction", "data", "calib_split", "eval_split", "label_field",
           "description")
_FIELDS = {CLASSIFICATION: _COMMON + ("template", "label_words", "label_names"),
           MULTIPLE_CHOICE: _COMMON + ("template", "choices", "option_format")}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")

#: lower-cased name -> task, for the tasks registered from files
_FILE_TASKS: dict[str, Task] = {}
#: task file path -> ((mtime_ns, size) of the file when read, its task)
_READ: dict[str, tuple[tuple[int, int], Task]] = {}


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file and the field."""

    def __init__(self, path: str, field: str | None, problem: str):
        where = f"field {field!r}: " if field else ""
        super().__init__(f"task file {path}: {where}{problem}")
        self.path, self.field = path, field


class RowError(ValueError):
    """A data row that does not fit the task file (``field`` names the task-file field)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


# ---------------------------------------------------------------------- lookup and registry
def is_task_file_path(text: str) -> bool:
    """Whether ``text`` names a task file rather than a task (a suffix or a directory part)."""
    return text.lower().endswith(TASK_FILE_SUFFIXES) or "/" in text or os.sep in text


def file_task(name: str) -> Task | None:
    """The registered file task called ``name`` (case-insensitive, ``-`` = ``_``), or None."""
    return _FILE_TASKS.get(_key(name))


def register_task_file(path: str | os.PathLike) -> Task:
    """Read the task file at ``path``, register its task under its name and return it.

    Registering the same unchanged file again returns the same task; a changed file is read
    again; another file with the same task name is refused.
    """
    path = os.path.abspath(os.fspath(path))
    stamp = _stamp(path)
    if path in _READ and _READ[path][0] == stamp:
        return _READ[path][1]
    task = load_task_file(path)
    previous = file_task(task.name)
    if previous is not None and previous.source_path != path:
        raise TaskFileError(path, "name", f"task {task.name!r} is already defined by "
                                          f"{previous.source_path}")
    if path in _READ:  # the file changed, possibly its task's name
        _FILE_TASKS.pop(_key(_READ[path][1].name), None)
    _FILE_TASKS[_key(task.name)] = task
    _READ[path] = (stamp, task)
    return task


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# ---------------------------------------------------------------------- reading a task file
def load_task_file(path: str | os.PathLike) -> Task:
    """The :class:`Task` a task file defines (not registered; see :func:`register_task_file`).
    Its first data row of every split is read to check the template and labels."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path} does not exist")
    spec = _read_spec(path)
    task = _SpecReader(path, spec).task()
    for split, data_path in task.files.items():
        _check_first_row(task, split, data_path)
    return task


def _read_spec(path: str) -> dict:
    if not path.lower().endswith(TASK_FILE_SUFFIXES):
        raise TaskFileError(path, None, f"a task file ends with {', '.join(TASK_FILE_SUFFIXES)}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskFileError(path, None, f"not valid JSON: {exc}") from None
    else:
        import yaml  # PyYAML, a dependency of transformers

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TaskFileError(path, None, f"not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise TaskFileError(path, None, "expected a mapping of fields (name, kind, ...) at the "
                                        f"top level, got {type(spec).__name__}")
    return spec


class _SpecReader:
    """Checks the fields of one task file, each problem raised as a :class:`TaskFileError`."""

    def __init__(self, path: str, spec: Mapping[str, Any]):
        self.path, self.spec = path, spec

    def fail(self, field: str | None, problem: str):
        raise TaskFileError(self.path, field, problem)

    def text(self, field: str, default: str | None = None) -> str:
        value = self.spec.get(field, default)
        if value is None:
            self.fail(field, "missing (required)")
        if not isinstance(value, str):
            self.fail(field, f"expected text, got {type(value).__name__} {value!r}")
        return value

    def words(self, field: str, minimum: int) -> list[str]:
        value = self.spec.get(field)
        if value is None:
            self.fail(field, "missing (required)")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(field, f"expected a list of non-empty texts, got {value!r}")
        if len(value) < minimum:
            self.fail(field, f"needs at least {minimum} entries, got {len(value)}")
        if len(set(value)) != len(value):
            self.fail(field, f"entries must be distinct, got {value!r}")
        return value

    def template(self, default: str | None = None) -> str:
        template = self.text("template", default)
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            self.fail("template", f"not a valid format string ({exc}); write a literal brace "
                                  "as {{ or }}")
        if not names or not all(n.isidentifier() for n in names):
            self.fail("template", f"needs {{column}} placeholders naming data columns, got "
                                  f"{template!r}")
        return template

    def task(self) -> Task:
        name = self.text("name")
        if not _NAME.match(name):
            self.fail("name", f"{name!r}: use letters, digits, '_' and '-', starting with a letter")
        if builtin_task(name) is not None:
            self.fail("name", f"{name!r} is a built-in task's name; choose another")
        kind = self.text("kind")
        if kind not in _FIELDS:
            self.fail("kind", f"{kind!r}: expected {CLASSIFICATION!r} or {MULTIPLE_CHOICE!r}")
        unknown = sorted(set(self.spec) - set(_FIELDS[kind]))
        if unknown:
            self.fail(unknown[0], f"unknown field for a {kind} task (known: "
                                  f"{', '.join(_FIELDS[kind])})")
        files, calib_split, eval_split = self.data()
        common = dict(files=files, calib_split=calib_split, eval_split=eval_split,
                      source_path=self.path, description=self.text("description", ""))
        instruction = self.text("instruction")
        label_field = self.text("label_field", "label")
        if kind == CLASSIFICATION:
            template = self.template()
            label_words = self.words("label_words", 2)
            names = self.words("label_names", 2) if "label_names" in self.spec else \
                [w.strip() for w in label_words]
            if len(names) != len(label_words):
                self.fail("label_names", f"{len(names)} names for {len(label_words)} label words")
            convert = _classification_converter(template, label_field, names)
            return Task(name, kind, instruction, convert, template=template,
                        label_words=label_words, **common)
        template = self.template("{question}")
        choices = self.spec.get("choices", "choices")
        if isinstance(choices, list):
            choices = self.words("choices", 2)
            if len(choices) > len(LETTERS):
                self.fail("choices", f"at most {len(LETTERS)} options")
        elif not isinstance(choices, str):
            self.fail("choices", f"expected a column name or a list of column names, got "
                                 f"{choices!r}")
        option_format = self.text("option_format", "{letter}. {choice}")
        try:
            option_format.format(letter="A", choice="x")
        except (KeyError, IndexError, ValueError) as exc:
            self.fail("option_format", f"only {{letter}} and {{choice}} may be used ({exc!r})")
        if "{letter}" not in option_format or "{choice}" not in option_format:
            self.fail("option_format", f"needs both {{letter}} and {{choice}}, got "
                                       f"{option_format!r}")
        convert = _multiple_choice_converter(template, choices, label_field)
        return Task(name, kind, instruction, convert, option_format=option_format, **common)

    def data(self) -> tuple[dict[str, str], str, str]:
        """``({split: absolute path}, calib_split, eval_split)``."""
        value = self.spec.get("data")
        if value is None:
            self.fail("data", "missing (required): a data file or {split: data file}")
        if isinstance(value, str):
            for field in ("calib_split", "eval_split"):
                if field in self.spec:
                    self.fail(field, "only with data given as {split: data file}")
            return {SINGLE_SPLIT: self.data_path("data", value)}, SINGLE_SPLIT, SINGLE_SPLIT
        if not isinstance(value, dict) or not value:
            self.fail("data", f"expected a file path or {{split: file path}}, got {value!r}")
        files = {}
        for split, rel in value.items():
            if not isinstance(split, str) or not isinstance(rel, str):
                self.fail("data", f"expected {{split: file path}} texts, got {split!r}: {rel!r}")
            files[split] = self.data_path(f"data.{split}", rel)
        only = next(iter(files)) if len(files) == 1 else None
        calib = self.split_name("calib_split", files, only or "train")
        evals = only or ("validation" if "validation" in files else "test")
        return files, calib, self.split_name("eval_split", files, evals)

    def split_name(self, field: str, files: Mapping[str, str], default: str) -> str:
        split = self.text(field, default)
        if split not in files:
            given = "" if field in self.spec else f" (default {default!r}; set {field})"
            self.fail(field, f"no data split {split!r}{given}; data has {', '.join(files)}")
        return split

    def data_path(self, field: str, rel: str) -> str:
        path = os.path.join(os.path.dirname(self.path), os.path.expanduser(rel))
        if not rel.lower().endswith(DATA_SUFFIXES):
            self.fail(field, f"{rel!r}: data files end with {', '.join(DATA_SUFFIXES)}")
        if not os.path.isfile(path):
            self.fail(field, f"data file {path} does not exist")
        return os.path.normpath(path)


# ---------------------------------------------------------------------- rows -> fields, gold
def _columns(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _need(row: Mapping[str, Any], column: str, field: str):
    if column not in row:
        raise RowError(field, f"the data has no column {column!r} (columns: {', '.join(row)})")
    return row[column]


def _classification_converter(template: str, label_field: str, names: list[str]):
    columns = _columns(template)

    def convert(row: Mapping[str, Any]) -> tuple[dict, int]:
        fields = {c: _need(row, c, "template") for c in columns}
        label = _need(row, label_field, "label_field")
        try:
            return fields, label_index(label, names)
        except ValueError:
            raise RowError("label_names", f"label {label!r} is neither a class index nor one "
                                          f"of {names}") from None
    return convert


def _multiple_choice_converter(template: str, choices: str | list[str], label_field: str):
    columns = _columns(template)

    def convert(row: Mapping[str, Any]) -> tuple[dict, int]:
        question = template.format(**{c: _need(row, c, "template") for c in columns})
        if isinstance(choices, str):
            try:
                options = choices_list(_need(row, choices, "choices"))
            except (TypeError, ValueError):
                raise RowError("choices", f"column {choices!r} is not a list of options") from None
        else:
            options = [str(_need(row, c, "choices")) for c in choices]
        label = _need(row, label_field, "label_field")
        try:
            return {"question": question, "choices": options}, \
                gold_from_key(label, (), len(options))
        except ValueError:
            raise RowError("label_field", f"label {label!r} is neither an option index nor a "
                                          f"letter {LETTERS[:len(options)]}") from None
    return convert


def _check_first_row(task: Task, split: str, data_path: str) -> None:
    field = "data" if split == SINGLE_SPLIT else f"data.{split}"
    try:
        rows = read_rows(data_path)
    except (OSError, ValueError, csv.Error) as exc:
        raise TaskFileError(task.source_path, field, f"cannot read {data_path}: {exc}") from None
    if not rows:
        raise TaskFileError(task.source_path, field, f"{data_path} has no rows")
    try:
        task.example_from_row(rows[0], id=f"{task.name}/check", split=split)
    except RowError as exc:
        raise TaskFileError(task.source_path, exc.field,
                            f"row 0 of {data_path}: {exc.problem}") from None
    except ValueError as exc:
        raise TaskFileError(task.source_path, "label_field", f"row 0 of {data_path}: {exc}") \
            from None

