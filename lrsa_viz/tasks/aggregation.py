"""Aggregation (RULER's frequent-words idea, written here): which of several planted words occurs most often?

``n_words`` candidate words are chalked on a wall through the document ("Someone had chalked the word lantern on
the wall."): the answer word ``top`` times, every other word 2 to ``top - 2`` times. Asked: "Which word was
chalked on the wall most often?" Exact match. Compression that drops some of the sentences changes the counts the
model can see, so this task tests whether what is kept still represents the whole document.
"""
from __future__ import annotations

from ..checks import check_int
from .base import Spec, Task, single_token_words

WORDS = ("lantern", "anchor", "violin", "compass", "ribbon", "saddle", "candle", "feather", "helmet", "barrel",
         "bucket", "carpet", "hammer", "jacket", "magnet", "needle", "pillow", "rocket", "shovel", "trumpet",
         "wallet", "parrot", "rabbit", "turtle", "spider", "tomato", "lemon", "garlic", "falcon", "dragon")


class FrequentWord(Task):
    name = "frequent_word"
    metric = "exact_match"
    instruction = "Answer with the word only."
    description = "most frequent of several planted words"

    def __init__(self, *args, n_words: int = 5, top: int = 6, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value, lo, hi in (("n_words", n_words, 2, 10), ("top", top, 4, 20)):
            check_int(name, value, lo, hi)
        self.n_words, self.top = n_words, top
        self.words = single_token_words(self.haystack, WORDS)

    def make(self, rng):
        words = rng.sample(self.words, self.n_words)
        counts = [self.top] + [rng.randint(2, self.top - 2) for _ in words[1:]]
        needles, asked = [], []
        for w, c in zip(words, counts):
            for _ in range(c):
                if w == words[0]:
                    asked.append(len(needles))
                needles.append(f"Someone had chalked the word {w} on the wall.")
        return Spec(needles=needles, question="Which word was chalked on the wall most often?", answer=words[0],
                    asked=asked, retrieve=[words[0]], forbidden=tuple(words),
                    meta={"counts": dict(zip(words, counts))})
