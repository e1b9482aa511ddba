"""Run a decoder-only model layer by layer, so that hidden states can be reused.

The head search calibrates one head at a time. A head of layer ``l`` changes nothing before
layer ``l``, so the hidden states entering layer ``l`` are computed once per sample and every
candidate of layer ``l`` (and later) starts from them. :class:`LayerRunner` exposes exactly
the pieces of the model's own forward that this needs:

* :meth:`LayerRunner.context`: token embeddings, position ids counted over real tokens (left
  padding), and what each decoder layer receives: the attention mask built by Transformers' own
  mask builder for the model's current attention implementation, one per attention window
  (causal for full-attention layers, the sliding-window mask for sliding layers), and the rotary
  embeddings, one pair per layer type where the model's rotary module takes one (Gemma 3's local
  and global bases);
* :meth:`LayerRunner.run_layers`: decoder layers ``start .. stop - 1``, optionally over a suffix
  of the positions only, with the keys and values of the prefix taken from a cache
  (:class:`KVRecorder` records them in a full pass, :class:`RowPrefixKV` serves them);
* :meth:`LayerRunner.last_logits`: final norm and ``lm_head`` on the LAST position only (with
  the model's final logit soft-capping, if it has one).

It supports the Llama-style layout of Transformers (``model.model.embed_tokens / layers / norm
/ rotary_emb`` and ``model.lm_head``: Llama, SmolLM, Mistral, Qwen2/3, OLMo, Gemma 3, ...), with
full-attention and sliding-window layers (``config.layer_types``, or ``config.sliding_window``
for every layer where there are no layer types, as Mistral); :meth:`LayerRunner.check` compares
it with the model's own forward once, so an unsupported architecture fails loudly instead of
giving wrong scores.

Suffix passes keep every row a left-padded sequence: padding in front, then the prefix's
cached keys, then the suffix's own (:func:`pack_suffixes`, :class:`RowPrefixKV`), so that key
slots are positions and a sliding window counts real distances.
"""
from __future__ import annotations

from dataclasses import dataclass
import inspect
from typing import Mapping, Optional, Sequence

import torch

from ..hf import recording
from ..modelinfo import text_config
from ..params import head_mask


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass
class Context:
    """Per-batch inputs shared by every decoder layer (rows may be repeated with :meth:`take`).

    ``masks``: attention window (``None``: full causal attention) -> what the mask builder
    returned for it (``[B, 1, T, T]`` or None); ``rope``: rotary key (a layer type, or None
    when every layer shares one) -> ``(cos, sin)`` ``[B, T, D]``. :class:`LayerRunner` knows
    which window and rotary key each layer takes."""

    masks: dict
    rope: dict
    position_ids: torch.Tensor            # [B, T]
    key_mask: torch.Tensor                # bool [B, K]: real (not padding) keys

    @property
    def batch(self) -> int:
        return self.position_ids.shape[0]

    def take(self, rows: torch.Tensor) -> "Context":
        """The context of batch rows ``rows`` (a long tensor; repeats allowed)."""
        def pick(mask):
            if isinstance(mask, torch.Tensor) and mask.shape[0] != 1:
                return mask.index_select(0, rows)
            return mask
        return Context({w: pick(m) for w, m in self.masks.items()},
                       {k: (c.index_select(0, rows), s.index_select(0, rows))
                        for k, (c, s) in self.rope.items()},
                       self.position_ids.index_select(0, rows), self.key_mask.index_select(0, rows))

    def suffix(self, start: int) -> "Context":
        """The context of the queries at positions ``start ..`` seeing every key ``0 .. T-1``
        (the keys before ``start`` come from a cache)."""
        q_len = self.position_ids.shape[1] - start
        return Context({w: suffix_mask(self.key_mask, q_len, w) for w in self.masks},
                       {k: (c[:, start:], s[:, start:]) for k, (c, s) in self.rope.items()},
                       self.position_ids[:, start:], self.key_mask)


