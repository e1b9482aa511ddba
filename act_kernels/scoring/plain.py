"""The plain scorer: a model with a fixed choice of calibrated heads (none: uncalibrated) run
over samples and scored by one of the protocols, batched with left padding.

Protocols (:data:`PROTOCOLS`):

* ``"next-token"`` (the ACT reference's): the logits of the prompt's last position, scored by
  :func:`~act_kernels.tasks.score_last_logits` (label tokens for classification, the greedy
  token over the whole vocabulary for multiple choice);
* ``"loglik"``: each option's continuation log-likelihood after the context, the highest wins
  (lm-evaluation-harness' ``acc``); ``"loglik/token"`` and ``"loglik/char"`` divide it by the
  continuation's tokens or characters first (``"loglik/char"`` is lm-eval's ``acc_norm``,
  which normalises by length in bytes; characters here).

``act eval``, the demo and the search's plain passes all score through :class:`PlainScorer`;
the search's candidate engine (:class:`act_kernels.search.candidates.Scorer`) extends it.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..hf import head_override
from ..modelinfo import model_device, num_query_heads
from ..params import DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_BETA, DEFAULT_TAU, head_mask
from ..runtime import Dist
from ..tasks import continuation_logprobs, left_pad, pad_id, score_last_logits
from ..tasks import score_option_logprobs
from .results import Results
from .samples import Sample, make_batches, pad_batch

NEXT_TOKEN = "next-token"
LOGLIK = "loglik"
PROTOCOLS = (NEXT_TOKEN, LOGLIK, "loglik/token", "loglik/char")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; choose one of {PROTOCOLS}")
    return protocol


def parse_protocols(spec) -> list[str]:
    """``"next-token,loglik"`` or a list -> the protocols, checked, in order, without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return list(dict.fromkeys(check_protocol(p.strip()) for p in items if p.strip()))


def score_options(sums: torch.Tensor, tokens: torch.Tensor, chars: torch.Tensor, gold,
                  protocol: str) -> dict[str, torch.Tensor]:
    """A log-likelihood protocol's scores of options ``[n, K]`` (summed continuation
    log-probabilities, ``-inf`` where missing; their lengths in tokens and characters):
    :func:`~act_kernels.tasks.score_option_logprobs`, normalised as ``protocol`` says.
    Differentiable in ``sums`` (the search's screen takes its gradient)."""
    lengths = {LOGLIK: None, "loglik/token": tokens, "loglik/char": chars}[check_protocol(protocol)]
    return score_option_logprobs(sums, gold, lengths=lengths, normalize=lengths is not None)


def profile_masks(heads: Mapping[int, Sequence[int]], num_heads: int, device=None
                  ) -> dict[int, torch.Tensor]:
    """``{layer: bool [Hq]}`` of a ``{layer: [heads]}`` mapping (empty layers dropped)."""
    return {int(layer): head_mask(idx, num_heads, who="act", layer=int(layer), device=device)
            for layer, idx in heads.items() if idx}


