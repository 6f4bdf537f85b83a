"""The haystack: distractor text of an EXACT number of tokens, from real prose and template sentences.

Prose comes from ``data/passages``: the public-domain *Pride and Prejudice* chapter, the project's KV-cache notes
and the essays in ``data/passages/haystack/`` (written for this project). The Gettysburg Address, the Declaration
of Independence and the Dickens sentence are NOT used here: they are the held-out prose on which the fine-tuned
models' language-model loss is measured (`HELD_OUT_PASSAGES`).

A haystack is a list of pieces, each one sentence with a leading space and no newline, so that token counts add
up (BPE pre-tokenisation splits at the space before a word; the task generator checks the sum on every document).
Prose comes in runs of consecutive sentences of one passage (2 to 6), templates one to three at a time, in the
proportion ``prose_fraction``; the last few tokens are closed exactly with short sentences ("Night fell.").
No distractor contains a digit, so a planted number appears only where it was planted.
"""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import Sequence

from ..checks import check_int
from ..qa_data import ADJECTIVES, COLORS, NAME_CANDIDATES, PLACES, TOPICS, WEEKDAYS

PASSAGES_DIR = Path(__file__).resolve().parents[2] / "data" / "passages"
#: top-level passages used as haystack prose (plus every .txt in data/passages/haystack/)
HAYSTACK_PASSAGES = ("pride_and_prejudice_chapter1", "kv_cache_notes")
#: passages never put into a training document: the held-out prose of the LM-loss measurement
HELD_OUT_PASSAGES = ("gettysburg_address", "declaration_of_independence", "tale_of_two_cities_opening")

TEMPLATE_OBJECTS = ("umbrella", "lamp", "bicycle", "notebook", "kettle", "ladder", "painting", "clock", "basket",
                    "guitar", "map", "telescope", "blanket", "camera", "chair", "mirror", "radio", "suitcase")