def suffix_mask(key_mask: torch.Tensor, q_len: int, window: Optional[int] = None
                ) -> torch.Tensor:
    """Boolean ``[B, 1, q_len, K]`` mask of the last ``q_len`` of ``K`` positions as queries:
    causal (bottom-right aligned), within ``window`` keys of the query (the query's own
    included, as Transformers' sliding-window mask) when given, and hiding the keys where
    ``key_mask [B, K]`` is False. Key slots must be positions (left padding only)."""
    at = torch.arange(key_mask.shape[1], device=key_mask.device)
    lag = at[key_mask.shape[1] - q_len:, None] - at[None, :]              # [Q, K]
    seen = lag >= 0
    if window is not None:
        seen = seen & (lag < int(window))
    return (seen[None] & key_mask[:, None, :])[:, None]


def pack_suffixes(parts: Sequence[tuple[Context, int, int]], width_q: int) -> Context:
    """The context of a suffix pass whose row ``k`` is positions ``start_k ..`` of batch row
    ``row_k`` of ``ctx_k`` (``parts``: ``(ctx_k, row_k, start_k)``), its queries left-padded to
    ``width_q``. Row ``k``'s keys are packed as a left-padded sequence of ``width_p + width_q``
    slots (``width_p``: the largest start): padding, the ``start_k`` prefix keys, the suffix's
    own keys, as :class:`RowPrefixKV` lays them out (``lengths``: each row's suffix length)."""
    first = parts[0][0]
    n = len(parts)
    width_p = max(start for _, _, start in parts)
    total = width_p + width_q
    device = first.position_ids.device
    rope = {key: (cos.new_zeros(n, width_q, cos.shape[-1]), sin.new_zeros(n, width_q, sin.shape[-1]))
            for key, (cos, sin) in first.rope.items()}
    pos = first.position_ids.new_zeros(n, width_q)
    keys = torch.zeros(n, total, dtype=torch.bool, device=device)
    for k, (c, row, start) in enumerate(parts):
        q = c.position_ids.shape[1] - start
        for key, (cos, sin) in rope.items():
            cos[k, width_q - q:] = c.rope[key][0][row, start:]
            sin[k, width_q - q:] = c.rope[key][1][row, start:]
        pos[k, width_q - q:] = c.position_ids[row, start:]
        keys[k, total - q - start:] = c.key_mask[row]
    return Context({w: suffix_mask(keys, width_q, w) for w in first.masks}, rope, pos, keys)


