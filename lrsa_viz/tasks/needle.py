"""Needle-in-a-haystack tasks (RULER-style, written here): find planted values by their keys.

- `SingleNeedle` ("single_needle"): today's task (`lrsa_viz.qa_data`) on the prose haystack: ``n_facts`` facts
  of one kind ("The locker code of Maria is 4821."), one asked. Exact match.
- `MultiKey` ("multi_key"): ``n_needles`` needles "The special magic number for the blue lantern in the north
  hall is 4821." whose keys are near-duplicates (``near`` of them differ from the asked key in ONE of colour,
  object, side, room), one asked. Exact match.
- `MultiValue` ("multi_value"): one key holds ``n_values`` values ("One of the special magic numbers for ... is
  4821."), among near-duplicate keys with one value each; asked for all of them. Set F1.
- `MultiQuery` ("multi_query"): ``n_needles`` keys, ``n_queries`` asked at once. Set F1.

Every key part is one token after a space, so every question of a task has one token length (batches of one
prompt length, which chunk-by-chunk prefill needs).
"""
from __future__ import annotations

import random

from ..checks import check_int
from ..qa_data import FACT_KINDS
from .base import Spec, Task, distinct_values, single_token_words

KEY_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "brown", "silver",
               "golden")
KEY_OBJECTS = ("lantern", "anchor", "violin", "compass", "ribbon", "saddle", "candle", "feather", "helmet",
               "barrel", "bucket", "carpet", "hammer", "jacket", "magnet", "needle", "pillow", "rocket", "shovel",
               "trumpet", "wallet", "kite", "drum", "bell", "key", "glove", "boot", "cup", "plate", "spoon")
KEY_SIDES = ("north", "south", "east", "west", "upper", "lower", "inner", "outer")
KEY_ROOMS = ("hall", "attic", "garden", "tower", "kitchen", "library", "chapel", "gallery", "stable", "cellar")


class _KeyedTask(Task):
    """Shared key vocabulary: keys are (colour, object, side, room), each part one token."""

    answer_digits = 4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parts = [single_token_words(self.haystack, words)
                      for words in (KEY_COLOURS, KEY_OBJECTS, KEY_SIDES, KEY_ROOMS)]
        if min(len(p) for p in self.parts) < 4:
            raise ValueError("tokenizer: too few single-token key words for the keyed tasks")

    def check_near_count(self, name: str, k: int) -> None:
        """ValueError unless ``k`` keys that differ from one key in exactly one part exist (else near_keys would
        search forever)."""
        available = sum(len(p) - 1 for p in self.parts)
        if k > available:
            raise ValueError(f"{name}: this tokenizer has {available} single-token near-duplicates of a key, got {k}")

    def random_key(self, rng: random.Random) -> tuple[str, ...]:
        return tuple(rng.choice(p) for p in self.parts)

    def near_keys(self, rng: random.Random, key: tuple[str, ...], k: int, taken: set) -> list[tuple[str, ...]]:
        """``k`` keys that differ from ``key`` in exactly one part (cycling over the parts), none in ``taken``."""
        out = []
        part = rng.randrange(4)
        while len(out) < k:
            alt = list(key)
            alt[part] = rng.choice([w for w in self.parts[part] if w != key[part]])
            if tuple(alt) not in taken:
                taken.add(tuple(alt))
                out.append(tuple(alt))
            part = (part + 1) % 4
        return out

    @staticmethod
    def phrase(key: tuple[str, ...]) -> str:
        colour, obj, side, room = key
        return f"the {colour} {obj} in the {side} {room}"


