"""The long-context QA generator, JSONL / user data and chat formatting with answer-only labels."""
import json
import sys
from pathlib import Path

import pytest
import torch

from lrsa_viz.qa_data import (FACT_KINDS, IGNORE_INDEX, QAConfig, QAGenerator, collate, encode_example, encode_prompt,
                              load_examples, read_jsonl, write_jsonl)

ROOT = Path(__file__).resolve().parents[1]
QA_DIR = ROOT / "data" / "qa"


@pytest.fixture(scope="module")
def short(tok):
    return QAGenerator(tok, QAConfig(context_tokens=320, n_facts=4), seed=3)


@pytest.mark.parametrize("n_tokens", [256, 1024])
def test_documents_have_the_exact_token_count_and_one_asked_fact(tok, n_tokens):
    gen = QAGenerator(tok, QAConfig(context_tokens=n_tokens, n_facts=5), seed=1)
    for ex in gen.split("train", 6):
        assert len(tok(ex["context"], add_special_tokens=False).input_ids) == n_tokens == ex["context_tokens"]
        assert len(ex["facts"]) == 5
        values = [f["value"] for f in ex["facts"]]
        assert len(set(values)) == 5 and ex["answer"] in values
        assert all(len(v) == 4 and v.isdigit() for v in values)
        for f in ex["facts"]:  # every planted value occurs exactly once, at its recorded depth
            assert ex["context"].count(f["value"]) == 1
            assert 0 <= f["depth"] < 1
        asked = next(f for f in ex["facts"] if f["value"] == ex["answer"])
        assert asked["name"] in ex["question"] and asked["depth"] == ex["depth"]
        fact_template, question_template = FACT_KINDS[ex["kind"]]
        assert fact_template.format(name=asked["name"], value=ex["answer"]) in ex["context"]
        assert ex["question"] == question_template.format(name=asked["name"])


def test_depths_are_varied(tok):
    gen = QAGenerator(tok, QAConfig(context_tokens=1024, n_facts=6), seed=0)
    depths = sorted(f["depth"] for ex in gen.split("dev", 5) for f in ex["facts"])
    assert depths[0] < 0.2 and depths[-1] > 0.8, depths
    asked = [ex["depth"] for ex in gen.split("test", 20)]
    assert min(asked) < 0.35 and max(asked) > 0.65, asked


def test_generator_is_deterministic_and_prefix_stable(tok, short):
    a = short.split("train", 5)
    assert a == QAGenerator(tok, QAConfig(context_tokens=320, n_facts=4), seed=3).split("train", 8)[:5]
    assert short.split("train", 2, start=3) == a[3:5]
    assert a != QAGenerator(tok, QAConfig(context_tokens=320, n_facts=4), seed=4).split("train", 5)
    assert a[0]["context"] != short.example("test", 0)["context"]  # splits are drawn apart


def test_parallel_generation_gives_the_same_examples(short):
    assert short.split("dev", 6, workers=2) == short.split("dev", 6)


def test_prompts_of_one_kind_have_one_length(tok, short):
    lengths = {}
    for ex in short.split("train", 24):
        ids, context_end = encode_prompt(tok, ex)
        lengths.setdefault(ex["kind"], set()).add((len(ids), context_end))
    assert len(lengths) >= 2 and all(len(v) == 1 for v in lengths.values()), lengths


def test_bad_generator_arguments(tok):
    with pytest.raises(ValueError, match="context_tokens must be an integer in"):
        QAConfig(context_tokens=10)
    with pytest.raises(ValueError, match="n_facts"):
        QAConfig(n_facts=0)
    with pytest.raises(ValueError, match="kinds must be"):
        QAConfig(kinds=("weather",))
    with pytest.raises(ValueError, match="context_tokens must be at least"):
        QAGenerator(tok, QAConfig(context_tokens=100, n_facts=8))
    gen = QAGenerator(tok, QAConfig(context_tokens=256))
    with pytest.raises(ValueError, match="split must be one of"):
        gen.example("val", 0)
    with pytest.raises(ValueError, match="index must be"):
        gen.example("train", -1)


