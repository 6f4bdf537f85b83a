"""Evaluation: scores, greedy answers under every cache setting (checked against the library's generate paths),
batching, and the whole tiny experiment (train both modes + resume + evaluate) giving a complete table."""
import csv
import json

import pytest
import torch

from lrsa_viz import LagConfig, LagKVCache, compressed_generate
from lrsa_viz.evaluate import (Setting, budget_examples, contains_answer, default_settings, evaluate_model,
                               exact_match, greedy_answers, greedy_answers_many, normalize_answer, parse_runs,
                               prose_loss, token_f1)
from lrsa_viz.policies import RandomPolicy
from lrsa_viz.qa_data import QAConfig, QAGenerator, write_jsonl

from helpers import ROOT, cpu_env, prompt_batch, run_cpu

LAG = LagConfig(sink_size=8, lag_size=32, ratio=0.25)


def test_scores():
    assert normalize_answer("  The Code: 4821! ") == "code 4821"
    assert exact_match("4821.", "4821") == 1.0 and exact_match("4822", "4821") == 0.0
    assert token_f1("the code is 4821", "4821") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert token_f1("", "4821") == 0.0 and token_f1("4821", "4821") == 1.0
    assert contains_answer("It is 4821.", "4821") == 1.0 and contains_answer("48210", "4821") == 0.0


def test_settings():
    rows = default_settings()
    assert len(rows) == 13 and rows[0] == Setting()
    assert {(s.name, s.ratio) for s in rows[1:]} == {(f"{p}/{q}", r) for p, q in (
        ("lagkv", "chunked"), ("lagkv", "one_shot"), ("streaming", "chunked"), ("random", "chunked"))
        for r in (0.5, 0.25, 0.125)}
    assert len(default_settings([0.5], one_shot_baselines=True)) == 7
    assert [x.name for x in default_settings([0.5], baselines=("snapkv",))] == ["full", "lagkv/chunked",
                                                                               "lagkv/one_shot", "snapkv/chunked"]
    with pytest.raises(ValueError, match="baselines must be among"):
        default_settings([0.5], baselines=("h2o",))
    with pytest.raises(ValueError, match="policy must be one of"):
        Setting("h2o", "chunked", 0.5)
    with pytest.raises(ValueError, match="pattern must be one of"):
        Setting("lagkv", "twice", 0.5)
    with pytest.raises(ValueError, match="ratio must be in"):
        Setting("lagkv", "chunked", 0.0)
    with pytest.raises(ValueError, match="full KV takes no"):
        Setting(None, "chunked", 0.5)


