"""The task-suite experiment: data, full vs LRSA fine-tuning per seed, evaluation of every model and cache setting.

Run by ``scripts/gpu_suite.sh`` as one CPU data process and one worker per GPU, sharing a work directory:

    python -m lrsa_viz.tasks.suite init    --work W [sizes...]        # writes W/suite_config.json (once)
    python -m lrsa_viz.tasks.suite data    --work W                   # CPU: every seed's train / dev / test files
    python -m lrsa_viz.tasks.suite worker  --work W --worker K --deadline T   # one per GPU (CUDA_VISIBLE_DEVICES)
    python -m lrsa_viz.tasks.suite collect --work W --out data/results --name finetune_suite

Jobs, in priority order (a worker takes the first one whose inputs exist and nobody holds):
1. ``train/<seed>/<mode>``: fine-tune on the seed's mixture (every task x every context length), full then LRSA;
2. ``prose/<seed>/<model>``: loss on held-out prose (full cache);
3. ``eval/<seed>/<model>/core/<task>/<ctx>``: full KV, LagKV chunked and one-shot, and the one-shot baselines
   (cheap: they share the exact prefill), at every ratio, for the first ``priority_tasks`` tasks, then the rest;
   LagKV chunked reads each prompt in ONE parallel LRSA forward on the GPU (`lrsa_viz.evaluate`,
   ``chunked_prefill="auto"``; chunk by chunk on the CPU), recorded in each row's ``prefill``;
4. ``eval/.../chunked@<r>/...``: the chunked baselines (StreamingLLM, random, SnapKV), ratio 0.25 first.
Each job leaves ``W/done/<job>.json``; a rerun skips what is done and resumes an interrupted training run from
its checkpoint, so a time-limited session continues where the last one stopped (same machine, same W).
After ``deadline`` (unix time) a worker starts no job, and training stops with a checkpoint in time.

``collect`` writes ``<name>.json`` (config, reductions, environment, command, one row per (task, context_tokens,
seed, model, setting, ratio), their mean/std over seeds, prose losses, loss curves, job timings, what is missing),
``<name>.csv`` (the rows) and ``<name>_predictions.json.gz`` (every answer with its gold, for error analysis).
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..checks import check_fields, check_int
from ..cli import add_debug_flag, run_cli

MODES = ("full", "lrsa")
MODELS = ("base", "full", "lrsa")
ROW_KEYS = ("task", "context_tokens", "seed", "model", "setting", "policy", "pattern", "prefill", "ratio", "metric",
            "score", "exact_match", "kv_fraction", "n", "seconds")


@dataclass
class SuiteConfig:
    """Every size of the experiment (recorded with its results). The defaults are scripts/gpu_suite.sh's."""

    model: str | None = None
    tasks: tuple[str, ...] = ("single_needle", "multi_key", "variable_tracking", "multi_value", "multi_query",
                              "frequent_word")
    priority_tasks: int = 3
    contexts: tuple[int, ...] = (4000, 8000)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_per_cell: int = 64
    dev_per_cell: int = 2
    test_per_cell: int = 100
    steps: int = 48
    batch_size: int = 16
    micro_batch_tokens: int = 40960
    lr: float = 2e-4
    warmup_steps: int = 5
    eval_every: int = 12
    sink_size: int = 16
    lag_size: int = 128
    train_ratio: float = 0.25
    ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
    baselines: tuple[str, ...] = ("streaming", "random", "snapkv")
    eval_batch_tokens: int = 262144  # 64 rows at 4k, 32 at 8k: every parallel prefill pads to this (one shape)
    lrsa_backend: str = "auto"
    prose_fraction: float = 0.5
    reductions: tuple[str, ...] = ()

    def check(self) -> "SuiteConfig":
        from . import TASKS
        from ..config import LagConfig
        from ..evaluate import BASELINES

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list from {list(TASKS)}, got {list(self.tasks)}")
        for name in ("train_per_cell", "test_per_cell", "steps", "batch_size", "micro_batch_tokens",
                     "eval_batch_tokens", "priority_tasks"):
            v = getattr(self, name)
            check_int(name, v, 1)
        for name in ("dev_per_cell", "warmup_steps", "eval_every"):
            v = getattr(self, name)
            check_int(name, v, 0)
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if not self.contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 192 for c in self.contexts):
            raise ValueError(f"contexts must be integers >= 192 (tokens), got {list(self.contexts)}")
        if any(b not in BASELINES for b in self.baselines):
            raise ValueError(f"baselines must be among {BASELINES}, got {list(self.baselines)}")
        for r in (*self.ratios, self.train_ratio):
            LagConfig(self.sink_size, self.lag_size, r)
        return self

    @property
    def lag(self):
        from ..config import LagConfig

        return LagConfig(self.sink_size, self.lag_size, self.train_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SuiteConfig":
        check_fields(cls, d, "suite config")
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()}).check()


