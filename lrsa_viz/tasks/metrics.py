"""How an answer is scored: exact match of a normalised string, or F1 of the SET of items an answer names.

Normalisation (SQuAD): lower case, no punctuation, no articles, single spaces. A set answer ("4821, 3390 and
7712") is read as the set of its words after normalisation, without "and"; its F1 against the gold set is the
harmonic mean of precision (named items that are gold) and recall (gold items named). Order is ignored.
"""
from __future__ import annotations

import re
import string

METRIC_NAMES = ("exact_match", "set_f1")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_items(text: str) -> set[str]:
    """The set of items an answer names: its normalised words, "and" left out."""
    return {w for w in normalize_answer(text).split() if w != "and"}


def set_f1(prediction: str, gold: str) -> float:
    """F1 of the item sets of ``prediction`` and ``gold`` (0 when either is empty)."""
    pred, ref = answer_items(prediction), answer_items(gold)
    common = len(pred & ref)
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, prediction: str, gold: str) -> float:
    """The task metric ``metric`` (one of METRIC_NAMES) of one answer."""
    if metric == "exact_match":
        return exact_match(prediction, gold)
    if metric == "set_f1":
        return set_f1(prediction, gold)
    raise ValueError(f"metric must be one of {METRIC_NAMES}, got {metric!r}")
