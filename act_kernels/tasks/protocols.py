"""The two scoring protocols on logits, and the encoding they need: left-padded batches,
left truncation, next-token (last-position) scoring and option log-likelihood scoring.

The loops that run a model over samples with these are
:class:`act_kernels.scoring.PlainScorer` (evaluation, search) and the search's engines.
Typical use::

    task = get_task("sst2")
    enc, items = prepare_batch(task, examples, tokenizer, chat_template=False)
    logits = model(**enc, logits_to_keep=1).logits[:, -1]     # [n, V]
    out = score_last_logits(logits, items)
    out["correct"], out["pred"], out["gold_logprob_margin"]

Left padding puts every prompt's last token in the last column, so one position of logits per
row is all the scoring needs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .task import CLASSIFICATION, MULTIPLE_CHOICE, Example, ScoreItem, Task


# ---------------------------------------------------------------------- encoding
def pad_id(tokenizer) -> int:
    """The id used for padding: the pad token, else end-of-sequence, else 0."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device=None) -> dict[str, torch.Tensor]:
    """Token id lists -> one LEFT-padded batch ``{"input_ids", "attention_mask", "position_ids"}``
    (``[n, L]`` long; position ids count real tokens only, 0 on padding). The one home of left
    padding in the package."""
    n = len(seqs)
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            input_ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            attention_mask[i, width - len(s):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def truncate_left(ids: Sequence[int], max_length: int | None) -> list[int]:
    """``ids`` without its first tokens beyond ``max_length`` (the end of a prompt, where the
    answer goes, is kept); ``None``: unchanged. The one home of prompt truncation."""
    ids = list(ids)
    if max_length is not None and len(ids) > max_length:
        ids = ids[len(ids) - max_length:]
    return ids


def encode_batch(tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = True,
                 max_length: int | None = None, device=None,
                 return_position_ids: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize ``prompts`` and LEFT-pad them into one batch.

    Returns ``{"input_ids": [n, L] long, "attention_mask": [n, L] long, "position_ids": [n, L]}``
    (position ids count real tokens only, 0 on padding) that can go straight into
    ``model(**batch)``.  The last column holds every prompt's last token.  The tokenizer is not
    modified (padding is done here, with :func:`pad_id`).  ``add_special_tokens`` should be
    ``True`` for raw prompts (the reference) and ``False`` for chat-templated ones.
    ``max_length`` truncates on the LEFT (the end of a prompt, where the answer goes, is kept).
    """
    seqs = []
    for p in prompts:
        seqs.append(truncate_left(tokenizer.encode(p, add_special_tokens=add_special_tokens),
                                  max_length))
    out = left_pad(seqs, pad_id(tokenizer), device)
    if not return_position_ids:
        out.pop("position_ids")
    return out


def prepare_batch(task: Task, examples: Sequence[Example], tokenizer, *,
                  chat_template: bool = False, max_length: int | None = None, device=None,
                  shots: Sequence[Example] = ()) -> tuple[dict[str, torch.Tensor], list[ScoreItem]]:
    """Prompts of ``examples`` encoded with :func:`encode_batch`, and their score items."""
    prompts = [task.build_prompt(e, tokenizer, chat_template=chat_template, shots=shots)
               for e in examples]
    enc = encode_batch(tokenizer, prompts, add_special_tokens=not chat_template,
                       max_length=max_length, device=device)
    return enc, task.score_items(examples, tokenizer)


# ---------------------------------------------------------------------- last-position scoring
def _pack(items: Sequence[ScoreItem], device) -> tuple[torch.Tensor, ...]:
    n = len(items)
    k = max(len(it.option_token_ids) for it in items)
    m = max(len(v) for it in items for v in it.option_token_ids)
    ids = torch.zeros((n, k, m), dtype=torch.long)
    mask = torch.zeros((n, k, m), dtype=torch.bool)
    for i, it in enumerate(items):
        if len(it.option_token_ids) < 2:
            raise ValueError("a score item needs at least two options")
        for j, variants in enumerate(it.option_token_ids):
            ids[i, j, : len(variants)] = torch.as_tensor(variants, dtype=torch.long)
            mask[i, j, : len(variants)] = True
    gold = torch.as_tensor([it.gold for it in items], dtype=torch.long)
    vocab = torch.as_tensor([it.kind == MULTIPLE_CHOICE for it in items], dtype=torch.bool)
    if any(it.kind not in (CLASSIFICATION, MULTIPLE_CHOICE) for it in items):
        raise ValueError("unknown score item kind")
    return ids.to(device), mask.to(device), gold.to(device), vocab.to(device)


def _margin(option_lp: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    gold_lp = option_lp.gather(1, gold[:, None])[:, 0]
    is_gold = torch.zeros_like(option_lp, dtype=torch.bool).scatter_(1, gold[:, None], True)
    other = option_lp.masked_fill(is_gold, -math.inf).amax(-1)
    return gold_lp - other


def score_last_logits(logits: torch.Tensor, items: Sequence[ScoreItem]) -> dict[str, torch.Tensor]:
    """Score next-token logits ``[n, V]`` (the last position of each prompt) against ``items``.

    Classification items (the reference protocol): log-softmax over the candidate label tokens
    only; ``pred`` = the label whose token has the highest logit.
    Multiple-choice items (greedy): ``pred_token`` = argmax over the WHOLE vocabulary; ``pred`` =
    the option whose letter token it is (``-1`` when it is no option letter); log-probs are the
    whole-vocabulary log-softmax, summed over a letter's token variants (``"A"``/``" A"``).

    Returns tensors on ``logits.device``: ``correct`` bool [n], ``pred`` long [n] (option index),
    ``gold`` long [n], ``pred_token`` long [n] (whole-vocab argmax), ``option_logprobs`` float [n, K]
    (``-inf`` for options an example does not have), ``gold_logprob_margin`` float [n] =
    log p(gold) - max over the other options of log p(option) (> 0 exactly when the gold option
    beats every other option) and ``decision_margin`` float [n], the margin whose sign is
    ``correct``: the gold margin for classification; for multiple choice the best logit among
    the gold letter's tokens minus the best logit of every other vocabulary token (the greedy
    answer is right exactly when it is > 0). Both margins are differentiable in ``logits``.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits [n, V], got {tuple(logits.shape)}")
    if logits.shape[0] != len(items):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(items)} items")
    logits = logits.float()
    n = logits.shape[0]
    ids, mask, gold, vocab = _pack(items, logits.device)
    k, m = ids.shape[1], ids.shape[2]
    flat = ids.view(n, k * m)
    neg_inf = torch.tensor(-math.inf, device=logits.device)

    raw = logits.gather(1, flat).view(n, k, m).masked_fill(~mask, -math.inf).logsumexp(-1)
    cls_lp = raw.log_softmax(-1)
    full = logits.log_softmax(-1).gather(1, flat).view(n, k, m)
    mc_lp = full.masked_fill(~mask, -math.inf).logsumexp(-1)
    option_lp = torch.where(vocab[:, None], mc_lp, cls_lp)
    option_lp = torch.where(mask.any(-1), option_lp, neg_inf)

    pred_token = logits.argmax(-1)
    hit = ((ids == pred_token[:, None, None]) & mask).any(-1)  # [n, K]
    pred_mc = torch.where(hit.any(-1), hit.long().argmax(-1), torch.full_like(pred_token, -1))
    pred_cls = option_lp.argmax(-1)
    pred = torch.where(vocab, pred_mc, pred_cls)
    margin = _margin(option_lp, gold)
    return {"correct": pred == gold, "pred": pred, "gold": gold, "pred_token": pred_token,
            "option_logprobs": option_lp, "gold_logprob_margin": margin,
            "decision_margin": torch.where(vocab, _vocab_margin(logits, ids, mask, gold), margin)}