# --------------------------------------------------------------------------------------------------------------
# The work directory


class Work:
    """Files of one suite run under ``root``: config, data, runs, claims, done markers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_file(self) -> Path:
        return self.root / "suite_config.json"

    def config(self) -> SuiteConfig:
        if not self.config_file.exists():
            raise FileNotFoundError(f"work: {self.config_file} is missing; run `python -m lrsa_viz.tasks.suite init` first")
        return SuiteConfig.from_dict(json.loads(self.config_file.read_text()))

    def data_dir(self, seed: int) -> Path:
        return self.root / "data" / f"seed{seed}"

    def test_file(self, seed: int, task: str, ctx: int) -> Path:
        return self.data_dir(seed) / f"test_{task}_{ctx}.jsonl"

    def run_dir(self, seed: int, mode: str) -> Path:
        return self.root / "runs" / f"seed{seed}" / mode

    def done_file(self, job: str) -> Path:
        return self.root / "done" / (job.replace("/", "__") + ".json")

    def is_done(self, job: str) -> bool:
        return self.done_file(job).exists()

    def mark_done(self, job: str, payload: dict) -> None:
        path = self.done_file(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(payload))
        tmp.rename(path)

    def done(self, job: str) -> dict:
        return json.loads(self.done_file(job).read_text())

    def data_status(self) -> str | None:
        """"running", "finished" or "failed" (written by the data process), None before it started."""
        path = self.root / "data_status"
        return path.read_text().strip() if path.exists() else None

    def set_data_status(self, status: str) -> None:
        (self.root / "data_status").write_text(status)


def init_work(work: Work, config: SuiteConfig) -> None:
    """Write the config once; a second init must give the same config (else: a fresh work directory)."""
    config.check()
    work.root.mkdir(parents=True, exist_ok=True)
    if work.config_file.exists():
        old = json.loads(work.config_file.read_text())
        if old != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"work: {work.root} holds a run with another configuration; use a fresh --work directory "
                             f"(or the same sizes) to resume")
    else:
        work.config_file.write_text(json.dumps(config.to_dict(), indent=1))
    claims = work.root / "claims"  # no worker runs during init: claims of a stopped session are stale
    if claims.exists():
        for f in claims.iterdir():
            f.unlink()


# --------------------------------------------------------------------------------------------------------------
# Data (CPU)


def data_jobs(config: SuiteConfig) -> list[str]:
    """Data files in the order they are made: every seed's training mixture first (training starts early)."""
    jobs = [f"data/{s}/train" for s in config.seeds]
    jobs += [f"data/{s}/test/{t}/{c}" for t in config.tasks for c in config.contexts for s in config.seeds]
    return jobs


def make_data(work: Work, workers: int = 1, progress: bool = False, tokenizer=None) -> dict[str, float]:
    """Make every data file not made yet (status in ``W/data_status`` for the workers). Returns {job: seconds}."""
    config = work.config()
    work.set_data_status("running")
    try:
        times = _make_data(work, config, workers, progress, tokenizer)
    except BaseException:
        work.set_data_status("failed")
        raise
    work.set_data_status("finished")
    return times


