"""The generator contract every task family follows.

A task (`Task` subclass) says what to plant and what to ask: its `make` returns a `Spec` (needle sentences, the
question, the answer, the strings the answer must be read back from, words no distractor may contain). The base
class does the rest, the same way for every task:

- every example has its own random generator seeded by ``(task, seed, split, index)``: a split of 5000 examples
  begins with the 200 of a split of 200, and examples can be made in any order or in parallel (``workers``);
- the document is an intro sentence, the needles and a `Haystack` of distractors, **exactly** ``context_tokens``
  tokens of the tokenizer (checked on every example), with needle i planted in the i-th of k equal stretches of
  the distractors (shuffled, unless the task's needles must stay in order, e.g. assignment chains);
- the example is a dict with the fields of the dataset card (``data/qa/README.md``): id, task, context, question,
  answer, instruction, metric, context_tokens, depth (mean depth of the needles that carry the answer), needles
  (text, depth, asked), retrieve, the task's own metadata, and ``context_ids`` (the document's token ids, so
  training and evaluation need not tokenize 8k-token documents again: `lrsa_viz.qa_data.encode_prompts`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..checks import check_int
from ..qa_data import SPLITS
from .haystack import Haystack
from .metrics import METRIC_NAMES

INTRO = "The following text is a collection of notes and passages."
MAX_CONTEXT_TOKENS = 32768


@dataclass
class Spec:
    """What one example plants and asks.

    Attributes:
        needles: sentences to plant (no leading space).
        question, answer: what is asked and the exact gold answer.
        asked: indices of the needles that carry the answer.
        retrieve: strings the model must read back from the document (the answer-budget check uses the longest).
        ordered: plant the needles in the given order (assignment chains); otherwise their order is shuffled.
        forbidden: words (whole-word, case-insensitive) no distractor may contain.
        meta: extra fields of the example (JSON-serialisable).
    """

    needles: list[str]
    question: str
    answer: str
    asked: list[int]
    retrieve: list[str]
    ordered: bool = False
    forbidden: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


class Task:
    """Base class of a task family. Subclasses set the class attributes and implement `make`.

    Args:
        tokenizer: the model's tokenizer (documents are measured with it).
        context_tokens: exact document length in tokens. Accepted: integer in [`min_context_tokens`, 32768].
        seed: data seed (integer >= 0).
        haystack: distractor source (default: a `Haystack` over the project's prose with ``prose_fraction``).
    """

    name = "task"
    metric = "exact_match"
    instruction = "Answer with the exact value only."
    description = ""
    min_context_tokens = 192

    def __init__(self, tokenizer, context_tokens: int = 4000, seed: int = 0, haystack: Haystack | None = None,
                 prose_fraction: float = 0.5):
        lo = self.min_context_tokens
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or not lo <= context_tokens <= MAX_CONTEXT_TOKENS:
            raise ValueError(f"context_tokens must be an integer in [{lo}, {MAX_CONTEXT_TOKENS}] for task "
                             f"{self.name!r}, got {context_tokens!r}")
        check_int("seed", seed, 0)
        if self.metric not in METRIC_NAMES:  # pragma: no cover - a class definition error
            raise TypeError(f"{type(self).__name__}.metric must be one of {METRIC_NAMES}")
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        self.seed = seed
        self.haystack = haystack or Haystack(tokenizer, prose_fraction=prose_fraction)
        self._intro_tokens = self.haystack.count([INTRO])[0]

    # what a task defines ----------------------------------------------------------------------------------------
    def make(self, rng: random.Random) -> Spec:  # pragma: no cover - abstract
        """The needles, question and answer of one example, drawn from ``rng``."""
        raise NotImplementedError

    # the shared machinery ---------------------------------------------------------------------------------------
    def example(self, split: str, index: int) -> dict:
        """Example ``index`` of ``split`` (a dict, see the module docstring)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        check_int("index", index, 0)
        rng = random.Random(f"lrsa-viz-task/{self.name}/{self.seed}/{split}/{index}")
        spec = self.make(rng)
        needles = [" " + s for s in spec.needles]
        lengths = self.haystack.count(needles)
        budget = self.context_tokens - self._intro_tokens - sum(lengths)
        if budget < 32:
            need = self.context_tokens - budget + 32
            raise ValueError(f"context_tokens must be at least {need} for task {self.name!r} with "
                             f"{len(needles)} needles, got {self.context_tokens}")
        distractors = self.haystack.fill(rng, budget, spec.forbidden)
        n_d, k = len(distractors), len(needles)
        slots = [rng.randint(i * n_d // k, (i + 1) * n_d // k) for i in range(k)]
        order = list(range(k))
        if not spec.ordered:
            rng.shuffle(order)  # which needle sits in which stretch
        placed: dict[int, list[int]] = {}
        for j, slot in enumerate(slots):
            placed.setdefault(slot, []).append(order[j])
        pieces: list[tuple[str, int, int | None]] = [(INTRO, self._intro_tokens, None)]
        for i in range(n_d + 1):
            pieces += [(needles[j], lengths[j], j) for j in placed.get(i, [])]
            if i < n_d:
                pieces.append((*distractors[i], None))
        depth, start = {}, 0
        for _, n, j in pieces:
            if j is not None:
                depth[j] = start / self.context_tokens
            start += n
        context = "".join(p for p, _, _ in pieces)
        context_ids = self.haystack.encode(context)
        n_tokens = len(context_ids)
        if n_tokens != self.context_tokens:  # the pieces are tokenized apart; they must add up exactly
            raise RuntimeError(f"generator bug ({self.name}): document has {n_tokens} tokens, expected "
                               f"{self.context_tokens}")
        return {
            "id": f"{self.name}-{split}-{index:06d}",
            "task": self.name,
            "context": context,
            "question": spec.question,
            "answer": spec.answer,
            "instruction": self.instruction,
            "metric": self.metric,
            "context_tokens": n_tokens,
            "depth": round(sum(depth[j] for j in spec.asked) / len(spec.asked), 4),
            "needles": [{"text": s, "depth": round(depth[j], 4), "asked": j in spec.asked}
                        for j, s in enumerate(spec.needles)],
            "retrieve": list(spec.retrieve),
            **spec.meta,
            "context_ids": context_ids,
        }

    def split(self, split: str, size: int, start: int = 0, progress: bool = False, workers: int = 1) -> list[dict]:
        """Examples ``start .. start + size - 1`` of ``split``; ``workers`` > 1 makes them in as many processes
        (the result does not depend on it)."""
        for name, value, lo in (("size", size, 0), ("start", start, 0), ("workers", workers, 1)):
            check_int(name, value, lo)
        from tqdm.auto import tqdm

        indices = range(start, start + size)
        bar = dict(desc=f"generate {self.name} {split} ({self.context_tokens} tokens)", total=size,
                   disable=not progress)
        if workers == 1 or size < 2 * workers:
            return [self.example(split, i) for i in tqdm(indices, **bar)]
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers, _init_worker, (self,)) as pool:  # the task itself: same haystack
            jobs = pool.imap(_worker_example, [(split, i) for i in indices], chunksize=4)
            return list(tqdm(jobs, **bar))


_WORKER: Task | None = None


def _init_worker(task: Task) -> None:
    global _WORKER
    _WORKER = task


def _worker_example(job: tuple[str, int]) -> dict:
    return _WORKER.example(*job)


def single_token_words(haystack: Haystack, words: Sequence[str], tokens: int = 1) -> list[str]:
    """The words (deduplicated, in order) that are ``tokens`` tokens long after a space."""
    words = list(dict.fromkeys(words))
    return [w for w, n in zip(words, haystack.count([" " + w for w in words])) if n == tokens]


def distinct_values(rng: random.Random, k: int, digits: int) -> list[str]:
    """``k`` random ``digits``-digit numbers, none a substring of another."""
    values: list[str] = []
    while len(values) < k:
        v = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if all(v not in w and w not in v for w in values):
            values.append(v)
    return values
