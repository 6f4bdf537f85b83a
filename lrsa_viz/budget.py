"""Does the answer fit in what LagKV keeps? A warning when answers are longer than the per-partition budget.

LagKV keeps ``int(r * L)`` tokens of every scored partition. An answer that must be read back from the document
(a passkey, a code) and is longer than that cannot survive whole in one partition: retrieval collapses when
``r * L`` approaches the answer's length (docs/METHOD.md §5, the 64-digit passkey result). Evaluation and LRSA training
call `warn_if_answers_exceed_budget` so that a setting that cannot work says so instead of scoring silently low.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

from .config import LagConfig


class AnswerBudgetWarning(UserWarning):
    """Some answers have more tokens than LagKV keeps per partition (``int(ratio * lag_size)``)."""


def answer_token_lengths(tokenizer, answers: Iterable[str]) -> list[int]:
    """Tokens of each answer as the model must produce it (no special tokens, surrounding spaces stripped)."""
    return [len(tokenizer(str(a).strip(), add_special_tokens=False)["input_ids"]) for a in answers]


def answers_over_budget(tokenizer, examples: Sequence[dict], config: LagConfig) -> list[int]:
    """Indices of the examples whose ``answer`` has more tokens than ``config.top_k`` (= int(ratio * lag_size))."""
    if not isinstance(config, LagConfig):
        raise ValueError(f"config must be a LagConfig, got {type(config).__name__}")
    lengths = answer_token_lengths(tokenizer, (ex["answer"] for ex in examples))
    return [i for i, n in enumerate(lengths) if n > config.top_k]


def warn_if_answers_exceed_budget(tokenizer, examples: Sequence[dict], config: LagConfig, where: str = "data") -> list[int]:
    """Warn (`AnswerBudgetWarning`) if any answer is longer than the tokens LagKV keeps per partition.

    Args:
        examples: dicts with an ``answer`` string (as from `lrsa_viz.qa_data.load_examples`).
        config: the LagConfig of the compressed setting (ratio < 1 is where it matters; ratio 1 keeps everything).
        where: what to name in the message (e.g. the evaluation setting).
    Returns:
        The indices of the examples over budget (empty: no warning).
    """
    over = answers_over_budget(tokenizer, examples, config)
    if over and config.top_k < config.lag_size:
        longest = max(answer_token_lengths(tokenizer, (examples[i]["answer"] for i in over)))
        warnings.warn(
            f"{where}: {len(over)} of {len(examples)} answers are longer than the {config.top_k} tokens LagKV keeps "
            f"per partition (int(ratio * lag_size) = int({config.ratio} * {config.lag_size})); the longest has "
            f"{longest} tokens. Such an answer cannot be kept whole when it lies in a compressed partition "
            f"(docs/METHOD.md §5): expect low scores, or raise ratio or lag_size so that int(ratio * lag_size) >= {longest}.",
            AnswerBudgetWarning,
            stacklevel=2,
        )
        return over
    return []
