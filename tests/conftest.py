"""Shared fixtures: the tiny random model and (session-scoped, converted once) the default SmolLM2 model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrsa_viz import load_model, tiny_model
from lrsa_viz.qa_data import QAConfig, QAGenerator, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default offline SmolLM2-135M-Instruct, float32 on CPU."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def passage() -> str:
    return (ROOT / "data" / "passages" / "kv_cache_notes.txt").read_text()


@pytest.fixture(scope="session")
def tok():
    """The default tokenizer (SmolLM2's, offline)."""
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm():
    """The training module's tiny random Llama (``load_source("tiny:0")``), fresh for each test module."""
    from lrsa_viz.train import load_source

    return load_source("tiny:0")[0]


@pytest.fixture(scope="module")
def examples(tok):
    """Eight QA test examples of 192-token documents (three facts each)."""
    return QAGenerator(tok, QAConfig(context_tokens=192, n_facts=3), seed=0).split("test", 8)