def test_labels_cover_the_answer_and_end_of_turn_only(tok, short):
    ex = short.example("train", 0)
    f = encode_example(tok, ex)
    prompt, _ = encode_prompt(tok, ex)
    assert f["input_ids"][:len(prompt)] == prompt
    supervised = [t for t in f["labels"] if t != IGNORE_INDEX]
    assert tok.decode(supervised) == ex["answer"] + tok.eos_token
    assert f["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert ex["question"] in text


def test_context_end_splits_document_from_question(tok, short):
    ex = short.example("dev", 1)
    ids, context_end = encode_prompt(tok, ex)
    head, tail = tok.decode(ids[:context_end]), tok.decode(ids[context_end:])
    assert head.endswith(ex["context"]) and ex["question"] in tail and ex["context"][-20:] not in tail


def test_collate_pads_on_the_right(tok, short):
    feats = [encode_example(tok, ex) for ex in short.split("train", 8)]
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1, "need examples of different lengths"
    batch = collate(feats, tok.pad_token_id)
    assert batch["input_ids"].shape == (8, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][i, :n].tolist() == feats[i]["input_ids"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)
    wide = collate(feats, tok.pad_token_id, width=max(lengths) + 5)
    assert wide["input_ids"].shape == (8, max(lengths) + 5)
    assert torch.equal(wide["input_ids"][:, :max(lengths)], batch["input_ids"])
    assert (wide["labels"][:, -5:] == IGNORE_INDEX).all() and (wide["attention_mask"][:, -5:] == 0).all()
    with pytest.raises(ValueError, match="width must be an integer >= the longest feature"):
        collate(feats, tok.pad_token_id, width=max(lengths) - 1)


def test_jsonl_round_trip_and_line_numbers_in_errors(tmp_path, short):
    exs = short.split("test", 3)
    path = write_jsonl(tmp_path / "x.jsonl", exs)
    assert read_jsonl(path) == exs
    assert read_jsonl(path, limit=2) == exs[:2]
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n\n" + '{"context": "c", "question": "q"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: not valid JSON"):
        read_jsonl(bad)
    bad.write_text(lines[0] + "\n" + json.dumps({"context": "c", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: missing field 'answer'"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"context": "c", "question": "q", "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: field 'answer' must be a non-empty string"):
        read_jsonl(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        read_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="neither a JSONL file"):
        load_examples(tmp_path / "missing")


def test_user_jsonl_with_extra_fields(tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_text(json.dumps({"context": "The sky is green.", "question": "What colour is the sky?",
                                "answer": "green", "source": "me"}) + "\n")
    assert load_examples(path)[0]["source"] == "me"


def test_datasets_directory_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_examples(tmp_path)


def test_datasets_directory(tmp_path, short):
    datasets = pytest.importorskip("datasets")
    exs = short.split("train", 3)
    rows = [{k: ex[k] for k in ("context", "question", "answer")} for ex in exs]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd", split="train") == rows
    with pytest.raises(ValueError, match="holds the splits"):
        load_examples(tmp_path / "dd", split="test")


def test_committed_splits_are_what_the_generator_makes(tok):
    card = (QA_DIR / "README.md").read_text()
    for split in ("train", "dev", "test"):
        rows = read_jsonl(QA_DIR / f"{split}.jsonl")
        assert f"`{split}.jsonl` | {len(rows)}" in card
        cfg = QAConfig(context_tokens=rows[0]["context_tokens"], n_facts=len(rows[0]["facts"]))
        gen = QAGenerator(tok, cfg, seed=0)
        for i in (0, len(rows) - 1):
            assert gen.example(split, i) == rows[i]
    test_ids = {r["context"] for r in read_jsonl(QA_DIR / "test.jsonl")}
    assert not test_ids & {r["context"] for r in read_jsonl(QA_DIR / "train.jsonl")}
    assert len(test_ids) >= 200
