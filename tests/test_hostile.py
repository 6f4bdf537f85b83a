"""Hostile input across the public API: every bad input gets a clear error naming the parameter (or a documented
warning), never NaN, a silent fallback or a hang. The data loader and CLIs have their own section below."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrsa_viz import (LagConfig, LagKVCache, chunked_prefill, compress_once, compressed_generate, enable_lrsa,
                      keep_mask, lagkv_keep_indices, lagkv_scores, load_model, lrsa, lrsa_visibility, tiny_model)
from lrsa_viz.cache import LagKVLayer

CFG = LagConfig(2, 4, 0.5)


def kv(n=30, b=1, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


@pytest.fixture
def small_positions_model():
    """A tiny Llama whose RoPE is only trained for 64 positions."""
    model = tiny_model(seed=1)
    model.config.max_position_embeddings = 64
    return model


# --- NaN / inf in keys and values: a ValueError that says where, for every entry point that scores -------------

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("which", ["keys", "values"])
@pytest.mark.parametrize(
    "entry",
    [lagkv_scores, lagkv_keep_indices, keep_mask, lrsa_visibility, compress_once],
    ids=lambda f: f.__name__,
)
def test_non_finite_keys_values_raise(entry, which, bad):
    keys, values = kv()
    target = keys if which == "keys" else values
    target[0, 1, 13, 3] = bad
    with pytest.raises(ValueError, match=rf"{which} contain NaN or inf \(first at batch 0, head 1, position 13\)"):
        entry(keys, values, CFG)


def test_non_finite_in_cache_update_raises():
    keys, values = kv()
    layer = LagKVLayer(CFG)
    layer.update(keys[:, :, :20], values[:, :, :20])
    values[0, 0, 25, 0] = float("nan")
    with pytest.raises(ValueError, match="values contain NaN or inf"):
        layer.update(keys[:, :, 20:], values[:, :, 20:])


def test_non_finite_model_input_under_lrsa_raises_not_nan(tiny):
    """Dense attention turns a NaN embedding into NaN logits silently; LRSA names the problem instead."""
    embeds = tiny.model.embed_tokens(torch.zeros(1, 30, dtype=torch.long)).detach().clone()
    embeds[0, 5, 0] = float("nan")
    with torch.no_grad():
        assert not torch.isfinite(tiny(inputs_embeds=embeds).logits).all()  # the dense behaviour we improve on
        with lrsa(tiny, CFG), pytest.raises(ValueError, match="keys contain NaN or inf .* position 5"):
            tiny(inputs_embeds=embeds)


def test_finite_extremes_are_fine():
    """Huge but finite values and constant channels give finite scores and a full-size selection."""
    keys, values = kv()
    keys[..., 0] = 1e30
    values[..., 1] = -3.0
    assert torch.isfinite(lagkv_scores(keys, values, CFG)).all()
    assert lagkv_keep_indices(keys, values, CFG).shape[-1] == CFG.retained_length(30)


# --- wrong ranks, shapes and dtypes ----------------------------------------------------------------------------

BAD_TENSORS = [
    (torch.randn(2, 10, 4), torch.randn(2, 10, 4), "keys must have 4 dimensions"),
    (torch.randn(1, 1, 2, 10, 4), torch.randn(1, 1, 2, 10, 4), "keys must have 4 dimensions"),
    (torch.randn(1, 2, 10, 4), torch.randn(1, 2, 11, 4), "same shape"),
    (torch.randn(1, 2, 10, 4), torch.randn(1, 3, 10, 4), "same shape"),
    (torch.randint(0, 3, (1, 1, 10, 4)), torch.randn(1, 1, 10, 4), "keys must be a floating-point tensor"),
    (torch.randn(1, 1, 10, 4), torch.ones(1, 1, 10, 4, dtype=torch.bool), "values must be a floating-point tensor"),
    (torch.randn(1, 1, 10, 1), torch.randn(1, 1, 10, 1), "head dim d must be >= 2"),
    (np.zeros((1, 1, 10, 4)), torch.randn(1, 1, 10, 4), "keys must be a torch.Tensor"),
]


@pytest.mark.parametrize("keys, values, match", BAD_TENSORS)
@pytest.mark.parametrize("entry", [lagkv_scores, lrsa_visibility, compress_once], ids=lambda f: f.__name__)
def test_bad_tensors_everywhere(entry, keys, values, match):
    with pytest.raises(ValueError, match=match):
        entry(keys, values, CFG)


def test_cache_update_rejects_inconsistent_states():
    keys, values = kv()
    layer = LagKVLayer(CFG)
    layer.update(keys, values)
    with pytest.raises(ValueError, match="key_states: shape .* does not continue the cached"):
        layer.update(torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))  # another number of KV heads
    with pytest.raises(ValueError, match="does not continue"):
        layer.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))  # another head dim
    with pytest.raises(ValueError, match="same shape"):
        layer.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8))  # keys and values disagree
    assert layer.stored_length() == CFG.retained_length(30) and layer.get_seq_length() == 30, "state untouched"


@pytest.mark.parametrize("config", ["lagkv", {"sink_size": 2}, 0.25])
def test_cache_rejects_non_config(config):
    with pytest.raises(ValueError, match="config must be a LagConfig or None"):
        LagKVCache(config)


# --- LagConfig: the accepted ranges --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sink_size=-1), "sink_size must be >= 0"),
        (dict(lag_size=0), "lag_size must be >= 1"),
        (dict(sink_size=4.0), "sink_size must be an integer"),
        (dict(lag_size=True), "lag_size must be an integer"),
        (dict(ratio=0.0), r"ratio must be in \(0, 1\]"),
        (dict(ratio=1.5), r"ratio must be in \(0, 1\]"),
        (dict(ratio=float("nan")), "ratio must be a finite number"),
        (dict(ratio="0.25"), "ratio must be a finite number"),
        (dict(lag_size=8, ratio=0.1), r"use ratio >= 0.125 for lag_size=8"),
        (dict(score_v_ratio=-1.0), "score_v_ratio must be a finite number >= 0"),
        (dict(score_v_ratio=float("inf")), "score_v_ratio must be a finite number >= 0"),
    ],
)
def test_lag_config_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LagConfig(**kwargs)


def test_lag_config_accepts_numpy_numbers_as_plain_python():
    cfg = LagConfig(np.int64(4), np.int32(8), np.float32(0.25), np.float64(1.0))
    assert cfg == LagConfig(4, 8, 0.25, 1.0)
    assert type(cfg.sink_size) is int and type(cfg.ratio) is float  # JSON-serialisable, hashable like the plain one
    with pytest.raises(ValueError, match="unknown LagConfig field"):
        LagConfig.from_dict({"sink": 4})
    with pytest.raises(ValueError, match="seq_len must be >= 0"):
        cfg.retained_length(-1)


# --- model inputs: empty, wrong dtype, out of vocabulary, beyond the model's positions ---------------------------

@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids must be a \[B, N\] tensor with B >= 1 and N >= 1, got \(1, 0\)"),
        (torch.zeros(0, 10, dtype=torch.long), r"B >= 1 and N >= 1, got \(0, 10\)"),
        (torch.zeros(10, dtype=torch.long), r"\[B, N\] tensor"),
        ([[1, 2, 3]], r"\[B, N\] tensor .* got list"),
        (torch.zeros(1, 10), "input_ids must hold integer token ids, got dtype torch.float32"),
        (torch.full((1, 10), 256), r"token ids in \[0, vocab_size=256\), got values from 256 to 256"),
        (torch.full((1, 10), -1), r"token ids in \[0, vocab_size=256\)"),
    ],
)
@pytest.mark.parametrize("entry", [chunked_prefill, compressed_generate], ids=lambda f: f.__name__)
def test_bad_input_ids(tiny, entry, ids, match):
    with pytest.raises(ValueError, match=match):
        entry(tiny, ids, CFG)


@pytest.mark.parametrize("entry", [chunked_prefill, compressed_generate], ids=lambda f: f.__name__)
@pytest.mark.parametrize("config", [None, {"sink_size": 2}])
def test_prefill_needs_a_lag_config(tiny, entry, config):
    with pytest.raises(ValueError, match="config must be a LagConfig"):
        entry(tiny, torch.zeros(1, 10, dtype=torch.long), config)


def test_empty_input_under_lrsa(tiny):
    with torch.no_grad(), lrsa(tiny, CFG), pytest.raises(ValueError, match="LRSA needs at least one sequence"):
        tiny(torch.zeros(1, 0, dtype=torch.long))


def test_beyond_max_positions_is_an_error(small_positions_model):
    model = small_positions_model
    ok = torch.zeros(1, 64, dtype=torch.long)
    too_long = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids: 65 positions exceed the model's max_position_embeddings=64"):
        chunked_prefill(model, too_long, CFG)
    assert chunked_prefill(model, ok, CFG)[0].shape == (1, 64, 256), "exactly the limit is fine"
    with torch.no_grad(), lrsa(model, CFG):
        assert torch.isfinite(model(ok).logits).all()
        with pytest.raises(ValueError, match="position_ids: 65 positions exceed .*max_position_embeddings=64"):
            model(too_long)
    kw = dict(do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="input_ids \\+ max_new_tokens: 70 positions exceed"):
        compressed_generate(model, torch.zeros(1, 60, dtype=torch.long), CFG, max_new_tokens=10, **kw)
    assert compressed_generate(model, torch.zeros(1, 60, dtype=torch.long), CFG, max_new_tokens=4, **kw).shape == (1, 64)


def test_decode_past_max_positions_under_lrsa(small_positions_model):
    """Token-by-token decoding through the LRSA attention crosses the limit: the step that crosses it fails."""
    model = small_positions_model
    with torch.no_grad(), lrsa(model, CFG):
        out = model(torch.zeros(1, 63, dtype=torch.long), use_cache=True)
        out = model(torch.zeros(1, 1, dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)
        with pytest.raises(ValueError, match="position_ids: 65 positions exceed"):
            model(torch.zeros(1, 1, dtype=torch.long), past_key_values=out.past_key_values, use_cache=True)


# --- unsupported model families and missing models ----------------------------------------------------------

def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize(
    "call",
    [
        lambda m: enable_lrsa(m, CFG),
        lambda m: lrsa(m, CFG).__enter__(),
        lambda m: chunked_prefill(m, torch.zeros(1, 30, dtype=torch.long), CFG),
        lambda m: compressed_generate(m, torch.zeros(1, 30, dtype=torch.long), CFG, max_new_tokens=2),
    ],
    ids=["enable_lrsa", "lrsa", "chunked_prefill", "compressed_generate"],
)
@pytest.mark.parametrize("model_factory", [gpt2, lambda: None, lambda: object()], ids=["gpt2", "None", "object"])
def test_unsupported_model_names_the_supported_ones(model_factory, call):
    with pytest.raises(ValueError, match=r"LRSA supports the model families llama, mistral, qwen2 .* got model_type="):
        call(model_factory())


@pytest.mark.parametrize("path, match", [
    ("/nonexistent/model.gguf", "GGUF file /nonexistent/model.gguf does not exist"),
    ("/nonexistent/model_dir", "model directory /nonexistent/model_dir does not exist"),
    ("./no_such_model", "model directory ./no_such_model does not exist"),
])
def test_missing_model_paths(path, match):
    with pytest.raises(FileNotFoundError, match=match):
        load_model(path, device="cpu")


# --- the data loader ---------------------------------------------------------------------------------------------

GOOD = {"context": "Notes. The locker code of Bob is 4821. More notes.", "question": "What is the locker code of Bob?",
        "answer": "4821"}


def write_lines(path, lines: list[str | bytes]):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ('{"context": "x", "question": ', r"line 3: not valid JSON \(Expecting value at column 30\)"),
        ("not json at all", r"line 3: not valid JSON"),
        ("[1, 2, 3]", r"line 3: expected a JSON object"),
        (json.dumps({**GOOD, "context": ""}), r"line 3: field 'context' must be a non-empty string, got ''"),
        (json.dumps({**GOOD, "context": " \n\t "}), r"line 3: field 'context' must be a non-empty string"),
        (json.dumps({**GOOD, "answer": 4821}), r"line 3: field 'answer' must be a non-empty string, got 4821"),
        ('{"context": "c", "question": "q", "answer": NaN}', r"line 3: field 'answer' must be a non-empty string"),
        (json.dumps({"context": "c", "answer": "a"}), r"line 3: missing field 'question'"),
        (b'{"context": "caf\xe9", "question": "q", "answer": "a"}', r"line 3: not valid UTF-8 \(byte 0xe9"),
    ],
)
def test_malformed_jsonl_line_names_its_line(tmp_path, bad_line, match):
    from lrsa_viz.qa_data import load_examples, read_jsonl

    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
    before = path.read_bytes()
    for loader in (read_jsonl, load_examples):
        with pytest.raises(ValueError, match=match):
            loader(path)
    assert path.read_bytes() == before, "the loader must not touch the file"


def test_every_malformed_line_is_reported_at_once(tmp_path):
    from lrsa_viz.qa_data import read_jsonl

    lines = [json.dumps(GOOD)] * 30
    for i in (2, 9, 17):
        lines[i] = "{broken"
    lines[20] = json.dumps({**GOOD, "question": ""})
    with pytest.raises(ValueError) as err:
        read_jsonl(write_lines(tmp_path / "data.jsonl", lines))
    message = str(err.value)
    assert message.startswith("4 malformed line(s), nothing loaded")
    for number in (3, 10, 18, 21):
        assert f"line {number}:" in message
    many = [("{broken" if i % 2 else json.dumps(GOOD)) for i in range(60)]
    with pytest.raises(ValueError, match=r"30 malformed line\(s\)[\s\S]*\.\.\. and 10 more"):
        read_jsonl(write_lines(tmp_path / "many.jsonl", many))


def test_well_formed_variants_lose_nothing(tmp_path):
    """Blank lines, CRLF endings, a byte-order mark and extra fields are fine and every example comes back."""
    from lrsa_viz.qa_data import read_jsonl

    extra = {**GOOD, "id": "x-1", "depth": 0.5}
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n\r\n  \n" + json.dumps(extra) + "\r\n").encode())
    assert read_jsonl(path) == [GOOD, extra]
    assert read_jsonl(path, limit=1) == [GOOD]
    with pytest.raises(ValueError, match="limit must be an integer >= 0 or None, got -1"):
        read_jsonl(path, limit=-1)


def test_missing_and_empty_data(tmp_path):
    from lrsa_viz.qa_data import load_examples, read_jsonl

    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="neither a JSONL file nor a datasets directory"):
        load_examples(tmp_path / "nope")
    (tmp_path / "empty.jsonl").write_text("")
    assert read_jsonl(tmp_path / "empty.jsonl") == []  # an empty file is read as no examples; users get an error:
    from lrsa_viz.evaluate import evaluate_model
    with pytest.raises(ValueError, match="examples: nothing to evaluate"):
        evaluate_model(None, None, [], [], CFG)


# --- the command-line tools: bad arguments and bad data end with the message, not a partial result -------------

@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    files = {
        "bad": write_lines(root / "bad.jsonl", [json.dumps(GOOD), '{"context": "c", "question": "q", "answer": ']),
        "empty_context": write_lines(root / "empty_context.jsonl", [json.dumps({**GOOD, "context": ""})]),
        "empty": root / "empty.jsonl",
        "good": write_lines(root / "good.jsonl", [json.dumps(GOOD)]),
    }
    files["empty"].write_text("")
    return root, files


@pytest.mark.parametrize(
    "args, error, match",
    [
        (["--context-tokens", "10"], ValueError, r"context_tokens must be an integer in \[64, 32768\], got 10"),
        (["--n-facts", "0"], ValueError, r"n_facts must be an integer in \[1, 32\], got 0"),
        (["--answer-digits", "13"], ValueError, r"answer_digits must be an integer in \[1, 12\], got 13"),
        (["--context-tokens", "64", "--n-facts", "32"], ValueError, "context_tokens must be at least"),
    ],
)
def test_qa_data_cli_bad_arguments(tmp_path, args, error, match):
    from lrsa_viz.qa_data import main

    with pytest.raises(error, match=match):
        main(["--out", str(tmp_path / "out"), "--train", "1", "--dev", "0", "--test", "0", *args])
    assert not (tmp_path / "out").exists(), "nothing written after a bad argument"


@pytest.mark.parametrize(
    "data, match",
    [
        ("bad", r"bad.jsonl, line 2: not valid JSON"),
        ("empty_context", r"empty_context.jsonl, line 1: field 'context' must be a non-empty string"),
        ("empty", "the training set is empty"),
    ],
)
def test_train_cli_bad_data(qa_files, tmp_path, data, match):
    from lrsa_viz.train import main

    root, files = qa_files
    with pytest.raises(ValueError, match=match):
        main(["--modes", "lrsa", "--model", "tiny:0", "--train-data", str(files[data]), "--out", str(tmp_path),
              "--steps", "1", "--batch-size", "1", "--sink-size", "4", "--lag-size", "16", "--ratio", "0.25",
              "--precision", "fp32", "--no-progress"])
    assert not (tmp_path / "lrsa" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["--ratio", "0"], r"ratio must be in \(0, 1\]"),
        (["--lag-size", "0"], "lag_size must be >= 1"),
        (["--lr", "nan"], "lr must be a finite number > 0"),
    ],
)
def test_train_cli_bad_arguments(qa_files, tmp_path, args, match):
    from lrsa_viz.train import main

    root, files = qa_files
    base = ["--modes", "lrsa", "--model", "tiny:0", "--train-data", str(files["bad"]), "--out", str(tmp_path),
            "--steps", "1", "--batch-size", "1", "--precision", "fp32", "--no-progress"]
    with pytest.raises(ValueError, match=match):
        main(base + args)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (["--data", "{bad}"], ValueError, r"bad.jsonl, line 2: not valid JSON"),
        (["--data", "{empty}"], ValueError, "examples: nothing to evaluate"),
        (["--data", "{missing}"], FileNotFoundError, "neither a JSONL file nor a datasets directory"),
        (["--data", "{empty_context}"], ValueError, r"line 1: field 'context' must be a non-empty string"),
        (["--data", "{bad}", "--ratios", "0"], ValueError, r"ratio must be in \(0, 1\]"),
        (["--data", "{good}", "--run", "no_equals_sign"], ValueError, "--run must be NAME=RUN_DIR"),
    ],
)
def test_evaluate_cli_bad_input(qa_files, tmp_path, args, error, match):
    from lrsa_viz.evaluate import main

    root, files = qa_files
    paths = {k: str(v) for k, v in files.items()} | {"missing": str(root / "missing.jsonl")}
    args = [a.format(**paths) for a in args]
    with pytest.raises(error, match=match):
        main(args + ["--base", "tiny:0", "--out", str(tmp_path / "out"), "--no-progress", "--sink-size", "4",
                     "--lag-size", "16"])
    assert not (tmp_path / "out").exists(), "no partial result table"


def test_cli_process_prints_one_line_and_exits_2(tmp_path):
    """What a shell user sees: exit status 2 and one line on stderr, no traceback; --debug shows the traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "lrsa_viz.qa_data", "--out", str(tmp_path), "--context-tokens", "10"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert lines == ["error: context_tokens must be an integer in [64, 32768], got 10"], done.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300, env=env)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == "ValueError: context_tokens must be an integer in [64, 32768], got 10"


