"""Collecting the op's sink statistics of a model on one text (:func:`collect_sinks`).

The model runs once under :func:`act_kernels.hf.recording`; every number kept here is the op's
own :class:`~act_kernels.op.ACTStats`, copied per layer into ``[layers, heads, tokens]`` arrays.
For the layers whose attention maps may be drawn, the post-RoPE queries of the window rows and
the keys they see are kept as well (:mod:`.maps` turns them into maps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..hf import get_profile, recording, using_profile
from ..modelinfo import model_device, num_layers as model_num_layers, num_query_heads, text_config
from ..params import default_scale, head_mask
from ..profiles import ACTProfile, as_profile

DEFAULT_WINDOW = 64
"""Rows (and keys) of the attention maps when no window is given."""
DEFAULT_TOP = 4
"""Heads drawn when none are chosen: the strongest by mean sink mass."""


def ranges_text(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (``"none"`` when empty), for messages."""
    values = sorted(values)
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts) or "none"


def token_label(token: str) -> str:
    """A readable label for a decoded token: control characters escaped, blanks visible."""
    text = (token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t"))
    if text == "":
        return "∅"
    if text.strip() == "":
        return "␣" * min(len(text), 3)
    return text


def layer_head_mask(heads_by_layer: Mapping[int, Sequence[int]], layers: Sequence[int],
                    num_heads: int) -> np.ndarray:
    """``[len(layers), num_heads]`` bool: the heads of ``heads_by_layer`` (``{layer: [head,
    ...]}``, e.g. a profile's) on the rows of ``layers``; layers not in ``layers`` and heads
    outside ``0 .. num_heads - 1`` are left out (a ``heads.csv`` may cover a layer range only)."""
    layers = list(layers)
    mask = np.zeros((len(layers), num_heads), dtype=bool)
    for layer, heads in heads_by_layer.items():
        if layer in layers:
            inside = [h for h in heads if 0 <= h < num_heads]
            mask[layers.index(layer)] = head_mask(inside, num_heads, who="act inspect").numpy()
    return mask


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

@dataclass
class Capture:
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
    captures: Dict[int, Capture] = field(default_factory=dict, repr=False)

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
                             f"{ranges_text(self.layers)})") from None

    def profile_mask(self) -> np.ndarray:
        """``[L, H]`` bool: heads the profile calibrates (whether or not it ran calibrated)."""
        return layer_head_mask(self.profile_heads, self.layers, self.num_heads)

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


