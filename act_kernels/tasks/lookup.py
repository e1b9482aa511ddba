"""Finding a task by name: a built-in task, a registered file task, or a task file's path."""
from __future__ import annotations

from .registry import TASKS, builtin_task
from .task import Task
from .taskfile import file_task, is_task_file_path, register_task_file


def get_task(name: str | Task) -> Task:
    """The task called ``name``: a built-in task (canonical names and aliases, case-insensitive,
    ``-`` = ``_``), a task file path (``.yaml``/``.yml``/``.json``, read and registered under its
    name by :func:`act_kernels.tasks.register_task_file`), or the name of a registered file task.
    """
    if isinstance(name, Task):
        return name
    text = str(name).strip()
    if is_task_file_path(text):
        return register_task_file(text)
    task = builtin_task(text) or file_task(text)
    if task is None:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}, or a task "
                       "file (.yaml/.yml/.json)")
    return task
