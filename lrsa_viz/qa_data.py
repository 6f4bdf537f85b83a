"""Long-context question answering data: a seeded generator, JSONL I/O, user data, chat formatting with masked labels.

An example is a document of exactly ``context_tokens`` tokens (measured with the model's tokenizer) made of
distractor sentences with ``n_facts`` facts of ONE kind planted at varied depths ("The locker code of Maria is
4821."), one question about one of them ("What is the locker code of Maria?") and a short exact answer ("4821").

Every example is drawn from its own random generator seeded by ``(seed, split, index)``: a split of 5000 examples
begins with the 200 of a split of 200, and examples can be made in any order or in parallel.

Formatting: the prompt is the model's chat template around ``PROMPT_TEMPLATE``; the target is the answer followed
by the end-of-turn token. Labels are -100 everywhere except on the target tokens, so the loss covers the answer
only. Batches are RIGHT-padded (LRSA counts partitions from position 0).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .checks import check_int
from .cli import add_debug_flag, run_cli

REQUIRED_FIELDS = ("context", "question", "answer")
PROMPT_TEMPLATE = "{context}\n\nQuestion: {question}\n{instruction}"
#: the last line of the prompt unless an example names its own ``instruction`` (the task suite's set answers do)
DEFAULT_INSTRUCTION = "Answer with the exact value only."
SPLITS = ("train", "dev", "test")
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------------
# Vocabulary of the generator. Fact kinds use key phrases that no distractor template contains.

FACT_KINDS: dict[str, tuple[str, str]] = {
    # kind: (fact sentence, question)
    "locker": ("The locker code of {name} is {value}.", "What is the locker code of {name}?"),
    "extension": ("{name} can be reached at phone extension {value}.", "What is the phone extension of {name}?"),
    "badge": ("The badge number of {name} is {value}.", "What is the badge number of {name}?"),
    "parking": ("{name} parks in parking spot {value}.", "Which parking spot does {name} park in?"),
}

NAME_CANDIDATES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Julia Kevin Laura Mark Nina Oscar Paul Rachel Sam "
    "Sarah Tom Victor Walter Anna Ben Chris Daniel Eric Fiona George Helen Ian James Karen Leo Lucy Maria Mike "
    "Nick Olivia Peter Rose Steve Tina Adam Amy Andrew Brian Charles Diana Edward Ellen Emily Frank Gary Hannah "
    "Jason John Kate Linda Lisa Martin Mary Matt Megan Nancy Patrick Paula Richard Robert Ruth Ryan Simon Susan "
    "Thomas Tony Vincent William Zoe Bill Carl Dave Greg Joe Josh Ken Lee Max Ray Roy Ted"
).split()

PLACES = ("library", "kitchen", "garden", "station", "harbor", "museum", "bakery", "market", "theater", "workshop",
          "warehouse", "clinic", "school", "bridge", "lake", "forest", "gallery", "stadium", "cafe", "hotel")
OBJECTS = ("umbrella", "lamp", "bicycle", "notebook", "kettle", "ladder", "painting", "clock", "basket", "guitar",
           "map", "telescope", "blanket", "camera", "chair", "mirror", "radio", "suitcase", "vase", "whistle")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "brown")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TOPICS = ("weather", "budget", "schedule", "harvest", "election", "concert", "festival", "project", "repairs",
          "menu", "holiday", "delivery", "training", "contract", "exhibition", "survey", "inventory", "rent")
ADJECTIVES = ("quiet", "busy", "cold", "bright", "old", "new", "small", "large", "crowded", "empty", "famous",
              "strange", "narrow", "warm", "noisy", "clean")

DISTRACTORS = (
    "{name} walked to the {place} after lunch.",
    "The {place} was unusually {adj} on {weekday}.",
    "Nobody could explain why the {color} {object} was left near the {place}.",
    "{name} and {name2} talked about the {topic} for {small} minutes.",
    "A {adj} {object} had been hanging in the {place} since {year}.",
    "On {weekday}, {name} repaired the {object} that {name2} had dropped.",
    "The {topic} meeting moved from the {place} to the {place2}.",
    "{name} bought {small} {color} {object_plural} at the {place}.",
    "It rained for {small} hours before the {place} opened.",
    "The old {object} in the {place} still works, according to {name}.",
    "{name} wrote a long note about the {topic} and left it in the {place}.",
    "People say the {place} looked {adj} in {year}.",
    "The {color} door of the {place} was painted again last {weekday}.",
    "{name} prefers the {place} to the {place2} when the weather is {adj}.",
    "The report on the {topic} was {small} pages long.",
    "{name2} lent a {object} to {name} for the {topic}.",
    "Every {weekday} the {place} serves tea to {small} visitors.",
    "The {topic} was postponed because the {object} was missing.",
    "{name} remembered that the {place} had a {color} {object}.",
    "The bus to the {place} leaves every {small} minutes.",
    "In {year} the {place} hosted a {adj} {topic} event.",
    "{name} found a {color} {object} under a bench near the {place}.",
    "The {place} and the {place2} share a {adj} courtyard.",
    "{name} spent {small} days planning the {topic}.",
)


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("ch", "sh", "s", "x")) else "s")


# --------------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class QAConfig:
    """What the generator makes.

    Attributes:
        context_tokens: exact length of every document in tokens of the model's tokenizer. Accepted: 64 to 32768
            (the issue asks for 1k to 8k; the quick CPU profile uses a few hundred).
        n_facts: facts of one kind planted per document, one of them asked about. Accepted: 1 to 32.
        answer_digits: digits of each planted value (the answer). Accepted: 1 to 12.
        kinds: which fact kinds to draw from (keys of FACT_KINDS).
    """

    context_tokens: int = 2048
    n_facts: int = 6
    answer_digits: int = 4
    kinds: tuple[str, ...] = tuple(FACT_KINDS)

    def __post_init__(self) -> None:
        for name, lo, hi in (("context_tokens", 64, 32768), ("n_facts", 1, 32), ("answer_digits", 1, 12)):
            value = getattr(self, name)
            check_int(name, value, lo, hi)
        if not self.kinds or any(k not in FACT_KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {sorted(FACT_KINDS)}, got {self.kinds!r}")


class QAGenerator:
    """Deterministic generator of long-context QA examples for one tokenizer.

    Names are restricted to those that are ONE token after a space, so every question of a kind has the same
    length, and every document has exactly ``config.context_tokens`` tokens: a batch of examples of one kind
    has one prompt length and needs no padding (chunk-by-chunk prefill takes unpadded batches only).
    """

    def __init__(self, tokenizer, config: QAConfig | None = None, seed: int = 0):
        self.tokenizer = tokenizer
        self.config = config or QAConfig()
        self.seed = seed
        self.names = [n for n in dict.fromkeys(NAME_CANDIDATES) if len(self._encode(" " + n)) == 1]
        if len(self.names) < self.config.n_facts + 2:
            raise ValueError(
                f"tokenizer: only {len(self.names)} candidate names are single tokens; n_facts={self.config.n_facts} "
                f"needs at least {self.config.n_facts + 2}"
            )
        intro = self._intro(random.Random(0))
        fact_len = max(self._count([" " + FACT_KINDS[k][0].format(name=n, value="9" * self.config.answer_digits)
                                    for k in self.config.kinds for n in self.names[:3]]))
        need = len(self._encode(intro)) + self.config.n_facts * fact_len + 64
        if self.config.context_tokens < need:
            raise ValueError(
                f"context_tokens must be at least {need} to hold {self.config.n_facts} facts and distractors, "
                f"got {self.config.context_tokens}"
            )

    # token counting --------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _count(self, texts: Sequence[str]) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # fast tokenizers: skip the Python wrapper
        if backend is not None:
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    # sentences -------------------------------------------------------------------------------------------------
    @staticmethod
    def _intro(rng: random.Random) -> str:
        return f"These are the notes kept at the {rng.choice(ADJECTIVES)} {rng.choice(PLACES)} office."

    def _distractor(self, rng: random.Random) -> str:
        name, name2 = rng.sample(self.names, 2)
        place, place2 = rng.sample(PLACES, 2)
        obj = rng.choice(OBJECTS)
        return " " + rng.choice(DISTRACTORS).format(
            name=name, name2=name2, place=place, place2=place2, object=obj, object_plural=plural(obj),
            color=rng.choice(COLORS), adj=rng.choice(ADJECTIVES), weekday=rng.choice(WEEKDAYS),
            topic=rng.choice(TOPICS), year=rng.randint(1900, 2024), small=rng.randint(2, 60),
        )

    def _fill(self, rng: random.Random, budget: int, forbidden: Sequence[str]) -> list[tuple[str, int]]:
        """(sentence, token count) of distractors of exactly ``budget`` tokens in total (none containing a forbidden
        string)."""
        if budget <= 0:
            raise RuntimeError(f"no room for distractors: budget {budget} tokens")  # pragma: no cover
        pool: list[tuple[str, int]] = []  # candidate sentences with their token counts, tokenized in one batch
        chosen: list[tuple[str, int]] = []
        remaining = budget
        for _ in range(1000):
            if len(pool) < 32:
                fresh = [s for s in (self._distractor(rng) for _ in range(budget // 8 + 64))
                         if not any(f in s for f in forbidden)]
                pool += list(zip(fresh, self._count(fresh)))
                shortest = min(n for _, n in pool)
            # greedy pass: take sentences that fit and leave room for at least one more (or fill the gap exactly)
            rest = []
            for s, n in pool:
                if n == remaining or n <= remaining - shortest:
                    chosen.append((s, n))
                    remaining -= n
                else:
                    rest.append((s, n))
            pool = rest
            if remaining == 0:
                return chosen
            if chosen:  # the gap is smaller than any sentence left: give one back at random and try again
                pool.append(chosen.pop(rng.randrange(len(chosen))))
                remaining += pool[-1][1]
        raise RuntimeError(f"cannot fill {budget} tokens with distractor sentences")  # pragma: no cover

    # examples --------------------------------------------------------------------------------------------------
    def example(self, split: str, index: int) -> dict:
        """Example ``index`` of ``split``: a dict with context, question, answer and metadata (see README card)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        check_int("index", index, 0)
        cfg = self.config
        rng = random.Random(f"lrsa-viz-qa/{self.seed}/{split}/{index}")
        kind = rng.choice(cfg.kinds)
        fact_template, question_template = FACT_KINDS[kind]
        names = rng.sample(self.names, cfg.n_facts)
        values: list[str] = []
        while len(values) < cfg.n_facts:
            v = str(rng.randint(10 ** (cfg.answer_digits - 1), 10 ** cfg.answer_digits - 1))
            if all(v not in w and w not in v for w in values):
                values.append(v)
        facts = [" " + fact_template.format(name=n, value=v) for n, v in zip(names, values)]
        intro = self._intro(rng)
        fact_lengths = self._count([intro] + facts)
        distractors = self._fill(rng, cfg.context_tokens - sum(fact_lengths), forbidden=values)
        # plant fact i in the i-th of n_facts equal stretches of the distractors: varied depths, whole document
        n_d = len(distractors)
        slots = [rng.randint(i * n_d // cfg.n_facts, (i + 1) * n_d // cfg.n_facts) for i in range(cfg.n_facts)]
        order = list(range(cfg.n_facts))
        rng.shuffle(order)  # which name sits at which depth
        pieces: list[tuple[str, int, int | None]] = [(intro, fact_lengths[0], None)]  # (text, tokens, fact index)
        for i, (d, n) in enumerate(distractors + [("", 0)]):
            for j, slot in enumerate(slots):
                if slot == i:
                    pieces.append((facts[order[j]], fact_lengths[1 + order[j]], order[j]))
            if d:
                pieces.append((d, n, None))
        fact_depth, start = {}, 0
        for _, n, fact in pieces:
            if fact is not None:
                fact_depth[fact] = start / cfg.context_tokens
            start += n
        asked = rng.randrange(cfg.n_facts)
        context = "".join(p for p, _, _ in pieces)
        n_tokens = len(self._encode(context))
        if n_tokens != cfg.context_tokens:  # the sentences are tokenized apart; they must add up exactly
            raise RuntimeError(f"generator bug: document has {n_tokens} tokens, expected {cfg.context_tokens}")
        return {
            "id": f"{split}-{index:06d}",
            "context": context,
            "question": question_template.format(name=names[asked]),
            "answer": values[asked],
            "kind": kind,
            "context_tokens": n_tokens,
            "depth": round(fact_depth[asked], 4),
            "facts": [{"name": n, "value": v, "depth": round(fact_depth[i], 4)}
                      for i, (n, v) in enumerate(zip(names, values))],
        }

    def split(self, split: str, size: int, start: int = 0, progress: bool = False, workers: int = 1) -> list[dict]:
        """Examples ``start .. start + size - 1`` of ``split``; ``workers`` > 1 makes them in as many processes
        (the result does not depend on it)."""
        check_int("size", size, 0)
        check_int("workers", workers, 1)
        from tqdm.auto import tqdm

        indices = range(start, start + size)
        bar = dict(desc=f"generate {split}", total=size, disable=not progress)
        if workers == 1 or size < 2 * workers:
            return [self.example(split, i) for i in tqdm(indices, **bar)]
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: no re-import per worker
        with mp.get_context(method).Pool(workers, _init_worker, (self.tokenizer, self.config, self.seed)) as pool:
            jobs = pool.imap(_worker_example, [(split, i) for i in indices], chunksize=8)
            return list(tqdm(jobs, **bar))


_WORKER: QAGenerator | None = None


def _init_worker(tokenizer, config: QAConfig, seed: int) -> None:
    global _WORKER
    _WORKER = QAGenerator(tokenizer, config, seed)


def _worker_example(job: tuple[str, int]) -> dict:
    return _WORKER.example(*job)


# --------------------------------------------------------------------------------------------------------------
# JSONL and user data


def write_jsonl(path: str | Path, examples: Iterable[dict]) -> Path:
    """Write one JSON object per line (UTF-8). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return path


def check_example(ex: object, where: str) -> dict:
    """Raise ValueError (naming ``where``) unless ``ex`` is a dict with non-empty string context/question/answer."""
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {REQUIRED_FIELDS}, got {type(ex).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in ex:
            raise ValueError(f"{where}: missing field {field!r} (required: {', '.join(REQUIRED_FIELDS)})")
        if not isinstance(ex[field], str) or not ex[field].strip():
            raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {ex[field]!r:.60}")
    if "instruction" in ex and (not isinstance(ex["instruction"], str) or not ex["instruction"].strip()):
        raise ValueError(f"{where}: field 'instruction' (optional) must be a non-empty string, got {ex['instruction']!r:.60}")
    return ex


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read examples from a JSONL file (UTF-8, an optional byte-order mark); blank lines are skipped.

    Raises:
        ValueError naming the file and the line number of EVERY malformed line (up to 20 listed): a line that is
        not UTF-8, not JSON, or lacks non-empty string context/question/answer. Nothing is returned then, so no
        example is silently dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} is not a file")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an integer >= 0 or None, got {limit!r}")
    out: list[dict] = []
    problems: list[str] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problems.append(f"{path}, line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte "
                                f"{err.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                ex = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                problems.append(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.pos + 1})")
                continue
            try:
                out.append(check_example(ex, f"{path}, line {number}"))
            except ValueError as err:
                problems.append(str(err))
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        listed = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{len(problems)} malformed line(s), nothing loaded; fix them and load again:\n{listed}")
    return out


def load_examples(source: str | Path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Examples from a JSONL file or a local `datasets` directory (``datasets.load_from_disk``).

    Args:
        source: ``*.jsonl`` file, or a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        split: for a DatasetDict, which split to read.
        limit: read at most this many examples.
    Every example must have non-empty string fields context, question and answer (others are kept).
    """
    source = Path(source)
    if source.is_file():
        return read_jsonl(source, limit=limit)
    if not source.is_dir():
        raise FileNotFoundError(f"source: {source} is neither a JSONL file nor a datasets directory")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"source: reading the datasets directory {source} needs the `datasets` package "
                          "(pip install datasets); or export it as JSONL with context/question/answer fields") from None
    data = datasets.load_from_disk(str(source))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split: {source} holds the splits {sorted(data)}; pass one of them, got {split!r}")
        data = data[split]
    n = len(data) if limit is None else min(limit, len(data))
    return [check_example(dict(data[i]), f"{source}, row {i}") for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# Chat formatting and batches


def prompt_text(tokenizer, example: dict) -> str:
    """The full prompt string (chat template, generation prompt appended) for one example."""
    content = PROMPT_TEMPLATE.format(context=example["context"], question=example["question"],
                                     instruction=example.get("instruction") or DEFAULT_INSTRUCTION)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def _batch_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (a fast tokenizer spreads it over the CPU cores)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_prompts(tokenizer, examples: Sequence[dict]) -> list[tuple[list[int], int]]:
    """`encode_prompt` of many examples, tokenized in batched calls.

    Examples that carry their document's token ids (``context_ids``, written by `lrsa_viz.tasks`) are not
    tokenized again: the prompt is the chat header's ids + ``context_ids`` + the ids of the question part
    (pre-tokenisation splits at the two boundaries, a newline after the header and "\\n\\n" after the document).
    The first such prompt is checked against a full tokenization; if they differ, every prompt is tokenized whole.
    """
    if not examples:
        return []
    texts = [prompt_text(tokenizer, ex) for ex in examples]
    cuts = [(text.index(ex["context"]), text.index(ex["context"]) + len(ex["context"])) for text, ex in zip(texts, examples)]
    if all(isinstance(ex.get("context_ids"), list) for ex in examples):
        heads = _batch_ids(tokenizer, [text[:a] for text, (a, _) in zip(texts, cuts)])
        tails = _batch_ids(tokenizer, [text[b:] for text, (_, b) in zip(texts, cuts)])
        out = [(h + ex["context_ids"] + t, len(h) + len(ex["context_ids"])) for h, t, ex in zip(heads, tails, examples)]
        if out[0][0] == _batch_ids(tokenizer, texts[:1])[0]:
            return out
    ids = _batch_ids(tokenizer, texts)
    prefixes = _batch_ids(tokenizer, [text[:b] for text, (_, b) in zip(texts, cuts)])
    # context_end: tokens shared by the prefix and the prompt (all of the prefix unless a merge crosses the boundary)
    return [(i, _common_prefix(p, i)) for i, p in zip(ids, prefixes)]


def encode_prompt(tokenizer, example: dict) -> tuple[list[int], int]:
    """Token ids of the prompt and the length of its prefix that ends with the context.

    Returns:
        (prompt ids [N], context_end): ``ids[:context_end]`` is the chat header plus the document; the rest is the
        question and the assistant header. One-shot compression of the context compresses ``ids[:context_end]``.
    """
    return encode_prompts(tokenizer, [example])[0]


def encode_target(tokenizer, answer: str) -> list[int]:
    """Token ids the model must produce: the answer followed by the end-of-turn (eos) token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: needs an eos_token (the end-of-turn token) to mark the end of the answer")
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_examples(tokenizer, examples: Sequence[dict]) -> list[dict]:
    """Training features of many examples (batched tokenization): see `encode_example`."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: needs an eos_token (the end-of-turn token) to mark the end of the answer")
    if all(isinstance(ex.get("context_ids"), list) for ex in examples):
        prompts = [ids for ids, _ in encode_prompts(tokenizer, examples)]
    else:
        prompts = _batch_ids(tokenizer, [prompt_text(tokenizer, ex) for ex in examples])
    targets = [t + [tokenizer.eos_token_id] for t in _batch_ids(tokenizer, [ex["answer"] for ex in examples])]
    return [{"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t} for p, t in zip(prompts, targets)]


def encode_example(tokenizer, example: dict) -> dict:
    """Training features: ``input_ids`` (prompt + target) and ``labels`` (-100 on the prompt, ids on the target)."""
    return encode_examples(tokenizer, [example])[0]


def collate(features: Sequence[dict], pad_token_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch from `encode_example` features.

    Args:
        width: pad every row to this many tokens (None: the longest feature). A fixed width per length bucket keeps
            compiled attention kernels (FlexAttention) to one shape per bucket instead of one per batch.
    Returns:
        input_ids [B, T] (pad_token_id after the end), attention_mask [B, T] (1 = real token), labels [B, T]
        (-100 on prompt and padding).
    """
    if not features:
        raise ValueError("features: need at least one example to make a batch")
    longest = max(len(f["input_ids"]) for f in features)
    if width is None:
        width = longest
    elif isinstance(width, bool) or not isinstance(width, int) or width < longest:
        raise ValueError(f"width must be an integer >= the longest feature ({longest} tokens), got {width!r}")
    ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------------
# CLI


def generate_splits(tokenizer, out_dir: str | Path, sizes: dict[str, int], config: QAConfig, seed: int,
                    progress: bool = True, workers: int = 1) -> dict[str, Path]:
    """Write ``{split}.jsonl`` for every split of ``sizes`` into ``out_dir``. Returns the paths."""
    gen = QAGenerator(tokenizer, config, seed=seed)
    return {split: write_jsonl(Path(out_dir) / f"{split}.jsonl",
                               gen.split(split, n, progress=progress, workers=workers))
            for split, n in sizes.items() if n > 0}


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer of the default model (or of ``name_or_path``), without loading the weights."""
    from transformers import AutoTokenizer

    from .models import _fix_chat_tokens, resolve_model_source

    source = resolve_model_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.eos_token != "<|im_end|>" and "<|im_end|>" in tokenizer.get_vocab():
        _fix_chat_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lrsa_viz.qa_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for train.jsonl, dev.jsonl, test.jsonl")
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--dev", type=int, default=50)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--n-facts", type=int, default=6)
    p.add_argument("--answer-digits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes that make examples (same result for any number)")
    p.add_argument("--model", default=None, help="tokenizer source (default: $LRSA_VIZ_MODEL or SmolLM2-135M-Instruct)")
    add_debug_flag(p)
    a = p.parse_args(argv)
    config = QAConfig(context_tokens=a.context_tokens, n_facts=a.n_facts, answer_digits=a.answer_digits)
    paths = generate_splits(load_tokenizer(a.model), a.out, {"train": a.train, "dev": a.dev, "test": a.test},
                            config, a.seed, workers=a.workers)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
