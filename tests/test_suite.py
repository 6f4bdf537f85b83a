"""The suite experiment end to end on CPU with the tiny model (scripts/gpu_suite.sh's smoke mode): a first call
stopped by its time limit, a second call that resumes and completes, and the results files."""
import csv
import gzip
import json
import re
import subprocess
import sys

import pytest

from lrsa_viz.tasks.suite import SuiteConfig, Work, affinity, gpu_jobs, init_work, summarise, tier_settings

from helpers import ROOT, cpu_env

SMOKE = {"MODEL": "tiny:0", "SEEDS": "0 1", "TASKS": "multi_key variable_tracking", "PRIORITY_TASKS": "1",
         "CONTEXTS": "400", "TRAIN_PER_CELL": "2", "DEV_PER_CELL": "1", "TEST_N": "3", "STEPS": "3", "BATCH": "2",
         "MICRO_TOKENS": "2000", "EVAL_EVERY": "1", "SINK": "8", "LAG": "32", "RATIOS": "0.25",
         "BASELINES": "snapkv", "DATA_WORKERS": "1", "GPUS": "0", "LR": "3e-3", "TQDM_DISABLE": "1"}


def run_script(tmp_path, **env):
    # CUDA hidden (helpers.cpu_env): GPUS=0 alone still lets the script's worker and collector see a GPU, which
    # would then train and evaluate on it (bf16, flex) and record it as the device of a run this test made on CPU
    return subprocess.run(["bash", "scripts/gpu_suite.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env=cpu_env(**{**SMOKE, "PYTHON": sys.executable,
                                                          "LRSA_VIZ_WORK": str(tmp_path / "work"), **env}))


def test_suite_script_resumes_and_writes_the_results(tmp_path):
    first = run_script(tmp_path, SECONDS_LIMIT="6", MARGIN="0")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    partial = json.loads((tmp_path / "out" / "finetune_suite.json").read_text())
    assert partial["missing"], "the first call ran out of time"
    second = run_script(tmp_path, SECONDS_LIMIT="1200")
    assert second.returncode == 0, second.stdout[-3000:]
    results = json.loads((tmp_path / "out" / "finetune_suite.json").read_text())
    assert results["missing"] == []
    config = SuiteConfig.from_dict(results["config"])
    n_settings = len(tier_settings(config, "core")) + len(config.ratios) * len(config.baselines)
    assert n_settings == 1 + 1 * (2 + 1) + 1 * 1
    rows = results["rows"]
    keys = {(r["task"], r["context_tokens"], r["seed"], r["model"], r["setting"], r["ratio"]) for r in rows}
    assert len(rows) == len(keys) == 2 * 1 * 2 * 3 * n_settings
    for r in rows:
        assert r["n"] == 3 and 0 <= r["score"] <= 1 and 0 < r["kv_fraction"] <= 1
        assert r["metric"] == {"multi_key": "exact_match", "variable_tracking": "set_f1"}[r["task"]]
        if r["setting"] != "full":
            assert r["kv_fraction"] < 1, "measured, not nominal"
    summary = results["summary"]
    assert len(summary) == len(keys) // 2 and all(s["n_seeds"] == 2 and s["std"] is not None for s in summary)
    assert [(p["seed"], p["model"]) for p in results["prose"]] == [(s, m) for s in (0, 1) for m in ("base", "full", "lrsa")]
    assert {(c["run"], c["seed"]) for c in results["curves"]} == {(m, s) for m in ("full", "lrsa") for s in (0, 1)}
    stopped = re.findall(r"train/(\d+)/(\w+): stopped for the deadline", first.stdout)  # the script logs to stdout
    # a fine-tune the first call stopped is resumed from its checkpoint by the second (whether the 6 s cut one
    # depends on the machine's speed; resuming a stopped fine-tune itself is tested in tests/test_train.py)
    for seed, mode in stopped:
        assert results["runs"][f"{mode}/seed{seed}"]["run_info"]["resumed_at_step"], (mode, seed)
    assert results["reductions"] and results["command"].startswith("MODEL=tiny:0 SEEDS='0 1'")
    assert results["environment"]["torch"] and results["environment"]["device"] == "cpu"
    table = list(csv.DictReader((tmp_path / "out" / "finetune_suite.csv").open()))
    assert len(table) == len(rows) and table[0]["torch"] and table[0]["command"] == results["command"]
    with gzip.open(tmp_path / "out" / "finetune_suite_predictions.json.gz", "rt") as f:
        predictions = json.load(f)
    assert len(predictions) == len(rows) and all(len(p["predictions"]) == len(p["answers"]) == 3 for p in predictions)
    log = (tmp_path / "out" / "finetune_suite.log").read_text()
    assert log.count("experiment: MODEL=tiny:0") == 2, "the log keeps both calls"
    timings = results["timings"]
    assert all(timings[j] is not None for j in timings)