def _make_data(work: Work, config: SuiteConfig, workers: int, progress: bool, tokenizer) -> dict[str, float]:
    from . import make_task
    from ..qa_data import load_tokenizer, write_jsonl
    from ..train import is_tiny_source
    from .haystack import Haystack

    tok = tokenizer or load_tokenizer(None if is_tiny_source(config.model) else config.model)
    haystack = Haystack(tok, prose_fraction=config.prose_fraction)
    times = {}
    for job in data_jobs(config):
        if work.is_done(job):
            continue
        t0 = time.perf_counter()
        parts = job.split("/")
        seed = int(parts[1])
        out = work.data_dir(seed)
        if parts[2] == "train":
            train, dev = [], []
            for t in config.tasks:
                for c in config.contexts:
                    task = make_task(t, tok, c, seed=seed, haystack=haystack)
                    train += task.split("train", config.train_per_cell, workers=workers, progress=progress)
                    dev += task.split("dev", config.dev_per_cell, workers=workers, progress=progress)
            write_jsonl(out / "train.jsonl", train)
            write_jsonl(out / "dev.jsonl", dev)
            n = len(train)
        else:
            t, c = parts[3], int(parts[4])
            task = make_task(t, tok, c, seed=seed, haystack=haystack)
            examples = task.split("test", config.test_per_cell, workers=workers, progress=progress)
            write_jsonl(work.test_file(seed, t, c), examples)
            n = len(examples)
        times[job] = round(time.perf_counter() - t0, 2)
        work.mark_done(job, {"seconds": times[job], "examples": n})
    return times


# --------------------------------------------------------------------------------------------------------------
# GPU jobs


def gpu_jobs(config: SuiteConfig) -> list[tuple[str, list[str]]]:
    """(job, the jobs it needs), in priority order."""
    jobs: list[tuple[str, list[str]]] = []
    for s in config.seeds:
        for m in MODES:
            jobs.append((f"train/{s}/{m}", [f"data/{s}/train"]))
    for s in config.seeds:
        for m in MODELS:
            jobs.append((f"prose/{s}/{m}", [] if m == "base" else [f"train/{s}/{m}"]))
    first, rest = config.tasks[:config.priority_tasks], config.tasks[config.priority_tasks:]
    tiers = ["core"]
    ratios = sorted(config.ratios, key=lambda r: (abs(r - 0.25), -r))  # 0.25 first
    if config.baselines:
        tiers += [f"chunked@{r:g}" for r in ratios]
    for tier in tiers:
        for group in (first, rest):
            for t in group:
                for c in config.contexts:
                    for s in config.seeds:
                        for m in MODELS:
                            needs = [f"data/{s}/test/{t}/{c}"] + ([] if m == "base" else [f"train/{s}/{m}"])
                            jobs.append((f"eval/{s}/{m}/{tier}/{t}/{c}", needs))
    return jobs


def tier_settings(config: SuiteConfig, tier: str):
    """The cache settings one evaluation job runs."""
    from ..evaluate import Setting

    if tier == "core":
        out = [Setting()]
        for r in config.ratios:
            out += [Setting("lagkv", "chunked", r), Setting("lagkv", "one_shot", r)]
            out += [Setting(b, "one_shot", r) for b in config.baselines]
        return out
    r = float(tier.split("@", 1)[1])
    return [Setting(b, "chunked", r) for b in config.baselines]


def affinity(job: str, n_workers: int) -> int | None:
    """The worker that must run ``job`` (None: any). Full fine-tunes go to worker 0 and LRSA fine-tunes to worker
    1 (of 2+): each worker then compiles only its own kernels (FlexAttention for LRSA), once for all seeds."""
    if job.startswith("train/"):
        return 0 if job.endswith("/full") else 1 % n_workers
    return None


