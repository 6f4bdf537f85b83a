"""Small helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import torch

from lrsa_viz.qa_data import encode_prompt


def prompt_batch(tok, examples) -> tuple[torch.Tensor, int]:
    """Two prompts of one length (the commonest (length, context_end) among ``examples``): ([2, N] ids, context_end)."""
    by_len: dict[tuple[int, int], list[list[int]]] = {}
    for ex in examples:
        ids, end = encode_prompt(tok, ex)
        by_len.setdefault((len(ids), end), []).append(ids)
    (_, end), rows = max(by_len.items(), key=lambda kv: len(kv[1]))
    assert len(rows) >= 2, "need two prompts of one length"
    return torch.tensor(rows[:2]), end
