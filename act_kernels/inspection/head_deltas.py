"""Reading the per-head columns of a head search's ``heads.csv`` (:func:`read_head_deltas`)."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import numpy as np


@dataclass
class HeadDeltas:
    """Per-head columns of a search's ``heads.csv``: ``values[column]`` is
    ``[len(layers), heads]`` for the layers from the first to the last one in the csv (NaN where
    it has no row); ``kept`` marks rows whose status says the head was kept."""

    path: str
    columns: List[str]
    layers: List[int]
    values: Dict[str, np.ndarray]
    kept: np.ndarray


def _as_number(text) -> float:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return math.nan
    return value


def read_head_deltas(path: Union[str, os.PathLike], num_layers: Optional[int] = None,
                     num_heads: Optional[int] = None, max_columns: int = 3) -> HeadDeltas:
    """Read ``heads.csv`` by column name: ``layer``, ``head``, and the delta columns (names
    starting with ``d_`` or ``delta``, e.g. ``d_acc``, ``d_bal_acc``, ``d_margin``); without
    any, the numeric score columns (``acc``, ``score``, ...). Unknown columns are ignored."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = {(name or "").strip().lower(): name for name in (reader.fieldnames or [])}
        rows = list(reader)
    layer_col = next((names[k] for k in ("layer", "layer_idx", "layer_index") if k in names),
                     None)
    head_col = next((names[k] for k in ("head", "head_idx", "head_index") if k in names), None)
    if layer_col is None or head_col is None:
        raise ValueError(f"{path}: heads.csv needs 'layer' and 'head' columns, has "
                         f"{list(names.values())}")
    cells = []
    for row in rows:
        layer, head = _as_number(row.get(layer_col)), _as_number(row.get(head_col))
        if math.isfinite(layer) and math.isfinite(head) and layer >= 0 and head >= 0:
            cells.append((int(layer), int(head), row))
    if not cells:
        raise ValueError(f"{path}: no (layer, head) rows")

    def numeric(col):
        return any(math.isfinite(_as_number(r.get(col))) for _, _, r in cells)

    lowered = [k for k in names if k not in ("layer", "head")]
    chosen = [k for k in lowered if (k.startswith("d_") or k.startswith("delta"))
              and numeric(names[k])]
    if not chosen:
        chosen = [k for k in lowered if any(w in k for w in ("acc", "score", "margin"))
                  and numeric(names[k])]
    if not chosen:
        raise ValueError(f"{path}: no delta or score column among {list(names.values())}")
    chosen = chosen[:max_columns]
    first, last = min(c[0] for c in cells), max(c[0] for c in cells)
    if num_layers is not None and last >= num_layers:
        raise ValueError(f"{path}: layer {last} is out of range: the model has {num_layers} layers")
    n_heads = max(num_heads or 0, 1 + max(c[1] for c in cells))
    layers = list(range(first, last + 1))
    values = {names[k]: np.full((len(layers), n_heads), np.nan) for k in chosen}
    kept = np.zeros((len(layers), n_heads), dtype=bool)
    status_col = names.get("status")
    for layer, head, row in cells:
        for k in chosen:
            values[names[k]][layer - first, head] = _as_number(row.get(names[k]))
        if status_col is not None and "kept" in str(row.get(status_col, "")).lower():
            kept[layer - first, head] = True
    return HeadDeltas(path=str(path), columns=[names[k] for k in chosen], layers=layers,
                      values=values, kept=kept)