@pytest.mark.parametrize("policy", ["lagkv", "streaming", "random"])
def test_chunked_answers_equal_compressed_generate(tok, tiny_lm, examples, policy):
    ids, end = prompt_batch(tok, examples)
    setting = Setting(policy, "chunked", 0.25)
    tokens, fraction = greedy_answers(tiny_lm, ids, end, setting, LAG, 6, tok.eos_token_id)
    ref_policy = RandomPolicy(seed=0) if policy == "random" else policy
    ref = compressed_generate(tiny_lm, ids, LAG, policy=ref_policy, max_new_tokens=6, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    assert tokens.tolist() == ref[:, :tokens.shape[1]].tolist()
    assert fraction == pytest.approx(LAG.retained_length(ids.shape[1]) / ids.shape[1])


def test_full_and_one_shot_answers_equal_generate(tok, tiny_lm, examples):
    ids, end = prompt_batch(tok, examples)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    tokens, fraction = greedy_answers(tiny_lm, ids, end, Setting(), LAG, 6, tok.eos_token_id)
    assert tokens.tolist() == tiny_lm.generate(ids, **kw)[:, ids.shape[1]:].tolist() and fraction == 1.0
    tokens, fraction = greedy_answers(tiny_lm, ids, end, Setting("lagkv", "one_shot", 0.25), LAG, 6,
                                      tok.eos_token_id)
    cache = LagKVCache(LAG, mode="one_shot")
    with torch.no_grad():
        tiny_lm(ids[:, :end], past_key_values=cache, use_cache=True)
    assert cache.stored_lengths()[0] == LAG.retained_length(end) < end, "the context was compressed once"
    ref = tiny_lm.generate(ids, past_key_values=cache, **kw)[:, ids.shape[1]:]
    assert tokens.tolist() == ref.tolist()
    n = ids.shape[1]
    assert fraction == pytest.approx((LAG.retained_length(end) + n - end) / n)
    with pytest.raises(ValueError, match="context_end must be in"):
        greedy_answers(tiny_lm, ids, 0, Setting("lagkv", "one_shot", 0.25), LAG, 6, tok.eos_token_id)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answers(tiny_lm, ids, end, Setting(), LAG, 0, tok.eos_token_id)


def test_batched_evaluation_equals_one_at_a_time(tok, tiny_lm, examples):
    settings = [Setting(), Setting("lagkv", "chunked", 0.5)]
    batched = evaluate_model(tiny_lm, tok, examples, settings, LAG, batch_size=8, max_new_tokens=4, progress=False)
    single = evaluate_model(tiny_lm, tok, examples, settings, LAG, batch_size=1, max_new_tokens=4, progress=False)
    for a, b in zip(batched, single):
        assert a["predictions"] == b["predictions"] and a["n"] == 8
        assert a["kv_fraction"] == pytest.approx(b["kv_fraction"])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(tiny_lm, tok, examples, settings, LAG, batch_size=0)


def test_shared_prefill_equals_one_setting_at_a_time(tok, tiny_lm):
    """greedy_answers_many shares one exact prefill among full KV and the one-shot settings: every setting's
    tokens and kv_fraction are exactly those of greedy_answers (every policy, both patterns)."""
    from lrsa_viz.tasks import make_task

    examples = make_task("multi_key", tok, 400).split("test", 3)
    ids, end = prompt_batch(tok, examples)
    settings = default_settings((0.5, 0.125), one_shot_baselines=True, baselines=("streaming", "random", "snapkv"))
    assert len(settings) == 1 + 2 * 8
    seconds = {}
    many = greedy_answers_many(tiny_lm, ids, end, settings, LAG, 5, tok.eos_token_id, seed=3, seconds=seconds)
    assert set(many) == set(settings) == set(seconds)
    for s in settings:
        tokens, fraction = greedy_answers(tiny_lm, ids, end, s, LAG, 5, tok.eos_token_id, seed=3)
        assert many[s][0].tolist() == tokens.tolist(), s
        assert many[s][1] == fraction
    assert many[Setting("snapkv", "one_shot", 0.5)][1] == many[Setting("lagkv", "one_shot", 0.5)][1] < 1


def test_rows_score_each_example_with_its_own_metric(tok, tiny_lm, monkeypatch):
    """``score`` is exact match for single answers and set F1 for set answers; the budget check sees each value."""
    import lrsa_viz.evaluate as evaluate
    from lrsa_viz.tasks import make_task, set_f1

    examples = make_task("multi_value", tok, 400).split("test", 2)
    assert budget_examples(examples) == [{"answer": v} for ex in examples for v in ex["answer"].split(", ")]
    one_value = examples[0]["answer"].split(", ")[0]  # every answer: one of example 0's values (partly right)
    monkeypatch.setattr(evaluate, "decode_answer", lambda tokenizer, tokens: one_value)
    rows = evaluate_model(tiny_lm, tok, examples, [Setting()], LAG, batch_size=2, max_new_tokens=3, progress=False)
    expected = sum(set_f1(one_value, ex["answer"]) for ex in examples) / 2
    assert rows[0]["score"] == expected > 0 == rows[0]["exact_match"], "set F1 gives partial credit, exact match none"
    with pytest.raises(ValueError, match="no repeats"):
        evaluate_model(tiny_lm, tok, examples, [Setting(), Setting()], LAG, progress=False)


def test_prose_loss_is_the_mean_next_token_cross_entropy(tok, tiny_lm):
    texts = ["It was the best of times, it was the worst of times.", "Four score and seven years ago."]
    got = prose_loss(tiny_lm, tok, texts)
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = tiny_lm(ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert got["tokens"] == count and got["loss"] == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="at least one text"):
        prose_loss(tiny_lm, tok, [])


def test_parse_runs():
    assert parse_runs(["full=a/b", "lrsa=c"]) == {"full": "a/b", "lrsa": "c"}
    with pytest.raises(ValueError, match="NAME=RUN_DIR"):
        parse_runs(["runs/full"])


def test_tiny_experiment_end_to_end(tmp_path, tok):
    """Train both modes (LRSA interrupted and resumed), evaluate base + both: every row of the table is filled.

    The three commands run as `python -m ...` children with CUDA hidden (helpers.run_cpu): a CPU test on any
    machine. In-process on a CUDA machine, training and evaluation would pick the GPU (bf16, flex, parallel
    prefill) and the table would record the GPU, not the CPU this test is about."""
    gen = QAGenerator(tok, QAConfig(context_tokens=192, n_facts=3), seed=0)
    data = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", gen.split(s, n))) for s, n in
            (("train", 8), ("dev", 4), ("test", 6))}
    common = ["--model", "tiny:0", "--train-data", data["train"], "--dev-data", data["dev"], "--out",
              str(tmp_path / "runs"), "--steps", "3", "--batch-size", "2", "--eval-every", "2", "--sink-size", "8",
              "--lag-size", "32", "--ratio", "0.25", "--precision", "fp32", "--no-progress"]
    run_cpu(["-m", "lrsa_viz.train", "--modes", "full", "lrsa", "--stop-after", "2"] + common)
    assert not (tmp_path / "runs" / "lrsa" / "model.safetensors").exists()
    run_cpu(["-m", "lrsa_viz.train", "--modes", "full", "lrsa", "--resume"] + common)
    done = run_cpu(["-m", "lrsa_viz.evaluate", "--data", data["test"], "--base", "tiny:0",
                    "--run", f"full={tmp_path / 'runs' / 'full'}", "--run", f"lrsa={tmp_path / 'runs' / 'lrsa'}",
                    "--sink-size", "8", "--lag-size", "32", "--batch-size", "4", "--max-new-tokens", "6", "--seed", "3",
                    "--out", str(tmp_path / "results"), "--name", "tiny", "--no-progress"])
    assert f"json: {tmp_path / 'results' / 'tiny.json'}" in done.stderr
    # what main() returned in the child is what it wrote (predictions included): the rows below are the file's
    results = json.loads((tmp_path / "results" / "tiny.json").read_text())
    rows = results["rows"]
    assert [(r["model"], r["setting"], r["ratio"]) for r in rows] == [
        (m, s.name, s.ratio or 1.0) for m in ("base", "full", "lrsa") for s in default_settings()]
    for r in rows:
        assert r["n"] == 6 and len(r["predictions"]) == 6 and all(isinstance(p, str) for p in r["predictions"])
        for k in ("exact_match", "f1", "contains", "score"):
            assert 0.0 <= r[k] <= 1.0
        assert 0 < r["kv_fraction"] <= 1 and r["seconds"] > 0
        assert (r["kv_fraction"] == 1.0) == (r["setting"] == "full")
        assert r["prefill"] in ("exact", "chunks"), "the CPU reads chunked prompts chunk by chunk"
    assert results["command"].startswith("python -m lrsa_viz.evaluate --data")
    assert results["seed"] == 3 and results["environment"]["torch"] == torch.__version__
    assert results["environment"]["device"] == "cpu" and results["dtype"] == "float32"
    assert results["runs"]["lrsa"]["train_config"]["mode"] == "lrsa"
    assert results["runs"]["lrsa"]["resumed_at_step"] == 2
    assert results["runs"]["lrsa"]["precision"] == "fp32" and results["runs"]["lrsa"]["processes"] == 1
    table = list(csv.DictReader((tmp_path / "results" / "tiny.csv").open()))
    assert len(table) == len(rows) == 39
    assert all(v != "" for row in table for v in row.values())
    assert table[0]["command"] == results["command"] and table[0]["torch"] == torch.__version__
    assert table[0]["device"] == "cpu"
    curves = list(csv.DictReader((tmp_path / "results" / "tiny_curves.csv").open()))
    assert [(c["run"], int(c["step"])) for c in curves] == [(m, s) for m in ("full", "lrsa") for s in (1, 2, 3)]


