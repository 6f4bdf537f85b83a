"""The task suite: exact document lengths, determinism, what is planted and asked, metrics, the haystack."""
import random
import re

import pytest

from lrsa_viz.qa_data import encode_prompts
from lrsa_viz.tasks import (HELD_OUT_PASSAGES, TASKS, Haystack, make_task, score, set_f1, task_metric, task_names)
from lrsa_viz.tasks.haystack import haystack_texts, split_sentences

CONTEXT = 600  # small documents: every task fits its needles


@pytest.fixture(scope="module")
def haystack(tok):
    return Haystack(tok)


@pytest.fixture(scope="module")
def splits(tok, haystack):
    return {name: make_task(name, tok, CONTEXT, seed=0, haystack=haystack).split("test", 12) for name in TASKS}


def strip_needles(ex):
    text = ex["context"]
    for needle in ex["needles"]:
        assert needle["text"] in text
        text = text.replace(needle["text"], "", 1)
    return text


@pytest.mark.parametrize("name", list(TASKS))
def test_documents_have_the_exact_length_and_the_needles(tok, splits, name):
    for ex in splits[name]:
        assert len(tok(ex["context"], add_special_tokens=False).input_ids) == CONTEXT == ex["context_tokens"]
        assert ex["task"] == name and ex["metric"] == task_metric(name)
        assert score(ex["metric"], ex["answer"], ex["answer"]) == 1.0
        assert not re.search(r"\d", strip_needles(ex)), "digits appear only in needles"
        asked = [n for n in ex["needles"] if n["asked"]]
        assert asked and all(0 <= n["depth"] < 1 for n in ex["needles"])
        assert ex["depth"] == pytest.approx(sum(n["depth"] for n in asked) / len(asked), abs=1e-3)
        for part in ex["retrieve"]:
            assert part in ex["answer"] and any(part in n["text"] for n in asked)
        unique = [n for n in ex["needles"] if sum(m["text"] == n["text"] for m in ex["needles"]) == 1]
        by_depth = sorted(unique, key=lambda n: n["depth"])
        assert by_depth == sorted(unique, key=lambda n: ex["context"].index(n["text"])), "depth follows position"


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_and_prefix_stable(tok, haystack, splits, name):
    task = make_task(name, tok, CONTEXT, seed=0, haystack=haystack)
    assert task.example("test", 3) == splits[name][3]
    assert task.split("test", 4, start=8) == splits[name][8:12]
    assert make_task(name, tok, CONTEXT, seed=1, haystack=haystack).example("test", 3) != splits[name][3]
    assert task.example("train", 3) != splits[name][3]


def test_workers_give_the_same_examples(tok, splits):
    task = make_task("variable_tracking", tok, CONTEXT, seed=0)
    assert task.split("test", 12, workers=2) == splits["variable_tracking"]
    own = Haystack(tok, texts={"one text": "The tide came in over the grey stones of the harbour wall. " * 40})
    task = make_task("variable_tracking", tok, CONTEXT, seed=0, haystack=own)  # a user's haystack reaches workers
    assert task.split("test", 4, workers=2) == task.split("test", 4) != splits["variable_tracking"][:4]


@pytest.mark.parametrize("name", [n for n in TASKS if n != "single_needle"])
def test_one_prompt_length_per_task(tok, splits, name):
    """Chunk-by-chunk prefill batches unpadded prompts: a task's prompts must share one length."""
    assert len({(len(ids), end) for ids, end in encode_prompts(tok, splits[name])}) == 1


def test_single_needle_is_todays_task(splits):
    for ex in splits["single_needle"]:
        assert len(ex["needles"]) == 6 and re.fullmatch(r"\d{4}", ex["answer"])
        assert ex["instruction"] == "Answer with the exact value only."
        name = ex["question"].rstrip("?").split()[-1]
        asked = [n for n in ex["needles"] if n["asked"]]
        assert len(asked) == 1 and name in asked[0]["text"] and ex["answer"] in asked[0]["text"]


def test_multi_key_keys_are_near_duplicates(splits):
    for ex in splits["multi_key"]:
        key = ex["key"]
        assert ex["question"] == f"What is the special magic number for {key}?"
        keys = [re.match(r"The special magic number for (.*) is \d+\.", n["text"]).group(1) for n in ex["needles"]]
        assert keys.count(key) == 1
        near = [k for k in keys if sum(a != b for a, b in zip(k.split(), key.split())) == 1]
        assert len(near) == 4


def test_multi_value_asks_every_value_of_one_key(splits):
    for ex in splits["multi_value"]:
        values = [re.search(r"(\d+)\.$", n["text"]).group(1) for n in ex["needles"] if ex["key"] + " is" in n["text"]]
        assert sorted(values) == sorted(ex["answer"].split(", ")) and len(values) == 3


def test_multi_query_asks_several_keys(splits):
    for ex in splits["multi_query"]:
        for key, value in zip(ex["keys"], ex["answer"].split(", ")):
            assert f"The special magic number for {key} is {value}." in ex["context"]