class Claims:
    """Who runs what: one lock file, held while a worker picks its next job."""

    def __init__(self, work: Work, worker: int, n_workers: int = 1):
        self.work, self.worker, self.n_workers = work, worker, n_workers
        self.dir = work.root / "claims"
        self.dir.mkdir(parents=True, exist_ok=True)

    def pick(self, jobs: list[tuple[str, list[str]]]) -> tuple[str | None, bool]:
        """(the first runnable unclaimed job, claimed now) or (None, whether anything is still pending)."""
        with open(self.work.root / "claims.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                pending = False
                for job, needs in jobs:
                    if self.work.is_done(job):
                        continue
                    pending = True
                    claim = self.dir / job.replace("/", "__")
                    if claim.exists() or not all(self.work.is_done(n) for n in needs):
                        continue
                    if affinity(job, self.n_workers) not in (None, self.worker):
                        continue
                    claim.write_text(str(self.worker))
                    return job, True
                return None, pending
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def release(self, job: str) -> None:
        (self.dir / job.replace("/", "__")).unlink(missing_ok=True)


class Worker:
    """Runs GPU jobs in one process (one GPU): trains, loads models once, evaluates."""

    def __init__(self, work: Work, worker: int, deadline: float, progress: bool = False, margin_s: float = 20.0,
                 n_workers: int = 1):
        import torch

        from ..qa_data import load_tokenizer
        from ..train import is_tiny_source

        self.work, self.worker, self.deadline, self.progress = work, worker, deadline, progress
        self.margin_s = margin_s  # no job starts later than this before the deadline
        self.n_workers = n_workers
        self.config = work.config()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = load_tokenizer(None if is_tiny_source(self.config.model) else self.config.model)
        self.models: dict[tuple[int, str], object] = {}

    def log(self, message: str) -> None:
        print(f"[worker {self.worker} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def model(self, seed: int, name: str):
        from ..train import load_run, load_source

        key = (0, "base") if name == "base" else (seed, name)  # one base model for every seed
        if key not in self.models:
            if name == "base":
                self.models[key] = load_source(self.config.model, device=self.device, dtype=self.dtype)[0].eval()
            else:
                self.models[key] = load_run(self.work.run_dir(seed, name), device=self.device, dtype=self.dtype)[0]
        return self.models[key]

    def run(self) -> int:
        """Take jobs until none is left or the deadline is near. Returns the number of jobs done."""
        jobs = gpu_jobs(self.config)
        claims = Claims(self.work, self.worker, self.n_workers)
        done = 0
        while time.time() < self.deadline - self.margin_s:
            job, pending = claims.pick(jobs)
            if job is None:
                if not pending:  # every job is done
                    break
                busy = any((self.work.root / "claims").iterdir()) or self.work.data_status() == "running"
                if not busy:  # nobody is making what the pending jobs need
                    self.log("no job can run: the inputs of the pending jobs are not being made")
                    break
                time.sleep(2.0)  # inputs are still being made (data process, the other worker's training)
                continue
            t0 = time.perf_counter()
            try:
                finished = self.run_job(job)
            finally:
                claims.release(job)
            self.log(f"{job}: {'done' if finished else 'stopped for the deadline'} in {time.perf_counter() - t0:.1f} s")
            done += finished
        return done

    def run_job(self, job: str) -> bool:
        kind, seed, *rest = job.split("/")
        seed = int(seed)
        t0 = time.perf_counter()
        if kind == "train":
            return self.train(job, seed, rest[0], t0)
        if kind == "prose":
            payload = self.prose(seed, rest[0])
        else:
            payload = self.evaluate(seed, *rest)
        payload["seconds"] = round(time.perf_counter() - t0, 2)
        self.work.mark_done(job, payload)
        return True

    def train(self, job: str, seed: int, mode: str, t0: float) -> bool:
        from ..train import TrainConfig, read_curve, train

        c = self.config
        out = self.work.run_dir(seed, mode)
        data = self.work.data_dir(seed)
        # training stops (with a checkpoint) early enough to save it before the deadline
        remaining = self.deadline - time.time() - self.margin_s - 5.0 if math.isfinite(self.deadline) else None
        config = TrainConfig(
            mode=mode, train_data=str(data / "train.jsonl"), dev_data=str(data / "dev.jsonl"), out_dir=str(out),
            model=c.model, steps=c.steps, batch_size=c.batch_size, micro_batch_tokens=c.micro_batch_tokens,
            lr=c.lr, warmup_steps=c.warmup_steps, seed=seed, lag=c.lag.to_dict(), eval_every=c.eval_every,
            eval_examples=max(1, c.dev_per_cell * len(c.tasks) * len(c.contexts)), group_by_length=True,
            lrsa_backend=c.lrsa_backend, max_seconds=None if remaining is None else max(remaining, 1.0))
        resume = (out / "checkpoint" / "trainer_state.json").exists()
        train(config, resume=resume, progress=self.progress, command=f"lrsa_viz.tasks.suite worker ({job})")
        import gc

        import torch

        gc.collect()  # the run's model, optimiser and activations
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not (out / "model.safetensors").exists():
            return False
        info = json.loads((out / "run_info.json").read_text())
        self.work.mark_done(job, {"seconds": round(time.perf_counter() - t0, 2), "run_info": info,
                                  "curve": read_curve(out / "loss_curve.csv"), "train_config": dataclasses.asdict(config)})
        return True

    def prose(self, seed: int, name: str) -> dict:
        from ..evaluate import prose_loss
        from ..viz.passages import read_passage
        from .haystack import HELD_OUT_PASSAGES

        texts = [read_passage(p) for p in HELD_OUT_PASSAGES]
        return {"seed": seed, "model": name, "passages": list(HELD_OUT_PASSAGES),
                **prose_loss(self.model(seed, name), self.tokenizer, texts)}

    def evaluate(self, seed: int, name: str, tier: str, task: str, ctx: str) -> dict:
        from ..budget import answer_token_lengths
        from ..config import LagConfig
        from ..evaluate import evaluate_model
        from ..qa_data import read_jsonl
        from . import task_metric

        c = self.config
        examples = read_jsonl(self.work.test_file(seed, task, int(ctx)))
        max_new_tokens = max(answer_token_lengths(self.tokenizer, [ex["answer"] for ex in examples])) + 3
        batch_size = max(1, c.eval_batch_tokens // (int(ctx) + 64))  # prompt: document + ~64 tokens of chat and question
        lag = LagConfig(c.sink_size, c.lag_size, min(c.ratios))
        rows = evaluate_model(self.model(seed, name), self.tokenizer, examples, tier_settings(c, tier), lag,
                              batch_size=batch_size, max_new_tokens=max_new_tokens,
                              seed=seed, model_name=name, progress=self.progress,
                              chunked_prefill="auto")  # LagKV chunked: one parallel LRSA prefill on CUDA
        for row in rows:
            row.update(task=task, context_tokens=int(ctx), seed=seed, metric=task_metric(task), tier=tier)
        import torch

        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device.type == "cuda" else None
        others = [[v for n in ex["needles"] if not n["asked"] for v in re.findall(r"\d+", n["text"])] for ex in examples]
        return {"rows": rows, "answers": [ex["answer"] for ex in examples], "others": others,
                "depths": [ex["depth"] for ex in examples], "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "peak_gpu_memory_gib": peak}


# --------------------------------------------------------------------------------------------------------------
# Collect


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean and (sample) standard deviation over seeds of score and kv_fraction, per (task, context, model,
    setting, ratio). ``std`` is None with one seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["context_tokens"], r["model"], r["setting"], r["ratio"]), []).append(r)
    out = []
    for (task, ctx, model, setting, ratio), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        scores, fractions = [r["score"] for r in rs], [r["kv_fraction"] for r in rs]
        out.append({"task": task, "context_tokens": ctx, "model": model, "setting": setting, "ratio": ratio,
                    "metric": rs[0]["metric"], "n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs),
                    "n_per_seed": rs[0]["n"], "mean": statistics.fmean(scores),
                    "std": statistics.stdev(scores) if len(rs) > 1 else None,
                    "kv_fraction": statistics.fmean(fractions)})
    return out


def collect(work: Work, out_dir: str | Path, name: str, command: str | None = None) -> dict[str, Path]:
    """Gather every finished job into ``<name>.json``, ``<name>.csv`` and ``<name>_predictions.json.gz``."""
    import csv

    from ..evaluate import row_prefill
    from ..profile import environment_record

    config = work.config()
    jobs = [j for j, _ in gpu_jobs(config)] + data_jobs(config)
    done = {j: work.done(j) for j in jobs if work.is_done(j)}
    rows, predictions, prose, curves, runs = [], [], [], [], {}
    for job, payload in done.items():
        kind = job.split("/")[0]
        if kind == "eval":
            for row in payload["rows"]:
                preds = row.pop("predictions")
                rows.append(row | {"prefill": row_prefill(row)})  # rows of earlier calls may lack it
                predictions.append({k: row[k] for k in ("task", "context_tokens", "seed", "model", "setting", "ratio")}
                                   | {"predictions": preds, "answers": payload["answers"], "depths": payload["depths"],
                                      "others": payload.get("others")})
        elif kind == "prose":
            prose.append({k: payload[k] for k in ("seed", "model", "loss", "tokens", "perplexity", "passages")})
        elif kind == "train":
            _, seed, mode = job.split("/")
            runs[f"{mode}/seed{seed}"] = {"run_info": payload["run_info"], "train_config": payload["train_config"]}
            curves += [{"run": mode, "seed": int(seed), **point} for point in payload["curve"]]
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (config.tasks.index(r["task"]), r["context_tokens"], r["seed"], order[r["model"]],
                             r["setting"], -r["ratio"]))
    environment = next((p["run_info"]["environment"] for p in runs.values()), None) or environment_record()
    results = {
        "command": command, "config": config.to_dict(), "reductions": list(config.reductions),
        "environment": environment,
        "rows": rows, "summary": summarise(rows), "prose": sorted(prose, key=lambda p: (p["seed"], order[p["model"]])),
        "curves": curves, "runs": runs,
        "timings": {j: p.get("seconds") for j, p in done.items()},
        "missing": [j for j in jobs if j not in done],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "csv": out_dir / f"{name}.csv",
             "predictions": out_dir / f"{name}_predictions.json.gz"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    meta = {"command": command or "", "device": environment.get("device"), "torch": environment.get("torch")}
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_KEYS) + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in ROW_KEYS}, **meta})
    with gzip.open(paths["predictions"], "wt", encoding="utf-8") as f:
        json.dump(predictions, f)
    return paths