def _vocab_margin(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  gold: torch.Tensor) -> torch.Tensor:
    """Best logit among the gold option's tokens minus the best logit of every other token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    gold_ids, gold_mask = ids[rows, gold], mask[rows, gold]                  # [n, m]
    gold_best = logits.gather(1, gold_ids).masked_fill(~gold_mask, -math.inf).amax(-1)
    is_gold = torch.zeros_like(logits, dtype=torch.bool)
    is_gold[rows[:, None].expand_as(gold_ids)[gold_mask], gold_ids[gold_mask]] = True
    return gold_best - logits.masked_fill(is_gold, -math.inf).amax(-1)


# ---------------------------------------------------------------------- log-likelihood variant
def score_option_logprobs(option_logprobs: torch.Tensor, gold, *, lengths: torch.Tensor | None = None,
                          normalize: bool = False) -> dict[str, torch.Tensor]:
    """Pick the option with the highest (optionally length-normalised) summed log-prob.

    ``option_logprobs`` [n, K]: summed continuation log-probs, ``-inf`` (or NaN) for missing
    options.  ``normalize=True`` divides by ``lengths`` [n, K] (token or character counts).
    Returns ``correct``, ``pred``, ``gold``, ``option_scores`` (what was compared) and
    ``gold_logprob_margin`` (score of gold minus the best other score; also ``decision_margin``,
    as its sign is ``correct`` here).
    """
    scores = option_logprobs.float()
    if normalize:
        if lengths is None:
            raise ValueError("normalize=True needs lengths")
        scores = scores / lengths.to(scores).clamp(min=1)
    scores = torch.nan_to_num(scores, nan=-math.inf)
    gold = torch.as_tensor(gold, dtype=torch.long, device=scores.device)
    pred = scores.argmax(-1)
    margin = _margin(scores, gold)
    return {"correct": pred == gold, "pred": pred, "gold": gold, "option_scores": scores,
            "gold_logprob_margin": margin, "decision_margin": margin}


def loglik_ids(tokenizer, context: str, continuation: str, *, add_special_tokens: bool = True,
               max_length: int | None = None) -> tuple[list[int], int]:
    """``(ids, n_cont)``: the tokens of ``context + continuation``, tokenized separately (the
    continuation without special tokens) and concatenated, and the continuation's token count
    (its tokens are the last ``n_cont``). ``max_length`` drops context tokens from the left."""
    c_ids = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    t_ids = tokenizer.encode(continuation, add_special_tokens=False)
    if not t_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no token")
    if max_length is not None and len(c_ids) + len(t_ids) > max_length <= len(t_ids):
        raise ValueError("max_length leaves no room for the context")
    return truncate_left(c_ids + t_ids, max_length), len(t_ids)


def encode_loglik(tokenizer, pairs: Sequence[tuple[str, str]], *, add_special_tokens: bool = True,
                  max_length: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """LEFT-padded batch of ``context + continuation`` token sequences (:func:`loglik_ids`).

    Returns the :func:`encode_batch` keys plus ``n_cont`` long [n] (the continuation's token
    count; its tokens are the last ``n_cont`` columns).
    """
    seqs, n_cont = [], []
    for ctx, cont in pairs:
        ids, n = loglik_ids(tokenizer, ctx, cont, add_special_tokens=add_special_tokens,
                            max_length=max_length)
        seqs.append(ids)
        n_cont.append(n)
    out = left_pad(seqs, pad_id(tokenizer), device)
    out_n = torch.as_tensor(n_cont, dtype=torch.long)
    out["n_cont"] = out_n.to(device) if device is not None else out_n
    return out


def continuation_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, n_cont: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's continuation, and whether greedy decoding reproduces it.

    ``logits`` [n, T, V] are the logits of the LAST ``T`` positions (``T >= max(n_cont) + 1``;
    ``model(..., logits_to_keep=T)`` gives exactly these), ``input_ids`` [n, L] the batch of
    :func:`encode_loglik`.  Returns ``(sum_logprob float [n], greedy_match bool [n])``.
    """
    n, t, _ = logits.shape
    width = input_ids.shape[1]
    need = int(n_cont.max()) + 1 if n_cont.numel() else 1
    if t < need:
        raise ValueError(f"need the last {need} positions of logits, got {t}")
    lp = logits[:, -need:-1].float().log_softmax(-1)          # predicts tokens at width-need+1..
    targets = input_ids[:, width - need + 1:]                  # [n, need-1]
    tok_lp = lp.gather(-1, targets[..., None])[..., 0]
    greedy = lp.argmax(-1) == targets
    cols = torch.arange(need - 1, device=logits.device)
    in_cont = cols[None, :] >= (need - 1 - n_cont.to(logits.device))[:, None]
    total = tok_lp.masked_fill(~in_cont, 0.0).sum(-1)
    match = (greedy | ~in_cont).all(-1)
    return total, match


# ---------------------------------------------------------------------- metrics
def accuracy(correct) -> float:
    c = torch.as_tensor(correct, dtype=torch.float)
    return float(c.mean()) if c.numel() else float("nan")


def balanced_accuracy(correct, gold) -> float:
    """Mean over the gold classes present of the per-class accuracy (``gold`` may be any group
    label: :func:`act_kernels.scoring.metrics` groups by (task, gold option))."""
    c = torch.as_tensor(correct, dtype=torch.float64).flatten()
    g = torch.as_tensor(gold, dtype=torch.long).flatten()
    if c.numel() == 0:
        return float("nan")
    per_class = [float(c[g == k].mean()) for k in torch.unique(g).tolist()]
    return sum(per_class) / len(per_class)
