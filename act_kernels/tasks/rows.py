"""Reading task data rows: local JSONL/JSON/CSV/TSV files, and the label and option fields
every task's converter reads (class index, option list, answer key)."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Mapping, Sequence

from .task import LETTERS


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a local JSON Lines / JSON list / CSV / TSV file (formats: :mod:`.data`)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith((".csv", ".tsv")):
        delim = "\t" if path.lower().endswith(".tsv") else ","
        rows = [dict(r) for r in csv.DictReader(io.StringIO(text), delimiter=delim)]
        for r in rows:
            c = r.get("choices")
            if isinstance(c, str) and c.strip().startswith("["):
                r["choices"] = json.loads(c)
        return rows
    stripped = text.lstrip()
    if stripped.startswith("["):
        return [dict(r) for r in json.loads(stripped)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def label_index(value: Any, names: Sequence[str] = ()) -> int:
    """An integer class index from an int, a bool, a digit string, a letter or a label name."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    s = str(value).strip()
    if s.lstrip("-").isdigit():
        return int(s)
    low = [str(n).strip().lower() for n in names]
    if s.lower() in low:
        return low.index(s.lower())
    if s.lower() in ("true", "false"):
        return int(s.lower() == "true")
    raise ValueError(f"cannot read label {value!r} (expected an index or one of {list(names)})")


def choices_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, Mapping):  # Hugging Face {"text": [...], "label": [...]}
        value = value["text"]
    return [str(v) for v in value]


def gold_from_key(key: Any, labels: Sequence[str], n: int) -> int:
    """Gold index from an answer key: a letter, a choice label (ARC's "1".."5") or an index."""
    k = str(key).strip()
    if labels and k in [str(x) for x in labels]:
        return [str(x) for x in labels].index(k)
    if k in LETTERS[:n]:
        return LETTERS.index(k)
    return label_index(k)
