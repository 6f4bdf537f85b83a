"""Small helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch

from lrsa_viz.qa_data import encode_prompt

ROOT = Path(__file__).resolve().parents[1]


def prompt_batch(tok, examples) -> tuple[torch.Tensor, int]:
    """Two prompts of one length (the commonest (length, context_end) among ``examples``): ([2, N] ids, context_end)."""
    by_len: dict[tuple[int, int], list[list[int]]] = {}
    for ex in examples:
        ids, end = encode_prompt(tok, ex)
        by_len.setdefault((len(ids), end), []).append(ids)
    (_, end), rows = max(by_len.items(), key=lambda kv: len(kv[1]))
    assert len(rows) >= 2, "need two prompts of one length"
    return torch.tensor(rows[:2]), end


def import_script(folder: str, name: str):
    """The module ``ROOT/folder/name.py`` (a script or benchmark outside the package), imported by name."""
    sys.path.insert(0, str(ROOT / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that must run on the CPU whatever the machine has.

    CUDA is hidden (``CUDA_VISIBLE_DEVICES=""``), so ``torch.cuda.is_available()`` is False in the child and every
    "auto" choice takes its CPU branch: device, precision (fp32, not bf16), accelerate's DDP backend (gloo, not
    NCCL, which refuses two processes on one GPU), the LRSA backend, the evaluation's chunked prefill, and the
    device recorded in result files. The training and evaluation CLIs have no device option, so a CPU test of
    them runs them in such a child.
    """
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1", **extra}


def run_cpu(args: Sequence[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python ARGS`` (e.g. ``["-m", "lrsa_viz.train", ...]``) in the repository root on the CPU (`cpu_env`);
    fails the test with the end of its output unless it exits with status 0."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args[:2])} exited with {done.returncode}:\n" + \
        done.stdout[-2000:] + done.stderr[-4000:]
    return done


def skip_unless_free_runs_agree(model, input_ids, config) -> None:
    """For an exact comparison of free runs (parallel vs chunked, METHOD §3): compare the prompt's selections first;
    if this machine's rounding flipped any, assert that every flip is a near-tie and skip the exact comparison."""
    from lrsa_viz.agreement import compare_selections

    agreement = compare_selections(model, input_ids, config)
    if agreement.n_flips:
        assert agreement.all_near_ties(), agreement.summary()
        pytest.skip(f"free runs differ at near-ties on this machine ({agreement.summary()}): tokens not compared")