class _StatsRecorder:
    """The ``recording`` callback: copies each inspected layer's statistics into ``[L, H, N]``
    arrays and keeps the window queries / keys of the layers in ``capture``."""

    def __init__(self, layers: List[int], num_heads: int, n: int, window: Tuple[int, int],
                 capture: set):
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.n, self.window, self.capture = n, window, capture
        self.scores = np.zeros((len(layers), num_heads, n), dtype=np.float32)
        self.sinks = np.zeros((len(layers), num_heads, n), dtype=bool)
        self.sink_mass = np.zeros((len(layers), num_heads, n), dtype=np.float32)
        self.calibrated = np.zeros((len(layers), num_heads), dtype=bool)
        self.seen: set = set()
        self.captures: Dict[int, Capture] = {}

    def __call__(self, module, stats, query, key, value, key_padding_mask) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None or int(layer) not in self.position:
            return
        layer, n = int(layer), self.n
        if query.shape[0] != 1 or query.shape[2] != n or key.shape[2] != n:
            raise RuntimeError(f"act inspect: unexpected attention call of layer {layer}: "
                               f"q {tuple(query.shape)}, k {tuple(key.shape)} for {n} tokens")
        li = self.position[layer]
        self.scores[li] = stats.scores[0].detach().float().cpu().numpy()
        self.sinks[li] = stats.sinks[0].detach().cpu().numpy()
        self.sink_mass[li] = stats.sink_mass[0].detach().float().cpu().numpy()
        self.calibrated[li] = stats.calibrated[0].detach().cpu().numpy()
        self.seen.add(layer)
        if layer in self.capture:
            r0, r1 = self.window
            scale = getattr(module, "scaling", None)
            self.captures[layer] = Capture(
                q=query[0, :, r0:r1].detach().float().cpu().clone(),
                k=key[0, :, :r1].detach().float().cpu().clone(),
                scale=float(scale) if scale is not None else default_scale(query.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------

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


def _selected_layers(layers: Optional[Iterable[int]], num_layers: int) -> List[int]:
    wanted = list(range(num_layers)) if layers is None else sorted({int(x) for x in layers})
    for layer in wanted:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {num_layers} layers")
    if not wanted:
        raise ValueError("collect_sinks: no layer selected")
    return wanted


def _token_ids(tokenizer, text, input_ids, add_special_tokens: bool,
               max_tokens: Optional[int]) -> Tuple[torch.Tensor, List[str]]:
    """The token ids to run (1-D) and their decoded tokens (the ids as text without a
    tokenizer)."""
    if input_ids is None:
        if text is None or tokenizer is None:
            raise ValueError("collect_sinks: give a text and a tokenizer, or input_ids")
        input_ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None and ids.numel() > max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise ValueError("collect_sinks: the text has no tokens")
    if tokenizer is not None:
        tokens = [tokenizer.decode([int(i)]) for i in ids.tolist()]
    else:
        tokens = [str(int(i)) for i in ids.tolist()]
    return ids, tokens


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
        profile: an :class:`~act_kernels.profiles.ACTProfile`, its dict or JSON path; ``None``
            takes the profile attached to the model, if any. Its heads are marked in the
            pictures and, with ``run_calibrated=True``, calibrated during the run (the model as
            it runs at inference: later layers see the calibrated outputs).
        layers: layers to inspect (default all).
        beta, tau: override the profile's (without a profile, the defaults of
            :mod:`act_kernels.params`); ``tau`` is the op's sink threshold, ``beta`` the share of
            sink attention calibration keeps.
        window: rows of the attention maps: ``None`` (the first 64 positions), a size
            (the first ``size`` positions) or ``(start, stop)``.
        capture_layers: layers whose window queries/keys are kept for maps (default: all
            inspected layers; memory ``layers x heads x window x head_dim``, plus the keys the
            window rows see).
        run_calibrated: run with the profile's heads calibrated (``False``: plain attention
            everywhere, the profile only marks heads).
        max_tokens: keep only the first ``max_tokens`` tokens.
    """
    num_layers, num_heads = model_num_layers(model), num_query_heads(model)
    ids, tokens = _token_ids(tokenizer, text, input_ids, add_special_tokens, max_tokens)
    n = int(ids.numel())

    base = as_profile(profile) if profile is not None else (get_profile(model) or ACTProfile())
    base.validate(num_layers=num_layers, num_heads=num_heads)
    beta = base.beta if beta is None else float(beta)
    tau = base.tau if tau is None else float(tau)
    run_profile = ACTProfile(heads=base.heads if run_calibrated else {}, beta=beta, tau=tau)

    wanted = _selected_layers(layers, num_layers)
    capture = set(wanted) if capture_layers is None else {int(x) for x in capture_layers}
    rec = _StatsRecorder(wanted, num_heads, n, _resolve_window(window, n), capture)
    with using_profile(model, run_profile), recording(model, rec, layers=wanted), \
            torch.no_grad():
        _forward_hidden(model, ids[None, :].to(model_device(model)))
    missing = [layer for layer in wanted if layer not in rec.seen]
    if missing:
        raise RuntimeError(f"act inspect: no ACT attention call was recorded for layers "
                           f"{ranges_text(missing)}; does this model route attention through "
                           "Transformers' AttentionInterface?")
    config = text_config(model)
    return SinkReport(
        tokens=tokens, token_ids=[int(i) for i in ids.tolist()], layers=wanted,
        num_layers=num_layers, num_heads=num_heads, scores=rec.scores, sinks=rec.sinks,
        sink_mass=rec.sink_mass, calibrated=rec.calibrated, beta=beta, tau=tau,
        window=rec.window, profile_heads={int(k): list(v) for k, v in base.heads.items()},
        profile_applied=bool(run_calibrated and base.heads),
        model_name=getattr(config, "_name_or_path", None) or getattr(
            model.config, "_name_or_path", None) or None,
        captures=rec.captures)
