"""The files of ``act inspect``: the PNGs and ``inspect.json`` (:func:`write_report`), and the
JSON-ready numbers behind them (:func:`report_dict`)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .collect import DEFAULT_TOP, SinkReport
from .draw import (plot_attention_window, plot_head_deltas, plot_sink_grid, plot_token_sinks,
                   save_figure)
from .head_deltas import HeadDeltas, read_head_deltas
from .maps import AttentionWindow, attention_window, drawn_columns

JSON_NAME = "inspect.json"
FORMAT = 1

HeadList = Sequence[Tuple[int, int]]


def _floats(array: np.ndarray) -> list:
    """Nested lists of floats that read back as the same float32 values (shortest form)."""
    a = np.asarray(array, dtype=np.float32)
    return a.astype(str).astype(np.float64).tolist()


def _nan_to_none(array: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in array]


def _map_dict(win: AttentionWindow, labels: Sequence[str]) -> dict:
    cols = drawn_columns(win.rows)
    return {"layer": win.layer, "head": win.head, "rows": list(win.rows), "columns": cols,
            "sinks": [j for j in win.sinks], "sink_labels": [labels[j] for j in win.sinks],
            "before": _floats(win.before[:, cols]), "after": _floats(win.after[:, cols]),
            "sink_mass": _floats(win.sink_mass)}


def _deltas_dict(deltas: HeadDeltas) -> dict:
    return {"csv": deltas.path, "columns": deltas.columns, "layers": deltas.layers,
            "values": {c: _nan_to_none(deltas.values[c]) for c in deltas.columns},
            "kept": deltas.kept.tolist()}


def report_dict(report: SinkReport, windows: Sequence[AttentionWindow] = (),
                deltas: Optional[HeadDeltas] = None) -> dict:
    """Every number behind the pictures, as plain JSON-ready data (no paths)."""
    data = {
        "format": FORMAT,
        "settings": {
            "model": report.model_name, "beta": report.beta, "tau": report.tau,
            "layers": list(report.layers), "num_layers": report.num_layers,
            "num_heads": report.num_heads, "num_tokens": report.num_tokens,
            "window": list(report.window),
            "profile_heads": {str(k): v for k, v in report.profile_heads.items()},
            "profile_applied": report.profile_applied,
        },
        "tokens": list(report.tokens),
        "token_labels": report.labels,
        "token_ids": list(report.token_ids),
        "grid": {
            "sink_count": report.sink_count().astype(int).tolist(),
            "mean_sink_mass": _floats(report.mean_sink_mass()),
            "profile_heads": report.profile_mask().tolist(),
            "calibrated": report.calibrated.tolist(),
        },
        "stats": {
            "layers": list(report.layers),
            "scores": _floats(report.scores),
            "sinks": [[np.flatnonzero(report.sinks[li, h]).tolist()
                       for h in range(report.num_heads)] for li in range(len(report.layers))],
            "sink_mass": _floats(report.sink_mass),
        },
        "token_sinks": {"count": report.token_sink_count().astype(int).tolist(),
                        "frequency": _floats(report.token_sink_frequency())},
        "maps": [_map_dict(win, report.labels) for win in windows],
    }
    if deltas is not None:
        data["head_deltas"] = _deltas_dict(deltas)
    return data


def write_report(report: SinkReport, out_dir: Union[str, os.PathLike],
                 heads_csv: Union[None, str, os.PathLike] = None,
                 map_heads: Optional[HeadList] = None, top: int = DEFAULT_TOP,
                 dpi: int = 110) -> dict:
    """Write the PNGs and ``inspect.json`` into ``out_dir``; returns the JSON's content.

    ``map_heads``: (layer, head) pairs whose attention maps are drawn (default: the ``top``
    strongest among the layers with captured queries/keys). The JSON's ``figures`` entry lists,
    per picture, its path, its number of matplotlib axes (panels and colour bars), its panels
    and its size in pixels.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = list(map_heads) if map_heads is not None else report.strongest_heads(top)
    windows = [attention_window(report, layer, head) for layer, head in heads]
    deltas = None
    if heads_csv is not None:
        deltas = read_head_deltas(heads_csv, report.num_layers, report.num_heads)
    data = report_dict(report, windows, deltas)

    figures = {"grid": save_figure(plot_sink_grid(report), out / "sink_grid.png", 2, dpi),
               "maps": [],
               "token_sinks": save_figure(plot_token_sinks(report), out / "token_sinks.png",
                                          1, dpi)}
    for win, record in zip(windows, data["maps"]):
        path = out / f"map_L{win.layer:02d}_H{win.head}.png"
        fig_rec = save_figure(plot_attention_window(win, report), path, 2, dpi)
        record["png"] = fig_rec["png"]
        figures["maps"].append(fig_rec)
    if deltas is not None:
        figures["head_deltas"] = save_figure(
            plot_head_deltas(deltas, report.profile_heads), out / "head_deltas.png",
            len(deltas.columns), dpi)
    data["figures"] = figures
    with open(out / JSON_NAME, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return data
