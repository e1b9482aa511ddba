"""Optional dependencies (the extras of ``setup.py``) in tests: skipped where one is missing,
except under ``CI=true``, where CI installs every extra and a missing one must fail."""
from __future__ import annotations

import importlib
import os

import pytest


def import_optional(name: str, extra: str):
    """Import the module ``name`` of the extra ``extra`` or skip the calling test module.

    Only the module itself missing skips: an import error inside it is raised, not hidden."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name.partition(".")[0] or os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{name} is not installed (pip install 'act-kernels[{extra}]')",
                    allow_module_level=True)