class PlainScorer:
    """Runs samples through ``model`` with ACT attention on every layer (plain where nothing is
    calibrated), batched with left padding; :meth:`plain` scores one protocol, :meth:`score`
    several from the same forwards. Results are over the global sample index, every process
    of ``dist`` taking its share of the batches, all reduced."""

    def __init__(self, model, tokenizer, *, beta: float = DEFAULT_BETA,
                 tau: float = DEFAULT_TAU, backend: str = DEFAULT_BACKEND,
                 batch_size: int = DEFAULT_BATCH_SIZE, dist: Optional[Dist] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.beta, self.tau, self.backend = float(beta), float(tau), backend
        self.batch_size = int(batch_size)
        self.dist = dist or Dist()
        self.device = model_device(model)
        self.num_heads = num_query_heads(model)
        # models whose forward has no logits_to_keep compute every position's logits
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    def override(self, masks: Optional[Mapping[int, torch.Tensor]] = None):
        """ACT attention on every layer (:func:`~act_kernels.hf.head_override`), layer ``l``
        calibrating the heads of ``masks[l]`` (bool ``[Hq]`` or one row per batch row)."""
        return head_override(self.model, dict(masks or {}), beta=self.beta, tau=self.tau,
                             backend=self.backend)

    def act_mode(self, heads: Optional[Mapping[int, Sequence[int]]] = None):
        """ACT attention on every layer, the heads ``{layer: [heads]}`` calibrated."""
        return self.override(profile_masks(heads or {}, self.num_heads, self.device))

    def my_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        return make_batches(samples, self.batch_size)[self.dist.rank::self.dist.world]

    # ------------------------------------------------------------------ forwards
    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the last ``keep`` positions of a left-padded batch."""
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": keep} if self._keep_arg else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **extra)
        return out.logits[:, -keep:]

    def last_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (float32) of the last position: the next-token protocol's forward
        (the search's engine runs its layer-by-layer one instead)."""
        return self._logits(ids, mask, 1)[:, -1].float()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def plain(self, n_total: int, samples: Sequence[Sample],
              heads: Optional[Mapping[int, Sequence[int]]] = None,
              progress: Optional[Callable[[int], None]] = None,
              protocol: str = NEXT_TOKEN) -> Results:
        """Results of the model with the heads ``{layer: [heads]}`` calibrated (none: the
        uncalibrated model) under ``protocol``."""
        return self.score(n_total, samples, heads, progress, (protocol,))[protocol]

    @torch.no_grad()
    def score(self, n_total: int, samples: Sequence[Sample],
              heads: Optional[Mapping[int, Sequence[int]]] = None,
              progress: Optional[Callable[[int], None]] = None,
              protocols: Sequence[str] = (NEXT_TOKEN,)) -> dict[str, Results]:
        """``{protocol: Results}`` for each of ``protocols``: the next-token protocol needs one
        forward per prompt, every log-likelihood protocol together one per option (samples
        encoded with ``loglik=True``). ``progress(k)`` is told of every ``k`` samples done per
        kind of forward."""
        protocols = [check_protocol(p) for p in dict.fromkeys(protocols)]
        out = {p: Results.empty(n_total) for p in protocols}
        loglik = [p for p in protocols if p != NEXT_TOKEN]
        if loglik and any(not s.options for s in samples):
            raise ValueError("log-likelihood scoring needs samples encoded with loglik=True")
        with self.act_mode(heads):
            for batch in self.my_batches(samples):
                index = torch.as_tensor([s.index for s in batch], dtype=torch.long)
                if NEXT_TOKEN in out:
                    ids, mask = pad_batch(batch, self.tokenizer, self.device)
                    out[NEXT_TOKEN].put(index, score_last_logits(self.last_logits(ids, mask),
                                                                 [s.item for s in batch]))
                    if progress:
                        progress(len(batch))
                if loglik:
                    sums, tokens, chars = self._option_logprobs(batch)
                    gold = [s.gold for s in batch]
                    for p in loglik:
                        out[p].put(index, score_options(sums, tokens, chars, gold, p))
                    if progress:
                        progress(len(batch))
        return {p: r.reduce(self.dist) for p, r in out.items()}

    def _option_logprobs(self, batch: Sequence[Sample]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sums, tokens, chars)``, each ``[len(batch), K]``: every option's summed
        continuation log-probability (``-inf`` where a sample has fewer options), and the
        continuation's length in tokens and in characters. The options of a batch's samples are
        run ``batch_size`` at a time."""
        k = max(len(s.options) for s in batch)
        sums = torch.full((len(batch), k), -math.inf)
        tokens = torch.ones((len(batch), k))
        chars = torch.ones((len(batch), k))
        rows = [(i, j, opt) for i, s in enumerate(batch) for j, opt in enumerate(s.options)]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            enc = left_pad([opt[0] for _, _, opt in chunk], pad_id(self.tokenizer), self.device)
            n_cont = torch.as_tensor([opt[1] for _, _, opt in chunk], dtype=torch.long)
            logits = self._logits(enc["input_ids"], enc["attention_mask"],
                                  int(n_cont.max()) + 1)
            total, _ = continuation_logprobs(logits, enc["input_ids"], n_cont)
            for r, (i, j, opt) in enumerate(chunk):
                sums[i, j] = float(total[r])
                tokens[i, j], chars[i, j] = float(opt[1]), float(opt[2])
        return sums, tokens, chars