def read_suite(path: str | Path) -> dict:
    """A ``finetune_suite.json`` written by `collect`."""
    return json.loads(Path(path).read_text())


def read_predictions(path: str | Path) -> list[dict]:
    """The ``*_predictions.json.gz`` written by `collect`: one entry per row, with predictions, answers, depths."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------------------
# CLI


def _config_from_args(a: argparse.Namespace) -> SuiteConfig:
    d = SuiteConfig()
    kw = {}
    for f in dataclasses.fields(SuiteConfig):
        v = getattr(a, f.name, None)
        if v is not None:
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    if kw.get("model") == "default":
        kw["model"] = None
    return dataclasses.replace(d, **kw).check()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lrsa_viz.tasks.suite", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("init", "data", "worker", "collect"):
        s = sub.add_parser(name)
        s.add_argument("--work", required=True, help="the work directory shared by all processes")
        add_debug_flag(s)
        if name == "init":
            d = SuiteConfig()
            for f in dataclasses.fields(SuiteConfig):
                default = getattr(d, f.name)
                flag = "--" + f.name.replace("_", "-")
                if isinstance(default, tuple):
                    kind = str if f.name in ("tasks", "baselines", "reductions") else (float if f.name == "ratios" else int)
                    s.add_argument(flag, nargs="*", type=kind, default=None)
                elif f.name == "model":
                    s.add_argument(flag, default=None, help="GGUF / model directory / tiny:SEED; 'default' = SmolLM2")
                else:
                    s.add_argument(flag, type=type(default), default=None)
        if name == "data":
            s.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
        if name == "worker":
            s.add_argument("--worker", type=int, default=0)
            s.add_argument("--deadline", type=float, default=math.inf, help="unix time after which no job starts")
            s.add_argument("--margin", type=float, default=20.0, help="seconds before the deadline: no new job")
            s.add_argument("--workers-total", type=int, default=1, help="GPU workers of this run (job affinity)")
        if name == "collect":
            s.add_argument("--out", required=True)
            s.add_argument("--name", default="finetune_suite")
            s.add_argument("--experiment", default=None, help="the command that ran the suite, to record")
        s.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    work = Work(a.work)
    if a.command == "init":
        config = _config_from_args(a)
        init_work(work, config)
        from ..train import is_tiny_source

        if not is_tiny_source(config.model):
            from ..models import resolve_model_source

            resolve_model_source(config.model)  # a GGUF is converted once here, not by parallel processes
    elif a.command == "data":
        for job, seconds in make_data(work, workers=a.workers, progress=a.progress).items():
            print(f"[data {time.strftime('%H:%M:%S')}] {job}: {seconds} s", file=sys.stderr, flush=True)
    elif a.command == "worker":
        Worker(work, a.worker, a.deadline, progress=a.progress, margin_s=a.margin, n_workers=a.workers_total).run()
    else:
        for kind, path in collect(work, a.out, a.name, a.experiment).items():
            print(f"{kind}: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