class SingleNeedle(Task):
    """Today's task on the prose haystack: facts of one kind, one asked (`lrsa_viz.qa_data` fact kinds)."""

    name = "single_needle"
    metric = "exact_match"
    instruction = "Answer with the exact value only."
    description = "facts of one kind (locker code of Maria ...), one asked"

    def __init__(self, *args, n_facts: int = 6, answer_digits: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value, lo, hi in (("n_facts", n_facts, 1, 32), ("answer_digits", answer_digits, 1, 12)):
            check_int(name, value, lo, hi)
        self.n_facts, self.answer_digits = n_facts, answer_digits
        if len(self.haystack.names) < n_facts:
            raise ValueError(f"n_facts: only {len(self.haystack.names)} single-token names, got {n_facts}")

    def make(self, rng):
        kind = rng.choice(sorted(FACT_KINDS))
        fact, question = FACT_KINDS[kind]
        names = rng.sample(self.haystack.names, self.n_facts)
        values = distinct_values(rng, self.n_facts, self.answer_digits)
        asked = rng.randrange(self.n_facts)
        return Spec(needles=[fact.format(name=n, value=v) for n, v in zip(names, values)],
                    question=question.format(name=names[asked]), answer=values[asked], asked=[asked],
                    retrieve=[values[asked]], meta={"kind": kind})


class MultiKey(_KeyedTask):
    """Near-duplicate keys, one asked."""

    name = "multi_key"
    metric = "exact_match"
    instruction = "Answer with the exact value only."
    description = "near-duplicate keys (one part differs), one asked"

    def __init__(self, *args, n_needles: int = 8, near: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        check_int("n_needles", n_needles, 2, 32)
        if isinstance(near, bool) or not isinstance(near, int) or not 0 <= near < n_needles:
            raise ValueError(f"near must be an integer in [0, n_needles - 1 = {n_needles - 1}], got {near!r}")
        self.check_near_count("near", near)
        self.n_needles, self.near = n_needles, near

    def make(self, rng):
        key = self.random_key(rng)
        taken = {key}
        keys = [key] + self.near_keys(rng, key, self.near, taken)
        while len(keys) < self.n_needles:
            other = self.random_key(rng)
            if other not in taken:
                taken.add(other)
                keys.append(other)
        values = distinct_values(rng, self.n_needles, self.answer_digits)
        return Spec(needles=[f"The special magic number for {self.phrase(k)} is {v}." for k, v in zip(keys, values)],
                    question=f"What is the special magic number for {self.phrase(key)}?", answer=values[0],
                    asked=[0], retrieve=[values[0]], meta={"key": self.phrase(key)})


class MultiValue(_KeyedTask):
    """One key with several values, among near-duplicate keys: all values asked (a set)."""

    name = "multi_value"
    metric = "set_f1"
    instruction = "Answer with all the values only, separated by commas."
    description = "one key holds several values, all asked (set F1)"

    def __init__(self, *args, n_values: int = 3, n_distractors: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value, lo, hi in (("n_values", n_values, 2, 8), ("n_distractors", n_distractors, 0, 24)):
            check_int(name, value, lo, hi)
        self.check_near_count("n_distractors", n_distractors)
        self.n_values, self.n_distractors = n_values, n_distractors

    def make(self, rng):
        key = self.random_key(rng)
        others = self.near_keys(rng, key, self.n_distractors, {key})
        keys = [key] * self.n_values + others
        values = distinct_values(rng, len(keys), self.answer_digits)
        needles = [f"One of the special magic numbers for {self.phrase(k)} is {v}." for k, v in zip(keys, values)]
        asked = list(range(self.n_values))
        return Spec(needles=needles, question=f"What are all the special magic numbers for {self.phrase(key)}?",
                    answer=", ".join(values[:self.n_values]), asked=asked, retrieve=values[:self.n_values],
                    meta={"key": self.phrase(key)})


class MultiQuery(_KeyedTask):
    """Several keys asked at once (a set of values)."""

    name = "multi_query"
    metric = "set_f1"
    instruction = "Answer with the values only, separated by commas."
    description = "several keys asked at once (set F1)"

    def __init__(self, *args, n_needles: int = 8, n_queries: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        check_int("n_needles", n_needles, 2, 32)
        check_int("n_queries", n_queries, 2, min(4, n_needles))
        self.n_needles, self.n_queries = n_needles, n_queries

    def make(self, rng):
        keys: list[tuple[str, ...]] = []
        while len(keys) < self.n_needles:
            k = self.random_key(rng)
            if k not in keys:
                keys.append(k)
        values = distinct_values(rng, self.n_needles, self.answer_digits)
        asked = sorted(rng.sample(range(self.n_needles), self.n_queries))
        rng.shuffle(asked)
        question = ("What are the special magic numbers for "
                    + " and for ".join(self.phrase(keys[i]) for i in asked) + "?")
        return Spec(needles=[f"The special magic number for {self.phrase(k)} is {v}." for k, v in zip(keys, values)],
                    question=question, answer=", ".join(values[i] for i in asked), asked=asked,
                    retrieve=[values[i] for i in asked], meta={"keys": [self.phrase(keys[i]) for i in asked]})
