"""The pictures of ``act inspect``; the only module of the package that imports matplotlib.

Every ``plot_*`` function returns a Matplotlib ``Figure`` that belongs to no pyplot state (no
GUI backend is touched, nothing to close); :func:`save_figure` writes one and describes it.
matplotlib is imported when a picture is drawn, so collecting the numbers does not need it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .collect import SinkReport, layer_head_mask
from .head_deltas import HeadDeltas
from .maps import AttentionWindow, drawn_columns


def _new_figure(width: float, height: float):
    """A Figure outside pyplot (``savefig`` renders with Agg)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("act inspect draws with matplotlib: pip install matplotlib "
                          "(or act-kernels[plot])") from exc
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: Path, panels: int, dpi: int) -> dict:
    """Write ``fig`` as a PNG; returns its record: path, number of matplotlib axes (panels and
    colour bars), panels, size in pixels."""
    fig.savefig(path, dpi=dpi)
    width, height = fig.get_size_inches() * dpi
    return {"png": str(path), "axes": len(fig.axes), "panels": panels,
            "size_px": [int(round(width)), int(round(height))]}


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _mark_cells(ax, mask: np.ndarray, color: str, lw: float = 1.8) -> None:
    from matplotlib.patches import Rectangle

    for y, x in zip(*np.nonzero(mask)):
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor=color,
                               linewidth=lw))


# ---------------------------------------------------------------------------------------------
# Layers x heads heat maps (sink grid, head deltas)
# ---------------------------------------------------------------------------------------------

def _grid_height(num_layers: int) -> float:
    return min(14.0, max(3.2, 0.26 * num_layers + 1.8))


def _layer_ticks(ax, layers: Sequence[int]) -> None:
    step = max(1, int(math.ceil(len(layers) / 30)))
    idx = list(range(0, len(layers), step))
    ax.set_yticks(idx)
    ax.set_yticklabels([str(layers[i]) for i in idx], fontsize=7)


def _dress_layer_head_panel(fig, ax, image, title: str, layers: Sequence[int], num_heads: int,
                            bar_label: str, marked: np.ndarray, frame_color: str) -> None:
    """Title, axis labels and ticks, colour bar and framed ``marked`` cells of one heat map."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads))
    ax.set_xticklabels([str(h) for h in range(num_heads)], fontsize=7)
    _layer_ticks(ax, layers)
    cb = fig.colorbar(image, ax=ax, shrink=0.9)
    cb.set_label(bar_label, fontsize=8)
    if marked.any():
        _mark_cells(ax, marked, frame_color)


def plot_sink_grid(report: SinkReport):
    """Layers x heads: number of sinks beyond the first token, and the mean attention mass they
    take; the profile's heads framed. Returns the Figure (2 panels + 2 colour bars)."""
    count = report.sink_count()
    mass = report.mean_sink_mass()
    n_l, n_h = count.shape
    width = min(16.0, max(7.0, 2 * (0.42 * n_h + 1.6)))
    fig = _new_figure(width, _grid_height(n_l))
    axes = fig.subplots(1, 2)
    marked = report.profile_mask()
    panels = [
        (axes[0], count, _cmap("viridis"), "sinks beyond the first token",
         f"number of sinks (score > tau={report.tau:g})"),
        (axes[1], mass, _cmap("magma"), "mean attention mass on those sinks",
         "mean over rows of m_i"),
    ]
    for ax, data, cmap, title, cbar_label in panels:
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest",
                       vmin=0, vmax=max(float(np.max(data)), 1e-9) if data.size else 1)
        _dress_layer_head_panel(fig, ax, im, title, report.layers, n_h, cbar_label, marked,
                                "#00e5ff")
    if n_l * n_h <= 400:
        top = max(1, int(count.max()))
        for (y, x), v in np.ndenumerate(count):
            if v:
                axes[0].text(x, y, str(int(v)), ha="center", va="center", fontsize=6,
                             color="white" if v < 0.6 * top else "black")
    title = f"Attention sinks per head ({report.num_tokens} tokens"
    if report.model_name:
        title += f", {Path(str(report.model_name)).name}"
    title += ")"
    if marked.any():
        title += ("\nframed: heads the profile calibrates"
                  + (" (run calibrated)" if report.profile_applied else " (run uncalibrated)"))
    fig.suptitle(title, fontsize=11)
    return fig


