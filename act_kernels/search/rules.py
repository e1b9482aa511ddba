"""The rules of the greedy head selection, shared by the search's steps and its report: the
order candidates are tried in, when a head is kept, when a final set beats the uncalibrated
model."""
from __future__ import annotations

from typing import Sequence

EPS = 1e-12


def rank_key(row: dict) -> tuple:
    """Best first: accuracy gain, class-balanced accuracy gain, margin gain, layer, head."""
    return (-row["d_acc"], -row["d_bal_acc"], -row["d_margin"], row["layer"], row["head"])


def improves(trial: dict, current: dict) -> bool:
    """The greedy rule on the validation part: no loss of accuracy or class-balanced accuracy,
    and a gain: higher accuracy, or the same accuracy with a higher margin."""
    if trial["acc"] < current["acc"] - EPS or trial["bal_acc"] < current["bal_acc"] - EPS:
        return False
    return trial["acc"] > current["acc"] + EPS or trial["margin"] > current["margin"] + EPS


def beats(final: dict, base: dict) -> bool:
    """Does the final set beat the uncalibrated model (validation metrics)? Higher accuracy, or
    equal accuracy with a higher margin."""
    if abs(final["acc"] - base["acc"]) <= EPS:
        return final["margin"] > base["margin"] + EPS
    return final["acc"] > base["acc"]


def as_heads(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``[(layer, head), ...]`` -> ``{layer: sorted heads}``."""
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(int(layer), []).append(int(head))
    return {l: sorted(h) for l, h in sorted(out.items())}