QUANTITIES = ("a few", "several", "many", "two", "three", "a dozen", "some")
TEMPLATES = (
    "{name} walked to the {place} after lunch.",
    "The {place} was unusually {adj} on {weekday}.",
    "Nobody could explain why the {color} {object} was left near the {place}.",
    "{name} and {name2} talked about the {topic} for {qty} minutes.",
    "On {weekday}, {name} repaired the {object} that {name2} had dropped.",
    "The {topic} meeting moved from the {place} to the {place2}.",
    "It rained for {qty} hours before the {place} opened.",
    "The old {object} in the {place} still works, according to {name}.",
    "{name} wrote a long note about the {topic} and left it in the {place}.",
    "The {color} door of the {place} was painted again last {weekday}.",
    "{name} prefers the {place} to the {place2} when the weather is {adj}.",
    "{name2} lent a {object} to {name} for the {topic}.",
    "Every {weekday} the {place} serves tea to {qty} visitors.",
    "The {topic} was postponed because the {object} was missing.",
    "{name} remembered that the {place} had a {color} {object}.",
    "{name} found a {color} {object} under a bench near the {place}.",
    "The {place} and the {place2} share a {adj} courtyard.",
    "{name} spent {qty} days planning the {topic}.",
)
#: candidate closing sentences; those of the two shortest token lengths close any gap of 2+ lengths' combinations
SHORT_SENTENCES = (" Time passed.", " Nobody spoke.", " Night fell.", " Wind rose.", " Rain fell.", " It rained.",
                   " All was quiet.", " The bell rang.", " Dogs barked.", " Morning came.")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019]?\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage, whitespace collapsed (no newlines), each without its surrounding spaces."""
    flat = " ".join(text.split())
    out, start = [], 0
    for m in _SENTENCE_END.finditer(flat):
        end = m.start() + len(m.group().rstrip())
        out.append(flat[start:end].strip())
        start = m.end()
    out.append(flat[start:].strip())
    return [s for s in out if s]


def haystack_texts(directory: Path | None = None) -> dict[str, str]:
    """{name: text} of the haystack prose (see module docstring)."""
    directory = Path(directory or PASSAGES_DIR)
    texts = {name: (directory / f"{name}.txt").read_text(encoding="utf-8") for name in HAYSTACK_PASSAGES}
    for path in sorted((directory / "haystack").glob("*.txt")):
        texts[f"haystack/{path.stem}"] = path.read_text(encoding="utf-8")
    return texts


class Haystack:
    """Distractor pieces of exactly ``budget`` tokens for one tokenizer.

    Args:
        tokenizer: counts tokens (a Hugging Face tokenizer).
        texts: prose passages (default `haystack_texts()`).
        prose_fraction: share of the distractor tokens taken from prose (0: templates only). Accepted: [0, 1].
    """

    def __init__(self, tokenizer, texts: dict[str, str] | None = None, prose_fraction: float = 0.5):
        if isinstance(prose_fraction, bool) or not isinstance(prose_fraction, (int, float)) or not 0 <= prose_fraction <= 1:
            raise ValueError(f"prose_fraction must be a number in [0, 1], got {prose_fraction!r}")
        self.tokenizer = tokenizer
        self.prose_fraction = float(prose_fraction)
        texts = haystack_texts() if texts is None else texts
        candidates = list(dict.fromkeys(NAME_CANDIDATES))
        self.names = [n for n, c in zip(candidates, self.count([" " + n for n in candidates])) if c == 1]
        # prose: digit-free sentences of 4 to 80 tokens, grouped by passage, in reading order
        self.passages: list[list[tuple[str, int]]] = []
        for text in texts.values():
            sentences = [" " + s for s in split_sentences(text) if not re.search(r"\d", s)]
            counted = [(s, n) for s, n in zip(sentences, self.count(sentences)) if 4 <= n <= 80]
            if counted:
                self.passages.append(counted)
        if self.prose_fraction > 0 and not self.passages:
            raise ValueError("texts: no usable prose sentence (digit-free, 4-80 tokens) for prose_fraction > 0")
        self._prepare_templates()
        counts = self.count(list(SHORT_SENTENCES))
        self.shorts: dict[int, list[str]] = {}
        for s, n in zip(SHORT_SENTENCES, counts):
            self.shorts.setdefault(n, []).append(s)
        if len(self.shorts) < 2:
            raise ValueError("tokenizer: the closing sentences need two different token lengths")
        self._closable = self._closing_table(64)

    # counting -------------------------------------------------------------------------------------------------
    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts of many texts (no special tokens), in one batched call."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no special tokens)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _closing_table(self, limit: int) -> dict[int, list[int]]:
        """{gap: short-sentence lengths that add up to it} for every gap up to ``limit`` that can be closed."""
        table: dict[int, list[int]] = {0: []}
        for gap in range(1, limit + 1):
            for n in sorted(self.shorts):
                if gap - n in table:
                    table[gap] = table[gap - n] + [n]
                    break
        return table

    def _prepare_templates(self) -> None:
        """Token counts of template sentences without tokenizing each one: the count of " " + sentence is the sum
        of its literal segments' counts and its slot words' counts (" " + word), because pre-tokenisation splits
        before every space and between letters and punctuation. Checked here on a sample; if it fails for this
        tokenizer, every template sentence is tokenized instead."""
        self._vocab = {"name": self.names, "place": PLACES, "object": TEMPLATE_OBJECTS, "color": COLORS,
                       "adj": ADJECTIVES, "weekday": WEEKDAYS, "topic": TOPICS, "qty": QUANTITIES}
        words = sorted({w for values in self._vocab.values() for w in values})
        self._word_tokens = dict(zip(words, self.count([" " + w for w in words])))
        self._template_parts = []
        for template in TEMPLATES:
            slots = re.findall(r"\{(\w+)\}", template)
            literals = [seg.rstrip(" ") for seg in re.split(r"\{\w+\}", " " + template)]
            self._template_parts.append((slots, sum(self.count([x for x in literals if x]))))
        sample = self._template_sentences(random.Random(0), 300)
        self._additive = [n for _, n in sample] == self.count([t for t, _ in sample])

    def _template_sentences(self, rng: random.Random, k: int) -> list[tuple[str, int]]:
        out = []
        for _ in range(k):
            i = rng.randrange(len(TEMPLATES))
            name, name2 = rng.sample(self.names, 2)
            place, place2 = rng.sample(PLACES, 2)
            values = {"name": name, "name2": name2, "place": place, "place2": place2,
                      "object": rng.choice(TEMPLATE_OBJECTS), "color": rng.choice(COLORS),
                      "adj": rng.choice(ADJECTIVES), "weekday": rng.choice(WEEKDAYS), "topic": rng.choice(TOPICS),
                      "qty": rng.choice(QUANTITIES)}
            slots, fixed = self._template_parts[i]
            out.append((" " + TEMPLATES[i].format(**values), fixed + sum(self._word_tokens[values[s]] for s in slots)))
        return out

    # pieces ---------------------------------------------------------------------------------------------------
    def templates(self, rng: random.Random, k: int, forbidden: Sequence[str] = ()) -> list[tuple[str, int]]:
        """``k`` template sentences (fewer if some contain a forbidden word) with their token counts."""
        pattern = _word_pattern(forbidden)
        out = [(t, n) for t, n in self._template_sentences(rng, k) if not (pattern and pattern.search(t))]
        if not self._additive:
            out = list(zip([t for t, _ in out], self.count([t for t, _ in out])))
        return out

    def prose_run(self, rng: random.Random, max_tokens: int, forbidden: Sequence[str] = ()) -> list[tuple[str, int]]:
        """2 to 6 consecutive prose sentences of one passage (fewer if they would pass ``max_tokens``)."""
        passage = rng.choice(self.passages)
        start = rng.randrange(len(passage))
        pattern = _word_pattern(forbidden)
        run, total = [], 0
        for s, n in passage[start: start + rng.randint(2, 6)]:
            if total + n > max_tokens:
                break
            if not (pattern and pattern.search(s)):
                run.append((s, n))
                total += n
        return run

    def fill(self, rng: random.Random, budget: int, forbidden: Sequence[str] = ()) -> list[tuple[str, int]]:
        """Distractor pieces (sentence, tokens) of exactly ``budget`` tokens in total, none containing a forbidden
        word (whole-word, case-insensitive). Any budget from 6 tokens up can be filled (and 0); a smaller one that
        no combination of closing sentences makes (1, 2 or 5 tokens for SmolLM2) raises ValueError."""
        check_int("budget", budget, 0)
        pieces: list[tuple[str, int]] = []
        remaining = budget
        pool: list[tuple[str, int]] = []
        prose_tokens = template_tokens = 0
        while remaining > 48:  # main phase: prose runs and templates in proportion
            use_prose = self.prose_fraction > 0 and (
                self.prose_fraction >= 1 or prose_tokens <= self.prose_fraction * (prose_tokens + template_tokens))
            if use_prose:
                run = self.prose_run(rng, remaining - 32, forbidden)
                pieces += run
                got = sum(n for _, n in run)
                prose_tokens += got
                remaining -= got
                if run:
                    continue
            if len(pool) < 4:
                pool += self.templates(rng, 64, forbidden)
            for _ in range(rng.randint(1, 3)):
                s, n = pool.pop()
                if n > remaining - 32:
                    break
                pieces.append((s, n))
                template_tokens += n
                remaining -= n
        for _ in range(1000):  # closing phase: templates down to a gap the short sentences can close
            while remaining > 16:
                if len(pool) < 4:
                    pool += self.templates(rng, 64, forbidden)
                fits = [i for i, (_, n) in enumerate(pool) if n <= remaining - 6]
                if not fits:
                    break
                pieces.append(pool.pop(rng.choice(fits)))
                remaining -= pieces[-1][1]
            if remaining in self._closable:
                shorts = [(rng.choice(self.shorts[n]), n) for n in self._closable[remaining]]
                for piece in shorts:  # spread the closing sentences over the document
                    pieces.insert(rng.randint(0, len(pieces)), piece)
                return pieces
            if not pieces:
                break
            s, n = pieces.pop(rng.randrange(len(pieces)))  # give one back and close again
            remaining += n
        raise ValueError(f"budget: cannot fill {budget} tokens exactly with distractor sentences")


@functools.lru_cache(maxsize=256)
def _word_pattern_cached(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _word_pattern(words: Sequence[str]) -> re.Pattern | None:
    """One regex matching any of ``words`` as a whole word, case-insensitive (None for no words)."""
    return _word_pattern_cached(tuple(sorted(set(words)))) if words else None
