"""``act inspect``: where the attention sinks of a model are, on a text, before and after ACT.

The paper starts from attention maps: beyond the first token, some keys (``"."``, ``"\\n"``, ...)
receive a large share of the attention of many rows without carrying meaning. This package runs a
model once on a text under :func:`act_kernels.hf.recording` and keeps the op's own statistics
(:class:`~act_kernels.op.ACTStats`: per-key scores, sinks, per-row sink mass, for every head of
every layer), so no number here comes from a second implementation of sink detection.

Python API (notebooks)::

    from act_kernels.inspection import collect_sinks, attention_window, write_report
    report = collect_sinks(model, tokenizer, "The cat sat on the mat.\\nIt was happy.")
    report.sink_count()           # [layers, heads]: sinks beyond the first token
    report.mean_sink_mass()       # [layers, heads]: mean attention mass those sinks take
    report.token_sink_frequency() # [tokens]: fraction of heads in which each token is a sink
    win = attention_window(report, layer=5, head=3)   # win.before / win.after: rows x keys
    write_report(report, "pictures", heads_csv="runs/s1/heads.csv")

Memory: the statistics cover the whole input (O(layers x heads x tokens)); the attention maps
are computed only for a window of rows (``window``, default the first 64 positions), from the
post-RoPE queries of those rows and the keys they see, so a 4k-token input never allocates an
``N x N`` map.

Files written by :func:`write_report` (``act inspect --out DIR``): ``sink_grid.png``,
``map_L{layer}_H{head}.png`` per chosen head, ``token_sinks.png``, ``head_deltas.png`` (with a
search's ``heads.csv``) and ``inspect.json`` (every number behind the pictures, the settings and
the PNG paths).

Modules, one concern each:

- :mod:`.collect`: :func:`collect_sinks` and its :class:`SinkReport` (the numbers);
- :mod:`.maps`: :func:`attention_window`, before / after maps of one head for a window of rows;
- :mod:`.head_deltas`: :func:`read_head_deltas`, the per-head columns of a search's
  ``heads.csv``;
- :mod:`.draw`: the ``plot_*`` pictures (the only module that imports matplotlib);
- :mod:`.report`: :func:`write_report` (PNGs + ``inspect.json``) and :func:`report_dict`;
- :mod:`.cli`: the ``act inspect`` command.
"""
from .cli import parse_heads, parse_layers
from .collect import DEFAULT_TOP, DEFAULT_WINDOW, SinkReport, collect_sinks, token_label
from .draw import plot_attention_window, plot_head_deltas, plot_sink_grid, plot_token_sinks
from .head_deltas import HeadDeltas, read_head_deltas
from .maps import AttentionWindow, attention_window, drawn_columns, window_probs
from .report import FORMAT, JSON_NAME, HeadList, report_dict, write_report

__all__ = ["AttentionWindow", "DEFAULT_TOP", "DEFAULT_WINDOW", "FORMAT", "HeadDeltas",
           "HeadList", "JSON_NAME", "SinkReport", "attention_window", "collect_sinks",
           "drawn_columns", "parse_heads", "parse_layers", "plot_attention_window",
           "plot_head_deltas", "plot_sink_grid", "plot_token_sinks", "read_head_deltas",
           "report_dict", "token_label", "window_probs", "write_report"]