@pytest.mark.parametrize("module, args, message", [
    ("qa_data", ["--out", "{tmp}/o", "--n-facts", "0"], "error: n_facts must be an integer in [1, 32], got 0"),
    ("train", ["--train-data", "{missing}", "--out", "{tmp}/r", "--model", "tiny:0", "--steps", "1"],
     "error: source: {missing} is neither a JSONL file nor a datasets directory"),
    ("train", ["--train-data", "{bad}", "--out", "{tmp}/r", "--model", "tiny:0", "--steps", "0"],
     "error: steps must be an integer >= 1, got 0"),
    ("evaluate", ["--data", "{bad}", "--base", "tiny:0", "--out", "{tmp}/e"],
     "error: {bad}, line 2: not valid JSON (Expecting value at column 45)"),
    ("evaluate", ["--data", "{good}", "--run", "nope", "--out", "{tmp}/e"], "error: --run must be NAME=RUN_DIR, got 'nope'"),
])
def test_cli_errors_are_one_line_with_exit_status_2(qa_files, tmp_path, capsys, module, args, message):
    """run_cli (what `python -m lrsa_viz.<module>` runs): bad input -> `error: <message>` on stderr, status 2."""
    import importlib

    from lrsa_viz.cli import run_cli

    root, files = qa_files
    paths = {k: str(v) for k, v in files.items()} | {"missing": str(root / "missing.jsonl"), "tmp": str(tmp_path)}
    args = [a.format(**paths) for a in args]
    main = importlib.import_module(f"lrsa_viz.{module}").main
    assert run_cli(main, args + ["--no-progress"] * (module != "qa_data")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == message.format(**paths)
    assert "Traceback" not in err
    with pytest.raises((ValueError, FileNotFoundError)):
        run_cli(main, args + ["--no-progress"] * (module != "qa_data") + ["--debug"])


# --- answers longer than what LagKV keeps per partition: a warning ------------------------------------------------

class DigitTokenizer:
    """One token per character (digits tokenise like that in SmolLM2)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_answer_longer_than_the_budget_warns():
    from lrsa_viz.budget import AnswerBudgetWarning, answers_over_budget, warn_if_answers_exceed_budget

    examples = [{**GOOD, "answer": a} for a in ("4821", "12345678", " 99 ", "123456789012")]
    cfg = LagConfig(4, 32, 0.25)  # keeps 8 tokens per partition
    assert answers_over_budget(DigitTokenizer(), examples, cfg) == [3]
    with pytest.warns(AnswerBudgetWarning, match=r"setting lagkv@0.25: 1 of 4 answers are longer than the 8 tokens .*"
                                                 r"the longest has 12 tokens.*int\(ratio \* lag_size\) >= 12"):
        assert warn_if_answers_exceed_budget(DigitTokenizer(), examples, cfg, "setting lagkv@0.25") == [3]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when everything fits, or when nothing is dropped (ratio 1)
        assert warn_if_answers_exceed_budget(DigitTokenizer(), examples, LagConfig(4, 64, 0.25)) == []
        assert warn_if_answers_exceed_budget(DigitTokenizer(), examples, LagConfig(4, 8, 1.0)) == []
    with pytest.raises(ValueError, match="config must be a LagConfig"):
        answers_over_budget(DigitTokenizer(), examples, {"ratio": 0.25})


def test_answer_budget_with_the_real_tokenizer():
    from lrsa_viz.budget import AnswerBudgetWarning, answer_token_lengths, warn_if_answers_exceed_budget
    from lrsa_viz.qa_data import load_tokenizer

    tok = load_tokenizer()
    assert answer_token_lengths(tok, ["4821", "123456789012"]) == [4, 12]  # SmolLM2: one token per digit
    with pytest.warns(AnswerBudgetWarning, match="2 of 2 answers"):
        warn_if_answers_exceed_budget(tok, [{"answer": "4821"}, {"answer": "48213"}], LagConfig(4, 16, 0.125))


def test_evaluate_and_lrsa_training_warn_about_long_answers(tmp_path):
    """The warning reaches users where it matters: evaluation of compressed settings and LRSA training."""
    import warnings

    from lrsa_viz.budget import AnswerBudgetWarning
    from lrsa_viz.evaluate import Setting, evaluate_model
    from lrsa_viz.qa_data import write_jsonl
    from lrsa_viz.train import TrainConfig, load_source, train

    model, tok = load_source("tiny:0")
    long = [{"context": "Notes about the office. " * 12 + "The code of Bob is 123456789012.",
             "question": "What is the code of Bob?", "answer": "123456789012"}]
    lag = LagConfig(4, 16, 0.125)  # keeps int(0.125 * 16) = 2 tokens per partition; the answer has 12
    with pytest.warns(AnswerBudgetWarning, match=r"evaluate tiny at ratio 0.125: 1 of 1 answers .* 2 tokens"):
        evaluate_model(model, tok, long, [Setting(), Setting("lagkv", "chunked", 0.125)], lag, max_new_tokens=2,
                       model_name="tiny", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnswerBudgetWarning)  # full KV only: nothing is dropped, no warning
        evaluate_model(model, tok, long, [Setting()], lag, max_new_tokens=2, progress=False)
    data = write_jsonl(tmp_path / "long.jsonl", long)
    config = dict(train_data=str(data), model="tiny:0", steps=1, batch_size=1, precision="fp32", lag=lag.to_dict())
    with pytest.warns(AnswerBudgetWarning, match=r"train \(LRSA\): 1 of 1 answers"):
        train(TrainConfig(mode="lrsa", out_dir=str(tmp_path / "lrsa"), **config), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnswerBudgetWarning)
        train(TrainConfig(mode="full", out_dir=str(tmp_path / "full"), **config), progress=False)