def plot_head_deltas(deltas: HeadDeltas, profile_heads: Optional[Dict[int, List[int]]] = None):
    """Layers x heads heat map of each delta column of ``heads.csv`` (blue = better than the
    uncalibrated model), profile heads framed. Returns the Figure (one panel per column plus
    a colour bar each)."""
    from matplotlib.colors import TwoSlopeNorm

    cols = deltas.columns
    n_l, n_h = next(iter(deltas.values.values())).shape
    width = min(22.0, max(6.0, len(cols) * (0.42 * n_h + 1.8)))
    fig = _new_figure(width, _grid_height(n_l))
    axes = fig.subplots(1, len(cols), squeeze=False)
    marked = layer_head_mask(profile_heads or {}, deltas.layers, n_h)
    for ax, col in zip(axes[0], cols):
        data = deltas.values[col]
        finite = data[np.isfinite(data)]
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        is_delta = col.lower().startswith(("d_", "delta"))
        cmap = _cmap("RdBu" if is_delta else "viridis").with_extremes(bad="#dddddd")
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim) if is_delta else None
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm,
                       interpolation="nearest")
        _dress_layer_head_panel(fig, ax, im, col, deltas.layers, n_h,
                                "change vs uncalibrated" if is_delta else "value", marked,
                                "black")
        if deltas.kept.any():
            ys, xs = np.nonzero(deltas.kept)
            ax.scatter(xs, ys, marker="*", s=70, color="gold", edgecolors="black",
                       linewidths=0.4, zorder=4)
    note = "rows: the layers in the csv; grey: not searched"
    if marked.any():
        note += "; framed: profile heads"
    if deltas.kept.any():
        note += "; star: kept by the search"
    fig.suptitle(f"Calibrating one head alone: per-head score deltas ({Path(deltas.path).name})"
                 f"\n{note}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Attention maps of one head, before / after
# ---------------------------------------------------------------------------------------------

def _color_ticks(ticks, positions, sinks: set, first_token_blue: bool) -> None:
    """Sink positions in bold red; the first token in blue where asked."""
    for tick, pos in zip(ticks, positions):
        if pos in sinks:
            tick.set_color("red")
            tick.set_fontweight("bold")
        elif first_token_blue and pos == 0:
            tick.set_color("blue")


def _log_floor(before: np.ndarray, after: np.ndarray) -> float:
    """The decade of the smallest drawn probability, clipped to ``1e-6 .. 1e-2``."""
    drawn = np.concatenate([before[np.isfinite(before)], after[np.isfinite(after)]])
    drawn = drawn[drawn > 0]
    low = float(drawn.min()) if drawn.size else 1e-4
    return float(np.clip(10.0 ** math.floor(math.log10(max(low, 1e-6))), 1e-6, 1e-2))


def _window_title(win: AttentionWindow, report: SinkReport, cols: List[int]) -> str:
    labels = report.labels
    sink_set = set(win.sinks)
    in_window = [c for c in cols if c in sink_set]
    outside = [j for j in win.sinks if j not in set(cols)]
    named = ", ".join(f"'{labels[j]}'@{j}" for j in in_window[:8]) or "none"
    if len(in_window) > 8:
        named += f" and {len(in_window) - 8} more"
    if outside:
        named += f" (+{len(outside)} outside the drawn keys)"
    r0, r1 = win.rows
    m = float(report.sink_mass[report.layer_index(win.layer), win.head].mean())
    in_profile = win.head in report.profile_heads.get(win.layer, [])
    return (f"layer {win.layer}, head {win.head}: rows {r0}..{r1 - 1} of {report.num_tokens}; "
            f"sinks beyond the first token (red): {named}\n"
            f"mean sink mass over the whole input {m:.3f}; tau={report.tau:g}; the first token "
            f"(blue) is never calibrated"
            + ("; the profile calibrates this head" if in_profile else ""))


def plot_attention_window(win: AttentionWindow, report: SinkReport,
                          vmin: Optional[float] = None):
    """Before / after attention maps of one head for the window rows, log colour scale (from
    ``vmin``, default: the decade of the smallest drawn probability, at least 1e-6, to 1), sink
    columns marked (red triangles and labels), the first token in blue. Returns the Figure
    (2 panels + 1 colour bar)."""
    from matplotlib.colors import LogNorm
    from matplotlib.transforms import blended_transform_factory

    r0, r1 = win.rows
    cols = drawn_columns(win.rows)
    labels = report.labels
    rows_idx = np.arange(r0, r1)
    future = np.asarray(cols)[None, :] > rows_idx[:, None]
    before = np.where(future, np.nan, win.before[:, cols])
    after = np.where(future, np.nan, win.after[:, cols])
    if vmin is None:
        vmin = _log_floor(before, after)
    size_w = len(cols)
    ticks = max(size_w, r1 - r0)
    side = float(np.clip(0.15 * ticks + 2.5, 4.2, 11.0))
    fig = _new_figure(2 * side + 1.2, side + 0.9)
    axes = fig.subplots(1, 2)
    base_cmap = _cmap("viridis")
    cmap = base_cmap.with_extremes(bad="#eeeeee", under=base_cmap(0.0))
    norm = LogNorm(vmin=vmin, vmax=1.0, clip=False)
    sink_set = set(win.sinks)
    titles = ("before: plain attention P",
              f"after: ACT on this head (beta={win.beta:g}),\nsinks from the whole input")
    font = float(np.clip(0.7 * 72.0 * 0.75 * side / ticks, 4.0, 10.0))  # ~70% of a tick step
    im = None
    for ax, data, title in zip(axes, (before, after), titles):
        im = ax.imshow(np.maximum(data, vmin * 0.5), cmap=cmap, norm=norm, aspect="auto",
                       interpolation="nearest")
        ax.set_title(title, fontsize=10, pad=14)
        ax.set_xlabel("key (attended token)")
        ax.set_ylabel("query (row)")
        ax.set_xticks(range(size_w))
        ax.set_xticklabels([labels[c] for c in cols], rotation=90, fontsize=font)
        ax.set_yticks(range(r1 - r0))
        ax.set_yticklabels([labels[r] for r in rows_idx], fontsize=font)
        _color_ticks(ax.get_xticklabels(), cols, sink_set, first_token_blue=True)
        _color_ticks(ax.get_yticklabels(), rows_idx, sink_set, first_token_blue=False)
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        sink_x = [i for i, c in enumerate(cols) if c in sink_set]
        if sink_x:
            ax.scatter(sink_x, [1.012] * len(sink_x), marker="v", color="red", s=22,
                       transform=trans, clip_on=False, zorder=5)
        if r0 > 0:
            ax.axvline(0.5, color="white", linewidth=1.5)
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85, extend="min")
    cb.set_label("attention probability (log scale)")
    fig.suptitle(_window_title(win, report, cols), fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# Per-token sink frequency
# ---------------------------------------------------------------------------------------------

def _tick_font(count: int) -> float:
    return float(np.clip(260.0 / max(count, 1), 4.0, 10.0))


def plot_token_sinks(report: SinkReport, label_limit: int = 160, annotate: int = 12):
    """Bar chart over the text: in what fraction of the inspected heads each token is a sink.
    Short texts get every token as a tick label; long ones the most frequent sinks annotated.
    Returns the Figure (1 panel)."""
    freq = report.token_sink_frequency()
    n = len(freq)
    labels = report.labels
    width = float(np.clip(0.16 * n + 2.0, 7.0, 22.0))
    fig = _new_figure(width, 4.2)
    ax = fig.subplots()
    colors = np.where(freq > 0, "#d62728", "#9e9e9e")
    ax.bar(np.arange(n), freq, width=0.85 if n <= label_limit else 1.0, color=colors)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, max(0.05, float(freq.max()) * 1.18))
    ax.set_ylabel("fraction of heads where it is a sink")
    n_pairs = len(report.layers) * report.num_heads
    ax.set_title(f"How often each token is an attention sink beyond the first token\n"
                 f"({len(report.layers)} layers x {report.num_heads} heads = {n_pairs} heads, "
                 f"tau={report.tau:g}; the first token is never counted)", fontsize=10)
    if n <= label_limit:
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels, rotation=90, fontsize=_tick_font(n) * 0.9 + 1)
        ax.set_xlabel("token")
        for tick, f in zip(ax.get_xticklabels(), freq):
            if f > 0:
                tick.set_color("#d62728")
    else:
        ax.set_xlabel("token position")
        done: List[int] = []
        for j in np.argsort(-freq, kind="stable"):
            if freq[j] <= 0 or len(done) >= annotate:
                break
            if any(abs(int(j) - d) < max(1, n // 80) for d in done):
                continue            # keep annotations of neighbouring tokens from overlapping
            done.append(int(j))
            ax.annotate(f"{labels[j]}@{j}", (j, freq[j]), textcoords="offset points",
                        xytext=(0, 3), ha="left", fontsize=7, rotation=60)
    ax.grid(axis="y", alpha=0.3)
    return fig