def test_variable_tracking_chain_resolves_to_the_answer(splits):
    for ex in splits["variable_tracking"]:
        holds: dict[str, str] = {}
        for needle in ex["needles"]:  # resolve the assignments in document order
            name, rhs = re.fullmatch(r"VAR (\w+) = (.+)\.", needle["text"]).groups()
            holds[name] = holds[rhs[4:]] if rhs.startswith("VAR ") else rhs
        assert sorted(n for n, v in holds.items() if v == ex["value"]) == sorted(ex["answer"].split(", "))
        assert len(ex["answer"].split(", ")) == 4


def test_frequent_word_counts(splits):
    for ex in splits["frequent_word"]:
        counts = ex["counts"]
        for word, c in counts.items():
            assert len(re.findall(rf"\b{word}\b", ex["context"], flags=re.IGNORECASE)) == c, "no distractor has it"
        assert max(counts, key=counts.get) == ex["answer"]
        assert sorted(counts.values())[-2] <= counts[ex["answer"]] - 2


def test_metrics():
    assert set_f1("4821, 3390 and 7712", "7712, 4821, 3390") == 1.0
    assert set_f1("4821", "4821, 3390") == pytest.approx(2 / 3)
    assert set_f1("4821, 1111", "4821, 3390") == 0.5
    assert set_f1("", "4821") == 0.0 and set_f1("QKZ, RTP", "qkz, rtp") == 1.0
    assert score("exact_match", "The lantern.", "lantern") == 1.0
    with pytest.raises(ValueError, match="metric must be one of"):
        score("bleu", "a", "a")


def test_haystack_fills_every_budget_exactly(haystack):
    rng = random.Random(0)
    closable = set(haystack._closable)  # gaps the short closing sentences can fill (SmolLM2: 3 and 4 tokens)
    for budget in list(range(0, 80)) + [333, 1000]:
        if budget < 16 and budget not in closable:
            with pytest.raises(ValueError, match=f"cannot fill {budget} tokens"):
                haystack.fill(rng, budget)
            continue
        pieces = haystack.fill(rng, budget)
        assert sum(n for _, n in pieces) == budget
        if pieces:
            assert haystack.count(["".join(p for p, _ in pieces)])[0] == budget
    assert {1, 2, 5}.isdisjoint(closable) and set(range(6, 65)) <= closable


def test_haystack_mixes_real_prose(tok):
    texts = haystack_texts()
    assert not set(texts) & set(HELD_OUT_PASSAGES), "held-out prose never enters a document"
    prose = {s for t in texts.values() for s in split_sentences(t)}
    for fraction in (0.0, 0.5, 1.0):
        pieces = Haystack(tok, prose_fraction=fraction).fill(random.Random(1), 3000)
        share = sum(n for p, n in pieces if p.strip() in prose) / 3000
        assert abs(share - fraction) < 0.15, (fraction, share)


def test_split_sentences():
    assert split_sentences('It is. "Is it?" he said.\n\nYes!  No') == ["It is.", '"Is it?"', "he said.", "Yes!", "No"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tok: make_task("needle", tok), "task must be one of"),
        (lambda tok: make_task("multi_key", tok, 100), r"context_tokens must be an integer in \[192, 32768\]"),
        (lambda tok: make_task("frequent_word", tok, 200).example("test", 0), "context_tokens must be at least"),
        (lambda tok: make_task("multi_key", tok, 600, near=8), r"near must be an integer in \[0, n_needles - 1"),
        (lambda tok: make_task("multi_query", tok, 600, n_queries=9), r"n_queries must be an integer in \[2, 4\]"),
        (lambda tok: make_task("variable_tracking", tok, 600, hops=0), r"hops must be an integer in \[1, 8\]"),
        (lambda tok: make_task("single_needle", tok, 600, seed=-1), "seed must be an integer >= 0"),
        (lambda tok: make_task("single_needle", tok, 600).example("val", 0), "split must be one of"),
        (lambda tok: Haystack(tok, prose_fraction=2), r"prose_fraction must be a number in \[0, 1\]"),
        (lambda tok: make_task("multi_key", tok, 600).check_near_count("near", 10**6), "near-duplicates of a key"),
    ],
)
def test_bad_input(tok, call, match):
    with pytest.raises(ValueError, match=match):
        call(tok)


def test_registry():
    assert task_names() == ["single_needle", "multi_key", "multi_value", "multi_query", "variable_tracking",
                            "frequent_word"]


def test_prompts_from_context_ids_equal_a_full_tokenization(tok, splits):
    """Documents carry their token ids: prompts and training features built from them are exactly the full
    tokenization's; wrong ids are caught by the check on the first prompt (and the full tokenization is used)."""
    from lrsa_viz.qa_data import encode_examples

    for name in TASKS:
        examples = splits[name][:4]
        plain = [{k: v for k, v in ex.items() if k != "context_ids"} for ex in examples]
        assert encode_prompts(tok, examples) == encode_prompts(tok, plain)
        assert encode_examples(tok, examples) == encode_examples(tok, plain)
    broken = [dict(ex, context_ids=ex["context_ids"][:-1]) for ex in splits["multi_key"][:2]]
    assert encode_prompts(tok, broken) == encode_prompts(tok, [{k: v for k, v in ex.items() if k != "context_ids"}
                                                               for ex in broken])