def test_jobs_in_priority_order():
    config = SuiteConfig(seeds=(0, 1), tasks=("multi_key", "frequent_word"), priority_tasks=1, contexts=(4000,),
                         ratios=(0.5, 0.25), baselines=("snapkv",)).check()
    jobs = [j for j, _ in gpu_jobs(config)]
    assert jobs[:4] == ["train/0/full", "train/0/lrsa", "train/1/full", "train/1/lrsa"]
    evals = [j for j in jobs if j.startswith("eval")]
    tiers = [j.split("/")[3] for j in evals]
    assert tiers == sorted(tiers, key=["core", "chunked@0.25", "chunked@0.5"].index), "core first, then r = 0.25"
    core = [j.split("/")[4] for j in evals if "/core/" in j]
    assert core == ["multi_key"] * 6 + ["frequent_word"] * 6, "priority tasks first"
    assert [affinity(j, 2) for j in jobs[:4]] == [0, 1, 0, 1] and affinity(jobs[4], 2) is None
    assert affinity("train/0/lrsa", 1) == 0, "one worker runs everything"
    needs = dict(gpu_jobs(config))
    assert needs["eval/1/lrsa/core/multi_key/4000"] == ["data/1/test/multi_key/4000", "train/1/lrsa"]
    assert needs["eval/1/base/core/multi_key/4000"] == ["data/1/test/multi_key/4000"]


def test_config_is_checked_and_a_work_directory_keeps_its_config(tmp_path):
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        SuiteConfig(tasks=("needle",)).check()
    with pytest.raises(ValueError, match="contexts must be integers >= 192"):
        SuiteConfig(contexts=(100,)).check()
    with pytest.raises(ValueError, match="ratio"):
        SuiteConfig(ratios=(0.0,)).check()
    work = Work(tmp_path)
    init_work(work, SuiteConfig(seeds=(0,)))
    init_work(work, SuiteConfig(seeds=(0,)))  # the same: fine (a resumed call)
    with pytest.raises(ValueError, match="another configuration"):
        init_work(work, SuiteConfig(seeds=(0, 1)))
    assert work.config() == SuiteConfig(seeds=(0,))


def test_summary_mean_and_std_over_seeds():
    rows = [{"task": "t", "context_tokens": 4000, "model": "m", "setting": "full", "ratio": 1.0, "metric": "exact_match",
             "seed": s, "n": 200, "score": v, "kv_fraction": 1.0} for s, v in ((0, 0.5), (1, 0.7), (2, 0.9))]
    (s,) = summarise(rows)
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n_seeds"] == 3


def test_two_workers_share_one_device_without_doing_a_job_twice(tmp_path):
    """GPU_IDS="0 0": two workers on one device (on a CPU machine: the CPU) split the jobs through the claims; every
    job is done exactly once and both workers take some."""
    done = run_script(tmp_path, GPU_IDS="0 0", SEEDS="0", TASKS="multi_key", SECONDS_LIMIT="1200")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "finetune_suite.json").read_text())
    assert results["missing"] == [] and results["rows"]
    finished = re.findall(r"\[worker (\d) [\d:]+\] (\S+): done in", done.stdout)
    jobs = [job for _, job in finished]
    assert len(jobs) == len(set(jobs)) == len(results["timings"]) - sum(j.startswith("data/") for j in results["timings"])
    assert {worker for worker, _ in finished} == {"0", "1"}