class KVRecorder:
    """A duck-typed Transformers cache that keeps each layer's (post-RoPE) keys and values of a
    full pass and hands them back unchanged: ``kv[layer] = (key, value)``, ``[B, Hkv, T, D]``."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[int(layer_idx)] = (key_states, value_states)
        return key_states, value_states


class RowPrefixKV:
    """A duck-typed Transformers cache for a suffix pass: each layer's keys and values are a
    recorded prefix followed by the suffix's own, every row packed as a left-padded sequence
    (:func:`pack_suffixes`). Row ``r`` of the pass takes the first ``start_r`` positions of batch
    row ``row_r`` of the recording ``kv_r`` (a :attr:`KVRecorder.kv` dict; rows may come from
    different batches) and the last ``lengths[r]`` of its own keys (its suffix; the pass's
    queries are left-padded to the longest, every row fills them when ``lengths`` is None):
    ``width + Lq`` key slots, zeros in front (which the caller's mask hides), then the prefix,
    then the suffix. Each layer's prefix is gathered when that layer runs."""

    def __init__(self, sources: Sequence[tuple[Mapping, int, int]], width: int,
                 lengths: Optional[Sequence[int]] = None):
        self.sources = sources
        self.width = int(width)
        self.lengths = None if lengths is None else [int(q) for q in lengths]

    def _packed(self, layer: int, which: int, own: torch.Tensor) -> torch.Tensor:
        rows, heads, width_q, dim = own.shape
        total = self.width + width_q
        out = own.new_zeros(rows, heads, total, dim)
        out[:, :, self.width:] = own
        for r, (kv, row, start) in enumerate(self.sources):
            q = width_q if self.lengths is None else self.lengths[r]
            if q < width_q:
                out[r, :, self.width:total - q] = 0
            if start:
                out[r, :, total - q - start:total - q] = kv[layer][which][row, :, :start]
        return out

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = int(layer_idx)
        return self._packed(layer, 0, key_states), self._packed(layer, 1, value_states)


class LayerRunner:
    """Layer-by-layer forward of a Transformers causal LM (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        base = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if base is None or not all(hasattr(base, a) for a in needed):
            raise ValueError(
                f"act search: {type(model).__name__} does not have the Llama-style layout "
                "(model.model.embed_tokens / layers / norm / rotary_emb) the layer-by-layer "
                "search needs")
        self.base = base
        self.layers = base.layers
        self.lm_head = model.get_output_embeddings()
        config = text_config(model)
        self.config = config
        self.num_layers = len(self.layers)
        self.num_heads = int(config.num_attention_heads)
        self.windows = layer_windows(config, self.num_layers)
        self.rope_keys = rope_keys(base.rotary_emb, config, self.num_layers)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    # ------------------------------------------------------------------ pieces
    def context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Context]:
        """``(embeddings [B, T, H], Context)`` of a left-padded batch."""
        from transformers.masking_utils import (create_causal_mask,
                                                create_sliding_window_causal_mask)

        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.base.embed_tokens(input_ids)
        masks = {}
        for window in sorted(set(self.windows), key=lambda w: -1 if w is None else w):
            build = create_causal_mask if window is None else create_sliding_window_causal_mask
            masks[window] = build(config=self.base.config, inputs_embeds=hidden,
                                  attention_mask=attention_mask, past_key_values=None,
                                  position_ids=position_ids)
        rope = {}
        for key in dict.fromkeys(self.rope_keys):
            rope[key] = (self.base.rotary_emb(hidden, position_ids=position_ids) if key is None
                         else self.base.rotary_emb(hidden, position_ids, key))
        return hidden, Context(masks, rope, position_ids, attention_mask.bool())

    def run_layers(self, hidden: torch.Tensor, ctx: Context, start: int, stop: int,
                   cache=None) -> torch.Tensor:
        """Decoder layers ``start .. stop - 1`` applied to ``hidden``.

        ``cache`` is passed to the layers as ``past_key_values``: a :class:`KVRecorder` records
        the keys and values, a :class:`RowPrefixKV` prepends a prefix's (``hidden`` and ``ctx``
        then cover the suffix only: see :meth:`Context.suffix`)."""
        for idx in range(start, stop):
            out = self.layers[idx](hidden, attention_mask=ctx.masks[self.windows[idx]],
                                   position_ids=ctx.position_ids, past_key_values=cache,
                                   use_cache=False,
                                   position_embeddings=ctx.rope[self.rope_keys[idx]])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the last position (float32)."""
        return self.tail_logits(hidden, 1)[:, 0]

    def tail_logits(self, hidden: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the last ``keep`` positions (float32; the log-likelihood
        objective's continuation needs them)."""
        logits = self.lm_head(self.base.norm(hidden[:, -keep:]))
        if self.softcap is not None:       # as the model's own head (Gemma 2 and 3 configs)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def forward_last(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden, ctx = self.context(input_ids, attention_mask, position_ids)
        return self.last_logits(self.run_layers(hidden, ctx, 0, self.num_layers))

    # ------------------------------------------------------------------ self-check
    @torch.no_grad()
    def check(self, input_ids, attention_mask, atol: float = 1e-3) -> None:
        """Compare with ``model(...)`` on one batch; ``ValueError`` when they disagree."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        ours = self.forward_last(input_ids, attention_mask, position_ids)
        theirs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).logits[:, -1].float()
        err = (ours - theirs).abs().max().item()
        if not err <= atol * max(1.0, theirs.abs().max().item()):
            raise ValueError(f"act search: the layer-by-layer forward differs from the model's "
                             f"own forward by {err:.3g} on {type(self.model).__name__}; this "
                             "architecture is not supported by the fast search")

    @torch.no_grad()
    def check_suffix(self, input_ids, attention_mask, start: int) -> float:
        """Largest difference (relative to the largest logit) between the last logits of a full
        pass and of a pass over the positions ``start ..`` only, with the prefix's keys and
        values recorded from the full pass (the prefix reuse of the search relies on it)."""
        hidden, ctx = self.context(input_ids, attention_mask)
        recorder = KVRecorder()
        full = self.last_logits(self.run_layers(hidden, ctx, 0, self.num_layers, recorder))
        prefix = RowPrefixKV([(recorder.kv, row, start) for row in range(hidden.shape[0])], start)
        part = self.last_logits(self.run_layers(hidden[:, start:], ctx.suffix(start), 0,
                                                self.num_layers, prefix))
        return (full - part).abs().max().item() / max(1.0, full.abs().max().item())


def layer_windows(config, num_layers: int) -> list[Optional[int]]:
    """Each decoder layer's attention window (None: full causal attention), as the layers pass
    it to the attention function: ``config.sliding_window`` for the ``"sliding_attention"``
    entries of ``config.layer_types``, for every layer where the config has no layer types
    (Mistral), none for full-attention layers. Other layer types are refused."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("act search: bidirectional attention is not supported")
    if not types:
        return [int(window) if window else None] * num_layers
    unknown = sorted(set(types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise ValueError(f"act search: layer types {unknown} are not supported (only "
                         f"{FULL_ATTENTION!r} and {SLIDING_ATTENTION!r})")
    if len(types) < num_layers:
        raise ValueError(f"act search: config.layer_types has {len(types)} entries for "
                         f"{num_layers} layers")
    if SLIDING_ATTENTION in types[:num_layers] and not window:
        raise ValueError("act search: sliding-window layers but no config.sliding_window")
    return [int(window) if t == SLIDING_ATTENTION else None for t in types[:num_layers]]


def rope_keys(rotary, config, num_layers: int) -> list[Optional[str]]:
    """Each decoder layer's rotary key: its layer type where the model's rotary module takes
    one (``forward(x, position_ids, layer_type)``: Gemma 3's local and global bases), else None
    (one pair of rotary embeddings for every layer)."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return list(config.layer_types[:num_layers])
    return [None] * num_layers


def one_hot_heads(heads: Sequence[int], num_heads: int, device=None) -> torch.Tensor:
    """Bool ``[len(heads), num_heads]``: row ``r`` selects head ``heads[r]``."""
    rows = [head_mask([h], num_heads, who="act search", device=device) for h in heads]
    return torch.stack(rows) if rows else torch.zeros(0, num_heads, dtype=torch.bool,
                                                      device=device)


# ---------------------------------------------------------------------------------------------
# Sink probe: which (row, head) pairs of a layer have sinks at all
# ---------------------------------------------------------------------------------------------
# A head whose calibration finds no sink (no key but the first with a mean attention > tau)
# leaves every row unchanged (docs/spec.md, step 4), so its candidate equals the uncalibrated
# model on that sample and need not be run. And a query row before the head's first sink puts no
# attention on any sink (causal), so calibration leaves it, and every position before the first
# sink in every later layer, unchanged. The probe records, while a layer runs plainly, the first
# sink position of every (row, head) of that layer (``T`` where the head has no sink), from the
# statistics of the layer's own ACT attention call (:func:`act_kernels.hf.recording`).

def first_sinks(sinks: torch.Tensor, total: int) -> torch.Tensor:
    """Long ``[B, Hq]``: the first True position along the last axis of ``sinks [B, Hq, K]``,
    ``total`` where there is none."""
    used = sinks.shape[-1]
    position = torch.arange(used, 0, -1, device=sinks.device)      # first True -> largest
    first = used - (sinks * position).amax(dim=-1)
    return torch.where(sinks.any(-1), first, torch.full_like(first, total))


def run_layer_with_probe(runner: LayerRunner, layer: int, hidden: torch.Tensor, ctx: Context,
                         cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run decoder layer ``layer`` plainly (inside an ACT block such as :func:`act_mode`) and
    return ``(hidden_out, first_sink long [B, Hq])``: the position of each (row, head)'s first
    sink, ``T`` (the padded length) where the head has none. ``cache``: as for
    :meth:`LayerRunner.run_layers` (a :class:`KVRecorder` records the layer's keys/values)."""
    found = []

    def probe(module, stats, query, key, value, key_padding_mask):
        found.append(first_sinks(stats.sinks, key.shape[2]))

    with recording(runner.model, probe, layers=[layer]):
        out = runner.run_layers(hidden, ctx, layer, layer + 1, cache)
    if len(found) != 1:
        raise RuntimeError(f"act search: the sink probe of layer {layer} saw {len(found)} ACT "
                           "attention calls (expected one: does the model call Transformers' "
                           "attention interface?)")
    return out, found[0]
