"""The long-context task suite: RULER-style task families written here, generated offline and seeded.

One module per family, one contract (`lrsa_viz.tasks.base.Task`): every task makes documents of EXACTLY
``context_tokens`` tokens of real prose and template sentences (`lrsa_viz.tasks.haystack`) with its needles
planted, a question, a short answer and a metric (`lrsa_viz.tasks.metrics`).

    from lrsa_viz.tasks import make_task
    task = make_task("variable_tracking", tokenizer, context_tokens=4000, seed=0)
    examples = task.split("test", 200, workers=8)

| name | what is asked | metric |
|---|---|---|
| single_needle | one of several facts of one kind (today's task, `lrsa_viz.qa_data`) | exact match |
| multi_key | one of several near-duplicate keys | exact match |
| multi_value | all values of one key | set F1 |
| multi_query | several keys at once | set F1 |
| variable_tracking | every variable of an assignment chain | set F1 |
| frequent_word | the most frequent of several planted words | exact match |
"""
from __future__ import annotations

from .aggregation import FrequentWord
from .base import Spec, Task
from .haystack import HELD_OUT_PASSAGES, Haystack
from .metrics import METRIC_NAMES, exact_match, normalize_answer, score, set_f1
from .needle import MultiKey, MultiQuery, MultiValue, SingleNeedle
from .variables import VariableTracking

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SingleNeedle, MultiKey, MultiValue, MultiQuery,
                                                          VariableTracking, FrequentWord)}


def task_names() -> list[str]:
    return list(TASKS)


def make_task(name: str, tokenizer, context_tokens: int = 4000, seed: int = 0, haystack: Haystack | None = None,
              **options) -> Task:
    """The task ``name`` (one of TASKS) for ``tokenizer``; ``options`` are the family's own parameters."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")
    return TASKS[name](tokenizer, context_tokens=context_tokens, seed=seed, haystack=haystack, **options)


def task_metric(name: str) -> str:
    """The metric of task ``name`` ("exact_match" or "set_f1")."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")
    return TASKS[name].metric


__all__ = ["TASKS", "Task", "Spec", "Haystack", "HELD_OUT_PASSAGES", "make_task", "task_names", "task_metric",
           "METRIC_NAMES", "score", "exact_match", "set_f1", "normalize_answer", "SingleNeedle", "MultiKey",
           "MultiValue", "MultiQuery", "VariableTracking", "FrequentWord"]