def test_train_and_evaluate_do_not_need_plotly():
    """The GPU image has no plotly: the experiment's modules must import without it."""
    import subprocess
    import sys
    code = "import sys; sys.modules['plotly'] = None; import lrsa_viz.qa_data, lrsa_viz.train, lrsa_viz.evaluate"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path, examples):
    """scripts/gpu_finetune.sh with the tiny model and minimal sizes: every flag it passes is accepted, and it
    writes the table, the curves and the log. CUDA hidden (cpu_env): the CPU run on any machine."""
    import subprocess
    import sys
    short = str(write_jsonl(tmp_path / "short.jsonl", examples[:2]))  # 192-token documents: a fast evaluation
    env = cpu_env(PYTHON=sys.executable, MODEL="tiny:0", TRAIN_N="4", STEPS="2", BATCH="2", MICRO="1", CONTEXT="256",
                  EVAL_EVERY="1", EVAL_BATCH="2", WORKERS="1", SINK="8", LAG="32", DEV_DATA=short, TEST_DATA=short,
                  TEST_LIMIT="2", LRSA_BACKEND="auto", LRSA_VIZ_WORK=str(tmp_path / "work"))
    subprocess.run(["bash", "scripts/gpu_finetune.sh", str(tmp_path / "out")], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "finetune_smollm2.csv", "finetune_smollm2.json", "finetune_smollm2.log", "finetune_smollm2_curves.csv"]
    results = json.loads((out / "finetune_smollm2.json").read_text())
    assert len(results["rows"]) == 39 and results["data"]["n"] == 2
    assert results["experiment"].startswith("TRAIN_N=4 STEPS=2")
    assert "done:" in (out / "finetune_smollm2.log").read_text()
